//! Gaps in the drain: stretches between two successful pops (or from the last pop before a
//! restart to the first one after it) longer than CPA's queue retention. CPA drops a record
//! `retention` after queuing it, so records queued early in such a stretch expired unseen.
//! Nothing else shows that loss: every poll after it succeeds.

use std::time::Duration;

/// CPA's default queue retention, used when its settings could not be read.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(60);
/// How long a gap waits for CPA's settings (read shortly after the first successful poll)
/// before it is judged against [`DEFAULT_RETENTION`].
pub const SETTINGS_WAIT: Duration = Duration::from_secs(120);

/// A gap beyond the retention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gap {
    /// Seconds between the two pops.
    pub seconds: f64,
    /// Seconds of it beyond the retention: records queued then expired before a pop.
    pub beyond: f64,
    pub retention: Duration,
}

/// Watches the times of successful pops.
#[derive(Debug, Default)]
pub struct GapWatch {
    last_pop: Option<f64>,
    /// Gaps not judged yet (CPA's retention unknown): (length, when seen), Unix seconds.
    pending: Vec<(f64, f64)>,
}

impl GapWatch {
    /// `last_pop`: the last successful pop before this process started, if one was recorded.
    pub fn new(last_pop: Option<f64>) -> GapWatch {
        GapWatch {
            last_pop,
            pending: Vec::new(),
        }
    }

    /// A successful pop that started at `at` (Unix seconds).
    pub fn popped(&mut self, at: f64) {
        if let Some(last) = self.last_pop {
            let seconds = at - last;
            // No retention is shorter than a second; anything shorter is no gap.
            if seconds > 1.0 {
                self.pending.push((seconds, at));
            }
        }
        self.last_pop = Some(self.last_pop.map_or(at, |l| l.max(at)));
    }

    /// Judge waiting gaps against CPA's retention, when known (or, after [`SETTINGS_WAIT`],
    /// against the default). Returns the gaps longer than the retention.
    pub fn settle(&mut self, retention: Option<Duration>, now: f64) -> Vec<Gap> {
        let mut out = Vec::new();
        self.pending.retain(|&(seconds, seen)| {
            let retention = match retention {
                Some(r) => r,
                None if now - seen >= SETTINGS_WAIT.as_secs_f64() => DEFAULT_RETENTION,
                None => return true,
            };
            let beyond = seconds - retention.as_secs_f64();
            if beyond > 0.0 {
                out.push(Gap {
                    seconds,
                    beyond,
                    retention,
                });
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Option<Duration> = Some(Duration::from_secs(5));

    #[test]
    fn pops_closer_than_the_retention_are_no_gap() {
        let mut w = GapWatch::new(None);
        for t in [100.0, 101.0, 104.0, 108.9] {
            w.popped(t);
        }
        assert!(w.settle(R, 110.0).is_empty());
    }

    #[test]
    fn a_stretch_longer_than_the_retention_is_one_gap() {
        let mut w = GapWatch::new(None);
        w.popped(100.0);
        w.popped(112.0);
        w.popped(113.0);
        let gaps = w.settle(R, 113.0);
        assert_eq!(gaps.len(), 1);
        assert_eq!((gaps[0].seconds, gaps[0].beyond), (12.0, 7.0));
        assert!(w.settle(R, 114.0).is_empty(), "counted once");
    }

    #[test]
    fn downtime_since_the_last_pop_before_a_restart_counts() {
        let mut w = GapWatch::new(Some(100.0));
        w.popped(190.0);
        assert_eq!(
            w.settle(Some(Duration::from_secs(60)), 190.0)[0].beyond,
            30.0
        );
    }

    #[test]
    fn a_gap_waits_for_the_retention_then_falls_back_to_the_default() {
        let mut w = GapWatch::new(Some(100.0));
        w.popped(190.0);
        assert!(w.settle(None, 191.0).is_empty());
        let later = 190.0 + SETTINGS_WAIT.as_secs_f64();
        let gaps = w.settle(None, later);
        assert_eq!(gaps[0].retention, DEFAULT_RETENTION);
        // Judged against a longer retention once known, it is no gap.
        let mut w = GapWatch::new(Some(100.0));
        w.popped(190.0);
        assert!(w.settle(Some(Duration::from_secs(600)), 191.0).is_empty());
    }
}
