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

/// Longest `request_id` kept for an exemplar. CPA's are 8 hex digits; anything longer is not
/// CPA's and gets no exemplar.
pub const MAX_REQUEST_ID: usize = 16;

/// CPA's `request_id`: 1 to [`MAX_REQUEST_ID`] lowercase hex digits, stored inline (no
/// allocation per exemplar). It may appear only in an OpenMetrics exemplar: its `Debug` hides
/// it, so a logged batch or state cannot leak it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId {
    digits: [u8; MAX_REQUEST_ID],
    /// Non-zero, so `Option<Exemplar>` costs no extra word.
    len: std::num::NonZeroU8,
}

impl RequestId {
    /// `None` for anything but 1 to 16 hex digits: such an id gets no exemplar rather than a
    /// cleaned-up one that CPA's request log would not find.
    pub fn parse(s: &str) -> Option<RequestId> {
        let bytes = s.as_bytes();
        if bytes.len() > MAX_REQUEST_ID || !bytes.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let len = std::num::NonZeroU8::new(u8::try_from(bytes.len()).ok()?)?;
        let mut digits = [0; MAX_REQUEST_ID];
        for (d, b) in digits.iter_mut().zip(bytes) {
            *d = b.to_ascii_lowercase();
        }
        Some(RequestId { digits, len })
    }

    pub fn as_str(&self) -> &str {
        let digits = &self.digits[..usize::from(self.len.get())];
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(digits).unwrap_or("")
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestId(..)")
    }
}

/// One record of a series, shown next to it as an OpenMetrics exemplar: which request it was,
/// when it ended and what it observed (seconds for a histogram, 1 for a counter). 40 bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    pub request_id: RequestId,
    /// When the attempt ended (start + latency, never after the pop), Unix seconds.
    pub time: f64,
    pub value: f64,
}

/// The live exemplars of one series: one slot per histogram bucket (the bucket the record's
/// value fell in), or one slot for a counter. Empty (no allocation) until a record with a
/// usable `request_id` arrives. Never persisted: a restart starts without them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exemplars(Box<[Option<Exemplar>]>);

impl Exemplars {
    /// Keep `e` in `slot` of `slots` unless the slot holds a later record: an exemplar's time
    /// never goes back, which Prometheus' exemplar storage requires (it refuses out-of-order
    /// exemplars of a series).
    pub fn note(&mut self, slot: usize, slots: usize, e: Exemplar) {
        if self.0.len() != slots {
            self.0 = vec![None; slots].into_boxed_slice();
        }
        if let Some(s) = self.0.get_mut(slot) {
            if s.is_none_or(|old| e.time >= old.time) {
                *s = Some(e);
            }
        }
    }

    /// A counter's exemplar.
    pub fn note_counter(&mut self, e: Exemplar) {
        self.note(0, 1, e);
    }

    /// A histogram's exemplar, in the bucket `value` falls in.
    pub fn note_observation(&mut self, bounds: &[f64], e: Exemplar) {
        let i = bounds.partition_point(|&b| b < e.value);
        self.note(i, bounds.len() + 1, e);
    }

    /// Keep the later exemplar of each slot.
    pub fn merge(&mut self, other: &Exemplars) {
        let slots = other.0.len();
        for (i, e) in other.0.iter().enumerate() {
            if let Some(e) = e {
                self.note(i, slots, *e);
            }
        }
    }

    /// The exemplar of bucket (or counter slot) `i`.
    pub fn get(&self, i: usize) -> Option<&Exemplar> {
        self.0.get(i).and_then(Option::as_ref)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: &str, time: f64, value: f64) -> Exemplar {
        Exemplar {
            request_id: RequestId::parse(id).unwrap(),
            time,
            value,
        }
    }

    #[test]
    fn request_ids_are_hex_of_bounded_length_and_never_debug_printed() {
        assert_eq!(RequestId::parse("A1b2c3d4").unwrap().as_str(), "a1b2c3d4");
        assert!(RequestId::parse("").is_none());
        assert!(RequestId::parse("a1b2c3d4a1b2c3d4a").is_none());
        assert!(RequestId::parse("a1b2 3d4").is_none());
        assert!(RequestId::parse("\"\"} 1 # x").is_none());
        assert_eq!(
            format!("{:?}", RequestId::parse("a1b2c3d4").unwrap()),
            "RequestId(..)"
        );
        assert_eq!(std::mem::size_of::<Option<Exemplar>>(), 40);
    }

    #[test]
    fn each_bucket_keeps_its_latest_record() {
        let bounds = [1.0, 2.0];
        let mut e = Exemplars::default();
        assert!(e.is_empty());
        e.note_observation(&bounds, ex("01", 10.0, 0.5));
        e.note_observation(&bounds, ex("02", 9.0, 0.7));
        e.note_observation(&bounds, ex("03", 11.0, 9.0));
        assert_eq!(e.get(0).unwrap().request_id.as_str(), "01", "older loses");
        assert!(e.get(1).is_none());
        assert_eq!(e.get(2).unwrap().request_id.as_str(), "03");
        let mut later = Exemplars::default();
        later.note_observation(&bounds, ex("04", 12.0, 1.0));
        later.note_observation(&bounds, ex("05", 5.0, 9.0));
        e.merge(&later);
        assert_eq!(e.get(0).unwrap().request_id.as_str(), "04");
        assert_eq!(e.get(2).unwrap().request_id.as_str(), "03");
    }

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
