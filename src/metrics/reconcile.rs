//! Reconciliation with CPA's own counts: records CPA counted that the exporter never saw.
//!
//! CPA counts every upstream attempt per credential in memory (the credentials listing's
//! `success`/`failed`, and `api-key-usage` for config API-key credentials); those counts start
//! from 0 when CPA restarts. The exporter's own counts (`cpa_requests_total` summed by
//! credential) persist across its restarts. Neither side's absolute value can be compared with
//! the other's, so each credential gets a baseline: both counts at the first read after either
//! side restarted, and then
//!
//! ```text
//! unaccounted = (CPA's count one read ago - CPA's baseline) - (our count now - our baseline)
//! ```
//!
//! CPA's count is taken one read (a credentials interval) *earlier* than ours: a record CPA has
//! counted but the drain loop has not yet popped is in flight, not lost, and the interval gives
//! it time to arrive. In-flight records can only make the difference smaller, never larger;
//! negative values are shown as 0.
//!
//! The baseline itself may be taken with records in flight (the backlog queued while the
//! exporter was down is popped after it), which would hide as many later losses. So when CPA
//! counted nothing new on a credential over a whole interval (nothing can be in flight), a
//! negative difference is the baseline's error and is absorbed; a positive one is a loss.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use crate::cpa::mgmt::{Credential, KeyUsage};
use crate::families::{label, Family};
use crate::series::Value;
use crate::store::State;

/// One credential as CPA counts it, joined to the exporter's `credential` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpaCount {
    /// `auth_index`: the listing's own, or the one derived from an API key.
    pub credential: String,
    pub provider: String,
    pub success: u64,
    pub failed: u64,
    /// Whether `credential` surely names the credential in the records: always for the
    /// listing; for an API key only once records under the derived index were counted (CPA's
    /// formula for it changed between versions, so an index nobody uses may be wrong).
    pub joined: bool,
}

impl CpaCount {
    pub fn attempts(&self) -> u64 {
        self.success.saturating_add(self.failed)
    }
}

/// A credential's counts and, for joined ones, the records CPA counted that the exporter did
/// not (`None` until known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub cpa: CpaCount,
    pub unaccounted: Option<u64>,
}

/// Attempts the exporter counted per credential (`auth_index`) since its series began:
/// `cpa_requests_total` summed over the other labels.
pub fn attempts_by_credential(state: &State) -> HashMap<String, u64> {
    let family = Family::Requests;
    let mut out: HashMap<String, u64> = HashMap::new();
    let Some(pos) = family.labels().iter().position(|l| *l == label::CREDENTIAL) else {
        return out;
    };
    for (labels, stored) in &state.families[family as usize] {
        if let (Some(credential), Value::Counter(n)) = (labels.get(pos), &stored.value) {
            let sum = out.entry(credential.to_string()).or_default();
            *sum = sum.saturating_add(*n);
        }
    }
    out
}

/// CPA's counts of both kinds of credentials, one entry per `auth_index` (the first wins).
/// An API key's index is the first of its candidates the exporter has counted records for.
pub fn cpa_counts(
    listing: &[Credential],
    keys: &[KeyUsage],
    ours: &HashMap<String, u64>,
) -> Vec<CpaCount> {
    let mut seen = HashSet::new();
    let listed = listing.iter().map(|c| CpaCount {
        credential: c.auth_index.clone(),
        provider: c.provider.clone(),
        success: c.success,
        failed: c.failed,
        joined: true,
    });
    let keyed = keys.iter().map(|k| {
        let known = k.auth_index.iter().find(|i| ours.contains_key(*i));
        CpaCount {
            credential: known.unwrap_or(&k.auth_index[0]).clone(),
            provider: k.provider.clone(),
            success: k.success,
            failed: k.failed,
            joined: known.is_some(),
        }
    });
    listed
        .chain(keyed)
        .filter(|c| seen.insert(c.credential.clone()))
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Baseline {
    cpa0: u64,
    ours0: u64,
    prev_cpa: u64,
    prev_ours: u64,
}

impl Baseline {
    fn at(cpa: u64, ours: u64) -> Baseline {
        Baseline {
            cpa0: cpa,
            ours0: ours,
            prev_cpa: cpa,
            prev_ours: ours,
        }
    }

    /// Take one read; returns the difference (negative: in flight, or the baseline's error).
    fn step(&mut self, cpa: u64, ours: u64) -> i128 {
        let counted_by_cpa = i128::from(self.prev_cpa) - i128::from(self.cpa0);
        let mut d = counted_by_cpa - (i128::from(ours) - i128::from(self.ours0));
        if cpa == self.prev_cpa && d < 0 {
            // Nothing new for a whole interval, so nothing in flight: the baseline was low.
            self.ours0 = u64::try_from(i128::from(ours) - counted_by_cpa).unwrap_or(self.ours0);
            d = 0;
        }
        self.prev_cpa = cpa;
        self.prev_ours = ours;
        d
    }
}

/// The baselines, kept by the management poller (in memory: an exporter restart starts anew).
#[derive(Debug, Default)]
pub struct Reconciler {
    baselines: HashMap<String, Baseline>,
}

impl Reconciler {
    /// Compare one read of CPA's counts with the exporter's (taken just after it).
    pub fn observe(
        &mut self,
        counts: Vec<CpaCount>,
        ours: &HashMap<String, u64>,
    ) -> Vec<Reconciled> {
        // CPA's counters only fall when CPA restarted: then every baseline is stale, including
        // those of credentials whose count has already climbed past its old value.
        let restarted = counts.iter().any(|c| {
            self.baselines
                .get(&c.credential)
                .is_some_and(|b| c.attempts() < b.prev_cpa)
        });
        if restarted {
            self.baselines.clear();
        }
        let mut out = Vec::with_capacity(counts.len());
        for cpa in counts {
            let unaccounted = cpa.joined.then(|| {
                let attempts = cpa.attempts();
                let ours = ours.get(&cpa.credential).copied().unwrap_or(0);
                let d = match self.baselines.entry(cpa.credential.clone()) {
                    Entry::Vacant(v) => {
                        v.insert(Baseline::at(attempts, ours));
                        0
                    }
                    // Ours fell: its series were retired (or folded away); start again.
                    Entry::Occupied(mut b) if ours < b.get().prev_ours => {
                        b.insert(Baseline::at(attempts, ours));
                        0
                    }
                    Entry::Occupied(mut b) => b.get_mut().step(attempts, ours),
                };
                u64::try_from(d.max(0)).unwrap_or(u64::MAX)
            });
            out.push(Reconciled { cpa, unaccounted });
        }
        let listed: HashSet<&str> = out
            .iter()
            .filter(|r| r.cpa.joined)
            .map(|r| r.cpa.credential.as_str())
            .collect();
        self.baselines.retain(|c, _| listed.contains(c.as_str()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaa000000000001";
    const B: &str = "bbbb000000000002";

    fn count(credential: &str, success: u64, failed: u64) -> CpaCount {
        CpaCount {
            credential: credential.to_owned(),
            provider: "codex".to_owned(),
            success,
            failed,
            joined: true,
        }
    }

    fn ours(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect()
    }

    /// One read of credential A: CPA's count and ours; returns the unaccounted records.
    fn read(r: &mut Reconciler, cpa: u64, exporter: u64) -> Option<u64> {
        let out = r.observe(vec![count(A, cpa, 0)], &ours(&[(A, exporter)]));
        out[0].unaccounted
    }

    #[test]
    fn the_first_read_is_the_baseline_whatever_the_absolute_counts() {
        let mut r = Reconciler::default();
        // The exporter's counts persist for months; CPA's started this morning.
        assert_eq!(read(&mut r, 40, 90_000), Some(0));
        assert_eq!(read(&mut r, 40, 90_000), Some(0));
    }

    #[test]
    fn records_cpa_counted_and_nobody_delivered_show_one_read_later() {
        let mut r = Reconciler::default();
        read(&mut r, 100, 500);
        // CPA counted 10 more; another collector popped 4 of them.
        assert_eq!(
            read(&mut r, 110, 506),
            Some(0),
            "CPA's newest counts wait one read"
        );
        assert_eq!(read(&mut r, 110, 506), Some(4));
        // While records are in flight they hide a loss as large; it shows again once they
        // are in, and stays while both sides count the same records.
        assert_eq!(read(&mut r, 130, 526), Some(0));
        assert_eq!(read(&mut r, 130, 526), Some(4));
        assert_eq!(read(&mut r, 130, 526), Some(4));
    }

    #[test]
    fn records_in_flight_are_not_losses() {
        let mut r = Reconciler::default();
        read(&mut r, 100, 500);
        // Each read, CPA has counted 20 records that the drain loop pops only after the read.
        for i in 1..10 {
            assert_eq!(read(&mut r, 100 + 20 * i, 500 + 20 * (i - 1)), Some(0));
        }
        assert_eq!(read(&mut r, 280, 680), Some(0), "drained");
    }

    #[test]
    fn a_cpa_restart_starts_a_new_baseline() {
        let mut r = Reconciler::default();
        read(&mut r, 100, 500);
        read(&mut r, 110, 506);
        assert_eq!(read(&mut r, 110, 506), Some(4));
        // CPA restarts: its counts start from 0, ours keep theirs.
        assert_eq!(read(&mut r, 3, 509), Some(0));
        assert_eq!(read(&mut r, 13, 519), Some(0));
        assert_eq!(read(&mut r, 13, 519), Some(0));
        read(&mut r, 20, 521);
        assert_eq!(
            read(&mut r, 20, 521),
            Some(5),
            "a loss after the restart counts"
        );
    }

    #[test]
    fn a_restart_is_seen_on_any_credential_and_resets_all() {
        let mut r = Reconciler::default();
        let both = |a: u64, b: u64| vec![count(A, a, 0), count(B, b, 0)];
        r.observe(both(100, 5), &ours(&[(A, 100), (B, 5)]));
        r.observe(both(120, 5), &ours(&[(A, 110), (B, 5)]));
        // CPA restarted and A is busy enough to be past its old count already; B shows it.
        let out = r.observe(both(150, 1), &ours(&[(A, 260), (B, 6)]));
        assert_eq!(out[0].unaccounted, Some(0));
        let out = r.observe(both(150, 1), &ours(&[(A, 260), (B, 6)]));
        assert_eq!(
            out[0].unaccounted,
            Some(0),
            "A's old loss went with the old baseline"
        );
    }

    #[test]
    fn an_exporter_restart_starts_from_its_persisted_counts() {
        let mut before = Reconciler::default();
        read(&mut before, 100, 500);
        // The exporter restarts: a new reconciler, our counts as persisted, CPA's went on.
        let mut after = Reconciler::default();
        assert_eq!(read(&mut after, 180, 520), Some(0));
        assert_eq!(read(&mut after, 190, 530), Some(0));
        assert_eq!(read(&mut after, 190, 530), Some(0));
    }

    #[test]
    fn a_backlog_popped_after_the_baseline_does_not_hide_later_losses() {
        let mut r = Reconciler::default();
        // 50 records queued while the exporter was down are popped after the first read.
        read(&mut r, 200, 1000);
        assert_eq!(read(&mut r, 200, 1050), Some(0));
        // Quiet for an interval: the -50 was the baseline's error and is absorbed.
        assert_eq!(read(&mut r, 200, 1050), Some(0));
        read(&mut r, 210, 1053);
        assert_eq!(read(&mut r, 210, 1053), Some(7), "7 of 10 went elsewhere");
    }

    #[test]
    fn retired_series_start_a_new_baseline() {
        let mut r = Reconciler::default();
        read(&mut r, 100, 500);
        assert_eq!(read(&mut r, 100, 0), Some(0));
        assert_eq!(read(&mut r, 110, 10), Some(0));
        assert_eq!(read(&mut r, 110, 10), Some(0));
    }

    #[test]
    fn unjoined_credentials_show_counts_but_no_difference_and_keep_no_baseline() {
        let mut r = Reconciler::default();
        let mut c = count(B, 9, 1);
        c.joined = false;
        let out = r.observe(vec![c], &ours(&[]));
        assert_eq!(out[0].unaccounted, None);
        assert_eq!(out[0].cpa.attempts(), 10);
        assert!(r.baselines.is_empty());
    }

    #[test]
    fn an_api_key_joins_under_the_index_records_were_counted_for() {
        let key = |indexes: [&str; 2]| KeyUsage {
            provider: "fakeup".to_owned(),
            auth_index: indexes.map(str::to_owned),
            success: 3,
            failed: 2,
        };
        let counted = ours(&[("old0000000000000", 4)]);
        let c = cpa_counts(&[], &[key(["v7", "old0000000000000"])], &counted);
        assert_eq!(c[0].credential, "old0000000000000");
        assert!(c[0].joined);
        let c = cpa_counts(&[], &[key(["v7", "older"])], &counted);
        assert_eq!((c[0].credential.as_str(), c[0].joined), ("v7", false));
    }

    #[test]
    fn our_attempts_are_summed_by_credential_over_the_other_labels() {
        use crate::families::set::{LabelSet, Requests};
        use crate::store::Stored;
        let mut state = State::default();
        for (model, credential, n) in [("m1", A, 3u64), ("m2", A, 4), ("m1", B, 5)] {
            let labels = Requests {
                provider: "codex",
                model,
                requested_model: model,
                credential,
                api_key: "k",
                endpoint: "e",
            }
            .values();
            let stored = Stored {
                id: 0,
                value: Value::Counter(n),
                created_at: None,
                exemplars: Default::default(),
            };
            state.families[Family::Requests as usize].insert(labels, stored);
        }
        assert_eq!(attempts_by_credential(&state), ours(&[(A, 7), (B, 5)]));
    }
}
