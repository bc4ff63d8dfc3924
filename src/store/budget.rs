//! Per-key budgets: a spend limit in USD per UTC day or month for a client API key, and the
//! spend of the current period, counted at ingest from the same cost as `cpa_cost_usd_total`.
//!
//! Spend is accumulated per committed batch (so it is exact to the nano-dollar and survives
//! restarts: it is written with the batch, in the same transaction) and attributed to the period
//! in which the exporter committed it. A record drained just after midnight counts for the new
//! day; the lag is one poll interval. Spend before the exporter first knew a budget is not
//! counted: a budget added mid-period starts at zero.

use std::collections::HashMap;

use crate::families::{label, Family, NANO_PER_UNIT};
use crate::ingest::Batch;
use crate::series::Value;
use crate::time::{civil_from_days, days_from_civil};

/// Prefix of the budget rows in the store's `meta` table.
pub const META_PREFIX: &str = "budget/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        match s.trim().to_ascii_lowercase().as_str() {
            "day" | "daily" => Some(Period::Day),
            "month" | "monthly" => Some(Period::Month),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// Start of the UTC period holding `now`, Unix seconds.
    pub fn start(self, now: i64) -> i64 {
        let day = now.div_euclid(86_400);
        match self {
            Period::Day => day * 86_400,
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                days_from_civil(y, m, 1) * 86_400
            }
        }
    }

    /// End of the UTC period holding `now` (the start of the next one), Unix seconds.
    pub fn end(self, now: i64) -> i64 {
        match self {
            Period::Day => self.start(now) + 86_400,
            Period::Month => {
                let (y, m, _) = civil_from_days(now.div_euclid(86_400));
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(y, m, 1) * 86_400
            }
        }
    }
}

/// One configured budget. `api_key` is the key's stored label value (`sha256:` + 12 hex).
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub api_key: String,
    pub usd: f64,
    pub period: Period,
}

/// Spend of one budget in one period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    /// Start of the period the spend belongs to, Unix seconds.
    pub start: i64,
    pub nano_usd: u64,
}

impl Spend {
    /// The spend as of `now`: zero once its period is over. A period never goes back: with
    /// the wall clock stepped back across its start, the spend stays with the later period
    /// (else a day's spend would drop to zero, then be overwritten).
    fn current(self, period: Period, now: i64) -> u64 {
        if self.start >= period.start(now) {
            self.nano_usd
        } else {
            0
        }
    }
}

/// The configured budgets and their spend, parallel vectors.
#[derive(Debug, Default, Clone)]
pub struct Budgets {
    budgets: Vec<Budget>,
    spend: Vec<Spend>,
}

impl Budgets {
    pub fn new(budgets: Vec<Budget>) -> Budgets {
        let spend = vec![Spend::default(); budgets.len()];
        Budgets { budgets, spend }
    }

    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty()
    }

    fn meta_key(b: &Budget) -> String {
        format!("{META_PREFIX}{}/{}", b.period.as_str(), b.api_key)
    }

    /// Restore spend from the store's rows (`key`, `"start nano_usd"`); unknown rows are ignored.
    pub fn restore<'a>(&mut self, rows: impl IntoIterator<Item = (&'a str, &'a str)>) {
        for (key, value) in rows {
            let Some(i) = self.budgets.iter().position(|b| Self::meta_key(b) == key) else {
                continue;
            };
            let mut parts = value.split_whitespace().map(str::parse::<i64>);
            if let (Some(Ok(start)), Some(Ok(nano))) = (parts.next(), parts.next()) {
                self.spend[i] = Spend {
                    start,
                    nano_usd: u64::try_from(nano).unwrap_or(0),
                };
            }
        }
    }

    /// The spend after a batch committed at `now`, and the store rows that record it (only for
    /// budgets the batch changed). Nothing changes until [`Budgets::set`].
    pub fn after(&self, batch: &Batch, now: i64) -> (Vec<Spend>, Vec<(String, String)>) {
        let mut next = self.spend.clone();
        let mut rows = Vec::new();
        if self.budgets.is_empty() {
            return (next, rows);
        }
        // One pass over the batch's cost series, summed per client key.
        let Some(key_at) = Family::Cost
            .labels()
            .iter()
            .position(|l| *l == label::API_KEY)
        else {
            return (next, rows);
        };
        let mut per_key: HashMap<&str, u64> = HashMap::new();
        for (labels, value) in &batch.delta.families[Family::Cost as usize] {
            if let (Some(key), Value::Counter(n)) = (labels.get(key_at), value) {
                let sum = per_key.entry(key.as_ref()).or_default();
                *sum = sum.saturating_add(*n);
            }
        }
        for (i, b) in self.budgets.iter().enumerate() {
            let added = per_key.get(b.api_key.as_str()).copied().unwrap_or(0);
            if added == 0 {
                continue;
            }
            let start = b.period.start(now).max(next[i].start);
            let base = next[i].current(b.period, now);
            next[i] = Spend {
                start,
                nano_usd: base.saturating_add(added),
            };
            rows.push((Self::meta_key(b), format!("{} {}", start, next[i].nano_usd)));
        }
        (next, rows)
    }

    /// The spend of every budget as last set, in USD, whatever its period (for benchmarks and
    /// tests).
    pub fn spent_usd(&self) -> Vec<f64> {
        self.spend
            .iter()
            .map(|s| s.nano_usd as f64 / NANO_PER_UNIT)
            .collect()
    }

    /// Make committed spend visible.
    pub fn set(&mut self, spend: Vec<Spend>) {
        if spend.len() == self.spend.len() {
            self.spend = spend;
        }
    }

    /// Each budget with the spend of its current period in USD and the period's end (Unix
    /// seconds), as of `now`.
    pub fn current(&self, now: i64) -> impl Iterator<Item = (&Budget, f64, i64)> + '_ {
        self.budgets.iter().zip(&self.spend).map(move |(b, spend)| {
            let usd = spend.current(b.period, now) as f64 / NANO_PER_UNIT;
            (b, usd, b.period.end(now.max(spend.start)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::api_key_label;
    use crate::series::LabelValues;

    /// 2026-02-28T23:59:59Z and the second after it.
    const FEB_END: i64 = 1_772_323_199;

    fn batch(key: &str, nano: u64) -> Batch {
        let mut b = Batch::default();
        let labels: LabelValues = ["codex", "gpt", "cred", key]
            .iter()
            .map(|s| Box::<str>::from(*s))
            .collect();
        b.delta.add(Family::Cost, labels, Value::Counter(nano));
        b
    }

    #[test]
    fn periods_are_utc_days_and_calendar_months() {
        assert_eq!(Period::Day.start(FEB_END), FEB_END + 1 - 86_400);
        assert_eq!(Period::Day.end(FEB_END), FEB_END + 1);
        // February 2026 has 28 days; March starts the second after FEB_END.
        assert_eq!(Period::Month.start(FEB_END), FEB_END + 1 - 28 * 86_400);
        assert_eq!(Period::Month.end(FEB_END), FEB_END + 1);
        assert_eq!(Period::Month.start(FEB_END + 1), FEB_END + 1);
        // December rolls over into the next year: 2026-12-01 .. 2027-01-01.
        let dec = 1_796_083_200;
        assert_eq!(Period::Month.start(dec + 5), dec);
        assert_eq!(Period::Month.end(dec), 1_798_761_600);
        assert_eq!(Period::parse(" Monthly"), Some(Period::Month));
        assert_eq!(Period::parse("week"), None);
    }

    #[test]
    fn spend_accumulates_per_period_and_restarts_at_the_next() {
        let key = api_key_label("sk-team-a");
        let mut b = Budgets::new(vec![
            Budget {
                api_key: key.clone(),
                usd: 10.0,
                period: Period::Day,
            },
            Budget {
                api_key: key.clone(),
                usd: 100.0,
                period: Period::Month,
            },
        ]);
        let (spend, rows) = b.after(&batch(&key, 1_500_000_000), FEB_END - 10);
        assert_eq!(rows.len(), 2);
        b.set(spend);
        let (spend, _) = b.after(&batch("sha256:000000000000", 7), FEB_END - 5);
        b.set(spend);
        assert_eq!(
            b.spend[0].nano_usd, 1_500_000_000,
            "other keys do not count"
        );
        // Next day, next month: both start from what the new batch adds.
        let (spend, rows) = b.after(&batch(&key, 250_000_000), FEB_END + 60);
        b.set(spend);
        assert_eq!(b.spend[0].nano_usd, 250_000_000);
        assert_eq!(b.spend[1].nano_usd, 250_000_000);
        assert_eq!(
            rows[0],
            (
                format!("budget/day/{key}"),
                format!("{} 250000000", FEB_END + 1)
            )
        );
        // Restored from the rows, as after a restart.
        let mut again = Budgets::new(b.budgets.clone());
        again.restore(rows.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(again.spend, b.spend);
        // A period with no batch yet reads 0 without a write.
        assert_eq!(b.spend[0].current(Period::Day, FEB_END + 86_400 + 1), 0);
    }

    #[test]
    fn a_wall_clock_stepped_back_across_midnight_keeps_the_later_days_spend() {
        let key = api_key_label("sk-team-a");
        let mut b = Budgets::new(vec![Budget {
            api_key: key.clone(),
            usd: 10.0,
            period: Period::Day,
        }]);
        let (spend, _) = b.after(&batch(&key, 300), FEB_END + 1800);
        b.set(spend);
        // NTP steps the clock back an hour, to the day before: the spend neither drops to zero
        // nor restarts there; it stays with the day it was counted in, and grows.
        let back = FEB_END - 1800;
        let (usd, end) = b
            .current(back)
            .map(|(_, usd, end)| (usd, end))
            .next()
            .unwrap();
        assert_eq!((usd * 1e9).round(), 300.0);
        assert_eq!(end, FEB_END + 1 + 86_400);
        let (spend, rows) = b.after(&batch(&key, 200), back);
        b.set(spend);
        assert_eq!(
            b.spend[0],
            Spend {
                start: FEB_END + 1,
                nano_usd: 500
            }
        );
        assert_eq!(rows[0].1, format!("{} 500", FEB_END + 1));
    }
}
