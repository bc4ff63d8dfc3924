//! Per-key budgets: a spend limit in USD per UTC day or month for a client API key, and the
//! spend of the current period, counted at ingest from the same cost as `cpa_cost_usd_total`.
//!
//! Spend is accumulated per committed batch (so it is exact to the nano-dollar and survives
//! restarts: it is written with the batch, in the same transaction) and attributed to the period
//! in which each request started (the record's time, which is never after its decoding), not
//! the one in which the exporter committed it: a request of 23:59 drained after midnight counts
//! for the day before. Only the latest period's spend is kept: a record of a period already
//! over adds to that period if it is the one kept (no longer exported as current), else to
//! nothing, and never to today's. Spend before the exporter first knew a budget is not counted:
//! a budget added mid-period starts at zero.

use std::collections::{BTreeMap, HashMap};

use crate::families::{label, Family, NANO_PER_UNIT};
use crate::ingest::{Attempt, Batch};
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
            let mut spend = next[i];
            let mut changed = false;
            for (start, nano) in by_period(b, &batch.attempts, added, now) {
                // A period older than the one kept is over and no longer stored (a late
                // record, or a wall clock stepped back): it never reaches the kept period.
                if start < spend.start {
                    continue;
                }
                if start > spend.start {
                    spend = Spend { start, nano_usd: 0 };
                }
                spend.nano_usd = spend.nano_usd.saturating_add(nano);
                changed = true;
            }
            if changed {
                next[i] = spend;
                rows.push((
                    Self::meta_key(b),
                    format!("{} {}", spend.start, spend.nano_usd),
                ));
            }
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

/// `total` (the batch's cost for the budget's key) split over the periods in which its requests
/// started, oldest first. A record is never timed after its decoding, so `now` caps its time
/// only against a clock gone wrong; a record without a time counts at `now`.
fn by_period(b: &Budget, attempts: &[Attempt], total: u64, now: i64) -> Vec<(i64, u64)> {
    let mut parts: BTreeMap<i64, u64> = BTreeMap::new();
    let mut priced = 0u64;
    for a in attempts.iter().filter(|a| *a.route.api_key == *b.api_key) {
        let Some(nano) = a.cost_nano_usd else {
            continue;
        };
        let at = a.started.map_or(now, |t| (t.floor() as i64).min(now));
        let part = parts.entry(b.period.start(at)).or_default();
        *part = part.saturating_add(nano);
        priced = priced.saturating_add(nano);
    }
    // The cost family prices summed tokens, which may differ from the records' sum by rounding;
    // the latest period takes the difference so the spend stays the family's to the nano-dollar.
    let latest = parts
        .keys()
        .next_back()
        .copied()
        .unwrap_or_else(|| b.period.start(now));
    let part = parts.entry(latest).or_default();
    *part = if total >= priced {
        part.saturating_add(total - priced)
    } else {
        part.saturating_sub(priced - total)
    };
    parts.into_iter().filter(|(_, n)| *n > 0).collect()
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

    /// A batch of one priced attempt per `(started, nano)`, with the cost family to match.
    fn attempts(key: &str, costs: &[(Option<f64>, u64)]) -> Batch {
        use crate::ingest::{Attempt, Route};
        use std::sync::Arc;
        let route = Arc::new(Route {
            provider: "codex".into(),
            model: "gpt".into(),
            requested_model: "gpt".into(),
            credential: "cred".into(),
            api_key: key.into(),
            endpoint: "POST /v1/responses".into(),
        });
        let mut b = batch(key, costs.iter().map(|(_, n)| n).sum());
        for &(started, nano) in costs {
            b.attempts.push(Attempt {
                started,
                request_id: None,
                request_key: None,
                route: route.clone(),
                status_code: 200,
                failed: false,
                latency_seconds: Some(1.0),
                ttft_seconds: None,
                tokens: crate::tokens::Tokens::default(),
                cost_nano_usd: Some(nano),
            });
        }
        b
    }

    #[test]
    fn spend_belongs_to_the_period_of_the_request_not_of_the_commit() {
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
        let feb_28 = Period::Day.start(FEB_END);
        // Earlier on 28 February: 1 USD.
        let (spend, _) = b.after(
            &attempts(&key, &[(Some((FEB_END - 3600) as f64), 1_000_000_000)]),
            FEB_END - 3600,
        );
        b.set(spend);
        // After a drain gap, committed on 1 March: a request of 23:59 on 28 February (2 USD),
        // one of 1 March (0.5 USD) and one whose time is not a time (counted at the commit).
        let late = attempts(
            &key,
            &[
                (Some((FEB_END - 30) as f64), 2_000_000_000),
                (Some((FEB_END + 20) as f64), 500_000_000),
                (None, 1),
            ],
        );
        let (spend, rows) = b.after(&late, FEB_END + 120);
        b.set(spend);
        // Today's spend is only today's requests; February's 3 USD stayed in February.
        let today: Vec<u64> = b
            .current(FEB_END + 120)
            .map(|(_, usd, _)| (usd * NANO_PER_UNIT).round() as u64)
            .collect();
        assert_eq!(today, [500_000_001, 500_000_001]);
        assert_eq!(
            rows[0],
            (
                format!("budget/day/{key}"),
                format!("{} 500000001", FEB_END + 1)
            )
        );
        // Committed before midnight, a record of the past period still adds to that period.
        let mut b2 = Budgets::new(b.budgets.clone());
        let (spend, _) = b2.after(
            &attempts(&key, &[(Some((FEB_END - 60) as f64), 7)]),
            FEB_END - 10,
        );
        b2.set(spend);
        let (spend, _) = b2.after(
            &attempts(&key, &[(Some((FEB_END - 50) as f64), 3)]),
            FEB_END + 5,
        );
        b2.set(spend);
        assert_eq!(
            b2.spend[0],
            Spend {
                start: feb_28,
                nano_usd: 10
            }
        );
        assert_eq!(
            b2.current(FEB_END + 5).next().map(|(_, usd, _)| usd),
            Some(0.0)
        );
        // A record of a period older than the one already counted does not reach today's.
        let (spend, rows) = b.after(
            &attempts(&key, &[(Some((FEB_END - 5) as f64), 9)]),
            FEB_END + 200,
        );
        b.set(spend);
        assert!(rows.is_empty(), "{rows:?}");
        assert_eq!(b.spend[0].nano_usd, 500_000_001);
        // A record time after the commit (never, records are clamped) counts at the commit.
        let (spend, _) = b.after(
            &attempts(&key, &[(Some((FEB_END + 86_400 * 3) as f64), 4)]),
            FEB_END + 300,
        );
        b.set(spend);
        assert_eq!(
            b.spend[0],
            Spend {
                start: FEB_END + 1,
                nano_usd: 500_000_005
            }
        );
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
        // nor restarts there; it stays with the day it was counted in (records of the day
        // before, as the stepped clock times them, belong to a period already over).
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
                nano_usd: 300
            }
        );
        assert!(rows.is_empty(), "{rows:?}");
    }
}
