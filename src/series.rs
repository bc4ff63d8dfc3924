//! Series values shared by ingest (batch deltas), the store (persisted state) and the renderer.

/// Label values in the order of the family's [`crate::families::Family::labels`].
pub type LabelValues = Box<[Box<str>]>;

/// A classic histogram: per-bucket (not cumulative) counts, the last bucket being `+Inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hist {
    pub sum: f64,
    pub count: u64,
    pub buckets: Box<[u64]>,
}

impl Hist {
    pub fn new(bounds: &[f64]) -> Hist {
        Hist {
            sum: 0.0,
            count: 0,
            buckets: vec![0; bounds.len() + 1].into_boxed_slice(),
        }
    }

    pub fn observe(&mut self, bounds: &[f64], v: f64) {
        let i = bounds.partition_point(|&b| b < v);
        if let Some(slot) = self.buckets.get_mut(i) {
            *slot += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Hist) {
        self.sum += other.sum;
        self.count += other.count;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(u64),
    Histogram(Hist),
}

impl Value {
    /// A value of the same kind (and buckets) at zero.
    pub fn zeroed(&self) -> Value {
        match self {
            Value::Counter(_) => Value::Counter(0),
            Value::Histogram(h) => Value::Histogram(Hist {
                sum: 0.0,
                count: 0,
                buckets: vec![0; h.buckets.len()].into_boxed_slice(),
            }),
        }
    }

    /// Add `other` into `self`. Values of different kinds never meet: a family has one kind.
    pub fn merge(&mut self, other: &Value) {
        match (self, other) {
            (Value::Counter(a), Value::Counter(b)) => *a = a.saturating_add(*b),
            (Value::Histogram(a), Value::Histogram(b)) => a.merge(b),
            _ => debug_assert!(false, "merging values of different kinds"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_is_not_below() {
        let bounds = [1.0, 2.0];
        let mut h = Hist::new(&bounds);
        for v in [0.5, 1.0, 1.5, 2.0, 9.0] {
            h.observe(&bounds, v);
        }
        assert_eq!(&*h.buckets, &[2, 2, 1]);
        assert_eq!(h.count, 5);
        assert_eq!(h.sum, 14.0);
    }
}
