//! Failover grouping: upstream attempts -> inbound requests.
//!
//! CPA writes one record per upstream attempt; the attempts of one inbound request (retries and
//! failovers) share its `request_id`, which is only 32 random bits. Attempts are grouped by
//! [`crate::ingest::request_key`] (client key + `request_id`) into a *chain* while each next
//! attempt starts within the failover window of the previous one's end:
//!
//! - a successful attempt finishes its chain: one inbound request (labels of the chain's first
//!   attempt) and one absorbed failover per earlier failed attempt (labels of that attempt);
//! - a chain whose last attempt failed stays open; it is finished as a client-visible failure
//!   (status of its last attempt) once the exporter has caught up with the queue and the window
//!   has passed on the store's clock since that failure was drained, or at once when an attempt
//!   with its key starts too late to continue it;
//! - a record with the key and start time of an attempt already seen (the codex image tool's
//!   record) is an attempt, but neither a new request nor a change of outcome: finished chains
//!   are remembered for the window so it is recognised.
//!
//! Planning never changes [`Chains`]: [`Chains::plan`] returns what a batch leads to, the store
//! writes it in the batch's transaction and applies it after the commit, so a restart in the
//! middle of a chain continues it exactly. See docs/guarantees.md for the limits.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::families::{set, Family};
use crate::ingest::{Attempt, Delta};

/// Default of the `failover-window` setting.
pub const DEFAULT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Default bound on open chains (as many as a capped family has series).
pub const DEFAULT_OPEN_LIMIT: usize = 10_000;
/// Failed attempts one chain holds; a longer chain is finished as a client failure.
pub const MAX_FAILED_ATTEMPTS: usize = 64;
/// Start times remembered per chain for recognising tool records.
const MAX_STARTS: usize = 16;

/// `reason` values of `cpa_exporter_requests_forced_closed_total`.
pub mod forced {
    /// More open chains than the limit: the oldest was finished as it stood.
    pub const LIMIT: &str = "limit";
    /// A chain reached [`super::MAX_FAILED_ATTEMPTS`] failed attempts.
    pub const ATTEMPTS: &str = "attempts";
    pub const ALL: [&str; 2] = [LIMIT, ATTEMPTS];
}

/// A failed attempt waiting for its request's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    pub provider: Box<str>,
    pub model: Box<str>,
    pub credential: Box<str>,
    pub status_code: u16,
}

/// An open inbound request: its last attempt failed. Stored as JSON (label values only; the
/// `request_id` is not in it, the key is a one-way hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chain {
    /// Labels of the request: those of its first attempt.
    pub requested_model: Box<str>,
    pub api_key: Box<str>,
    /// Start times of its attempts (the latest [`MAX_STARTS`]).
    pub starts: Vec<f64>,
    pub last_start: f64,
    /// Latest end (start + latency) among its attempts.
    pub last_end: f64,
    /// Its failed attempts, oldest first; never empty in an open chain.
    pub failed: Vec<Failed>,
    /// Store time ([`crate::store::Store::now`]) when its last failed attempt was drained.
    pub drained_at: f64,
}

/// A finished request, remembered for the window: the start times of its attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub starts: Vec<f64>,
    /// Store time ([`crate::store::Store::now`]) when it finished.
    pub at: f64,
}

/// The grouping state: open chains and recently finished requests, by request key.
#[derive(Debug, Clone)]
pub struct Chains {
    window: f64,
    open_limit: usize,
    open: HashMap<u64, Chain>,
    finished: HashMap<u64, Finished>,
    /// Finished keys in the order they finished, for expiry.
    finished_order: VecDeque<(f64, u64)>,
}

/// What a batch does to the chains and to the inbound-request families.
#[derive(Debug, Default)]
pub struct ChainPlan {
    /// Increments of the inbound-request, inbound-failure and failover families.
    pub delta: Delta,
    /// Chains closed without a successor, by `reason` ([`forced`]).
    pub forced: Vec<(&'static str, u64)>,
    /// Per attempt of the batch, in order: whether it followed a failed attempt of the same
    /// inbound request (a failover or retry), for the event log.
    pub failover: Vec<bool>,
    /// Open chains after the batch.
    open_after: usize,
    /// Open chains to write (new or changed) and to delete.
    pub(super) upserts: Vec<(u64, Chain)>,
    pub(super) deletes: Vec<u64>,
    /// Requests finished by the batch.
    pub(super) finished: Vec<(u64, Finished)>,
    /// Finished requests before this store time are forgotten.
    pub(super) forget_before: f64,
}

impl ChainPlan {
    pub fn open_count(&self) -> usize {
        self.open_after
    }
}

impl Chains {
    pub fn new(window: std::time::Duration, open_limit: usize) -> Chains {
        Chains {
            window: window.as_secs_f64(),
            open_limit: open_limit.max(1),
            open: HashMap::new(),
            finished: HashMap::new(),
            finished_order: VecDeque::new(),
        }
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Restore an open chain (loading).
    pub(super) fn restore_open(&mut self, key: u64, chain: Chain) {
        self.open.insert(key, chain);
    }

    /// Restore a finished request (loading, oldest first).
    pub(super) fn restore_finished(&mut self, key: u64, finished: Finished) {
        self.finished_order.push_back((finished.at, key));
        self.finished.insert(key, finished);
    }

    /// The latest time the grouping holds (0 for none): when a chain or request was drained.
    pub(super) fn latest(&self) -> f64 {
        let open = self.open.values().map(|c| c.drained_at);
        let finished = self.finished.values().map(|f| f.at);
        open.chain(finished).fold(0.0, f64::max)
    }

    /// Whether a batch without records would change anything at `now`: an open chain or a
    /// finished request is due to expire.
    pub fn due(&self, now: f64) -> bool {
        self.open.values().any(|c| now - c.drained_at > self.window)
            || self
                .finished_order
                .front()
                .is_some_and(|(at, _)| now - at > self.window)
    }

    /// Group `attempts` (in queue order) drained at store time `now`. With `caught_up`, open
    /// chains whose window has passed are finished as client-visible failures after them.
    pub fn plan(&self, attempts: &[Attempt], now: f64, caught_up: bool) -> ChainPlan {
        let mut work = Work {
            chains: self,
            plan: ChainPlan {
                forget_before: f64::NEG_INFINITY,
                ..ChainPlan::default()
            },
            changes: HashMap::new(),
            finished_now: HashMap::new(),
            now,
            forced: HashMap::new(),
        };
        for a in attempts {
            work.attempt(a);
        }
        if caught_up {
            let due: Vec<u64> = work
                .open()
                .filter(|(_, c)| now - c.drained_at > self.window)
                .map(|(k, _)| k)
                .collect();
            for key in due {
                work.close_failed(key, None);
            }
            work.plan.forget_before = now - self.window;
        }
        let open = work.open_count();
        if open > self.open_limit {
            let mut by_age: Vec<(f64, u64)> = work.open().map(|(k, c)| (c.drained_at, k)).collect();
            by_age.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let excess = open - self.open_limit;
            for (_, key) in by_age.into_iter().take(excess) {
                work.close_failed(key, Some(forced::LIMIT));
            }
        }
        work.finish()
    }

    /// Make a committed plan the state.
    pub fn apply(&mut self, plan: ChainPlan) {
        for (key, chain) in plan.upserts {
            self.open.insert(key, chain);
        }
        for key in plan.deletes {
            self.open.remove(&key);
        }
        for (key, f) in plan.finished {
            self.finished_order.push_back((f.at, key));
            self.finished.insert(key, f);
        }
        // Keep the finished requests within the window, and at most as many as the open limit
        // (a recognition aid only: forgetting one early counts a late tool record as a request;
        // about 120 bytes each, so the bound is about 1.2 MB at the default limit).
        let max_finished = self.open_limit;
        while let Some(&(at, key)) = self.finished_order.front() {
            if at >= plan.forget_before && self.finished_order.len() <= max_finished {
                break;
            }
            self.finished_order.pop_front();
            if self.finished.get(&key).is_some_and(|f| f.at == at) {
                self.finished.remove(&key);
            }
        }
    }
}

/// One batch's grouping in progress.
struct Work<'c> {
    chains: &'c Chains,
    plan: ChainPlan,
    /// Open chains the batch changed (`None`: closed), over `chains.open`: planning copies
    /// only the chains it touches.
    changes: HashMap<u64, Option<Chain>>,
    /// Requests finished within this batch (they shadow `chains.finished`).
    finished_now: HashMap<u64, Finished>,
    now: f64,
    forced: HashMap<&'static str, u64>,
}

impl Work<'_> {
    fn get(&self, key: u64) -> Option<&Chain> {
        match self.changes.get(&key) {
            Some(changed) => changed.as_ref(),
            None => self.chains.open.get(&key),
        }
    }

    fn get_mut(&mut self, key: u64) -> Option<&mut Chain> {
        if !self.changes.contains_key(&key) {
            let base = self.chains.open.get(&key)?.clone();
            self.changes.insert(key, Some(base));
        }
        self.changes.get_mut(&key)?.as_mut()
    }

    fn insert(&mut self, key: u64, chain: Chain) {
        self.changes.insert(key, Some(chain));
    }

    fn remove(&mut self, key: u64) -> Option<Chain> {
        let chain = match self.changes.get_mut(&key) {
            Some(changed) => changed.take(),
            None => self.chains.open.get(&key).cloned(),
        };
        self.changes.insert(key, None);
        chain
    }

    /// The open chains as the batch has left them so far.
    fn open(&self) -> impl Iterator<Item = (u64, &Chain)> {
        let unchanged = self
            .chains
            .open
            .iter()
            .filter(|(k, _)| !self.changes.contains_key(k));
        let changed = self
            .changes
            .iter()
            .filter_map(|(k, c)| c.as_ref().map(|c| (k, c)));
        unchanged.chain(changed).map(|(k, c)| (*k, c))
    }

    fn open_count(&self) -> usize {
        let base = &self.chains.open;
        let added = self
            .changes
            .iter()
            .filter(|(k, c)| c.is_some() && !base.contains_key(k))
            .count();
        let removed = self
            .changes
            .iter()
            .filter(|(k, c)| c.is_none() && base.contains_key(k))
            .count();
        base.len() + added - removed
    }

    fn attempt(&mut self, a: &Attempt) {
        self.plan.failover.push(false);
        let (Some(key), Some(start)) = (a.request_key, a.started) else {
            // Nothing links it to other attempts: a request of its own.
            self.count_request(&a.route.requested_model, &a.route.api_key);
            if a.failed {
                self.count_failure(&a.route.requested_model, &a.route.api_key, a.status_code);
            }
            return;
        };
        let end = a.ended().unwrap_or(start);
        if self.is_known_attempt(key, start) {
            return;
        }
        if let Some(chain) = self.get(key) {
            let window = self.chains.window;
            if start >= chain.last_start && start <= chain.last_end + window {
                if let Some(last) = self.plan.failover.last_mut() {
                    *last = true;
                }
                self.continue_chain(key, a, start, end);
                return;
            }
            // Its successor would have started within the window: this is another request.
            self.close_failed(key, None);
        }
        self.start_chain(key, a, start, end);
    }

    /// The start time of an attempt already seen under this key (open or recently finished).
    fn is_known_attempt(&self, key: u64, start: f64) -> bool {
        if let Some(c) = self.get(key) {
            if c.starts.contains(&start) {
                return true;
            }
        }
        self.finished_now
            .get(&key)
            .or_else(|| self.chains.finished.get(&key))
            .is_some_and(|f| f.starts.contains(&start))
    }

    fn start_chain(&mut self, key: u64, a: &Attempt, start: f64, end: f64) {
        if !a.failed {
            self.count_request(&a.route.requested_model, &a.route.api_key);
            self.remember_finished(key, vec![start]);
            return;
        }
        let chain = Chain {
            requested_model: a.route.requested_model.clone(),
            api_key: a.route.api_key.clone(),
            starts: vec![start],
            last_start: start,
            last_end: end,
            failed: vec![failed_of(a)],
            drained_at: self.now,
        };
        self.insert(key, chain);
    }

    fn continue_chain(&mut self, key: u64, a: &Attempt, start: f64, end: f64) {
        let now = self.now;
        let Some(chain) = self.get_mut(key) else {
            return;
        };
        if chain.starts.len() >= MAX_STARTS {
            chain.starts.remove(0);
        }
        chain.starts.push(start);
        chain.last_start = start;
        chain.last_end = chain.last_end.max(end);
        if !a.failed {
            self.close_succeeded(key);
            return;
        }
        if chain.failed.len() >= MAX_FAILED_ATTEMPTS {
            self.close_failed(key, Some(forced::ATTEMPTS));
            self.start_chain(key, a, start, end);
            return;
        }
        chain.failed.push(failed_of(a));
        chain.drained_at = now;
    }

    /// The request succeeded: its earlier failed attempts were absorbed.
    fn close_succeeded(&mut self, key: u64) {
        let Some(chain) = self.remove(key) else {
            return;
        };
        self.count_request(&chain.requested_model, &chain.api_key);
        for f in &chain.failed {
            let status = f.status_code.to_string();
            let labels = set::FailoverAttempts {
                provider: &f.provider,
                model: &f.model,
                credential: &f.credential,
                status_code: &status,
            };
            self.plan
                .delta
                .add_count(Family::FailoverAttempts, &labels, 1);
        }
        self.remember_finished(key, chain.starts);
    }

    /// No successor came: the client saw the last attempt's failure.
    fn close_failed(&mut self, key: u64, reason: Option<&'static str>) {
        let Some(chain) = self.remove(key) else {
            return;
        };
        self.count_request(&chain.requested_model, &chain.api_key);
        let status = chain.failed.last().map_or(500, |f| f.status_code);
        self.count_failure(&chain.requested_model, &chain.api_key, status);
        if let Some(reason) = reason {
            *self.forced.entry(reason).or_default() += 1;
        }
        self.remember_finished(key, chain.starts);
    }

    fn remember_finished(&mut self, key: u64, starts: Vec<f64>) {
        let f = Finished {
            starts,
            at: self.now,
        };
        self.finished_now.insert(key, f);
    }

    fn count_request(&mut self, requested_model: &str, api_key: &str) {
        let labels = set::InboundRequests {
            requested_model,
            api_key,
        };
        self.plan
            .delta
            .add_count(Family::InboundRequests, &labels, 1);
    }

    fn count_failure(&mut self, requested_model: &str, api_key: &str, status: u16) {
        let status = status.to_string();
        let labels = set::InboundFailures {
            requested_model,
            api_key,
            status_code: &status,
        };
        self.plan
            .delta
            .add_count(Family::InboundFailures, &labels, 1);
    }

    fn finish(mut self) -> ChainPlan {
        self.plan.open_after = self.open_count();
        let base = &self.chains.open;
        for (key, change) in std::mem::take(&mut self.changes) {
            match change {
                Some(chain) => self.plan.upserts.push((key, chain)),
                None if base.contains_key(&key) => self.plan.deletes.push(key),
                None => {}
            }
        }
        self.plan.upserts.sort_by_key(|(k, _)| *k);
        self.plan.deletes.sort_unstable();
        self.plan.finished = self.finished_now.into_iter().collect();
        self.plan
            .finished
            .sort_by(|a, b| a.1.at.total_cmp(&b.1.at).then(a.0.cmp(&b.0)));
        let mut forced: Vec<_> = self.forced.into_iter().collect();
        forced.sort_unstable();
        self.plan.forced = forced;
        self.plan
    }
}

fn failed_of(a: &Attempt) -> Failed {
    Failed {
        provider: a.route.provider.clone(),
        model: a.route.model.clone(),
        credential: a.route.credential.clone(),
        status_code: a.status_code,
    }
}

/// Finished requests of one batch as stored: per request its key (8 bytes), the number of its
/// start times (1 byte) and those (8 bytes each), little-endian.
pub(super) fn encode_finished(finished: &[(u64, Finished)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, f) in finished {
        out.extend_from_slice(&key.to_le_bytes());
        let starts = &f.starts[f.starts.len().saturating_sub(MAX_STARTS)..];
        out.push(starts.len() as u8);
        for s in starts {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
    out
}

pub(super) fn decode_finished(blob: &[u8], at: f64) -> Option<Vec<(u64, Finished)>> {
    let mut out = Vec::new();
    let mut rest = blob;
    let word = |b: &[u8]| -> Option<[u8; 8]> { b.get(..8)?.try_into().ok() };
    while !rest.is_empty() {
        let key = u64::from_le_bytes(word(rest)?);
        let n = usize::from(*rest.get(8)?);
        rest = &rest[9..];
        let mut starts = Vec::with_capacity(n);
        for _ in 0..n {
            starts.push(f64::from_le_bytes(word(rest)?));
            rest = &rest[8..];
        }
        out.push((key, Finished { starts, at }));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{RequestId, Route};
    use crate::series::Value;
    use std::sync::Arc;

    fn route(provider: &str, model: &str, requested: &str, credential: &str) -> Arc<Route> {
        Arc::new(Route {
            provider: provider.into(),
            model: model.into(),
            requested_model: requested.into(),
            credential: credential.into(),
            api_key: "sha256:k".into(),
            endpoint: "POST /v1/responses".into(),
        })
    }

    fn attempt(key: u64, start: f64, latency: f64, status: u16, model: &str) -> Attempt {
        Attempt {
            started: Some(start),
            request_id: RequestId::parse("a1b2c3d4"),
            request_key: Some(key),
            route: route("codex", model, "gpt-5", &format!("cred-{model}")),
            status_code: status,
            failed: status != 200,
            latency_seconds: Some(latency),
            ttft_seconds: None,
            tokens: Default::default(),
            cost_nano_usd: None,
        }
    }

    fn count(plan: &ChainPlan, family: Family, labels: &[&str]) -> u64 {
        let labels: crate::series::LabelValues = labels.iter().map(|v| (*v).into()).collect();
        match plan.delta.families[family as usize].get(&labels) {
            Some(Value::Counter(n)) => *n,
            _ => 0,
        }
    }

    fn total(plan: &ChainPlan, family: Family) -> u64 {
        plan.delta.families[family as usize]
            .values()
            .map(|v| match v {
                Value::Counter(n) => *n,
                Value::Histogram(h) => h.count,
            })
            .sum()
    }

    fn chains() -> Chains {
        Chains::new(std::time::Duration::from_secs(60), 100)
    }

    /// Plan and apply, as a commit does.
    fn step(c: &mut Chains, attempts: &[Attempt], now: f64, caught_up: bool) -> ChainPlan {
        let mut plan = c.plan(attempts, now, caught_up);
        let delta = std::mem::take(&mut plan.delta);
        let forced = std::mem::take(&mut plan.forced);
        c.apply(plan);
        ChainPlan {
            delta,
            forced,
            ..ChainPlan::default()
        }
    }

    #[test]
    fn a_success_after_failures_is_one_request_and_absorbs_them() {
        let mut c = chains();
        let a = [
            attempt(1, 100.0, 2.0, 429, "m1"),
            attempt(1, 103.0, 1.0, 503, "m2"),
            attempt(1, 105.0, 9.0, 200, "m3"),
        ];
        let p = step(&mut c, &a, 120.0, true);
        assert_eq!(
            count(&p, Family::InboundRequests, &["gpt-5", "sha256:k"]),
            1
        );
        assert_eq!(total(&p, Family::InboundFailures), 0);
        assert_eq!(
            count(
                &p,
                Family::FailoverAttempts,
                &["codex", "m1", "cred-m1", "429"]
            ),
            1
        );
        assert_eq!(
            count(
                &p,
                Family::FailoverAttempts,
                &["codex", "m2", "cred-m2", "503"]
            ),
            1
        );
        assert_eq!(c.open_count(), 0);
    }

    #[test]
    fn attempts_after_a_failure_of_their_request_are_failovers() {
        let c = chains();
        let a = [
            attempt(1, 100.0, 2.0, 429, "m1"),
            attempt(2, 100.5, 1.0, 200, "m1"),
            attempt(1, 103.0, 1.0, 503, "m2"),
            attempt(1, 105.0, 9.0, 200, "m3"),
            // The tool record of the finished request: not a failover of anything.
            attempt(1, 105.0, 1.0, 200, "image"),
        ];
        let p = c.plan(&a, 120.0, true);
        assert_eq!(p.failover, [false, false, true, true, false]);
    }

    #[test]
    fn a_chain_spread_over_batches_finishes_when_its_success_arrives() {
        let mut c = chains();
        let p = step(&mut c, &[attempt(1, 100.0, 2.0, 429, "m1")], 103.0, true);
        assert_eq!(total(&p, Family::InboundRequests), 0);
        assert_eq!(c.open_count(), 1);
        let p = step(&mut c, &[attempt(1, 110.0, 5.0, 200, "m2")], 150.0, true);
        assert_eq!(total(&p, Family::InboundRequests), 1);
        assert_eq!(total(&p, Family::FailoverAttempts), 1);
    }

    #[test]
    fn an_all_failed_chain_is_a_client_failure_once_the_window_passed_after_catching_up() {
        let mut c = chains();
        let a = [
            attempt(1, 100.0, 2.0, 429, "m1"),
            attempt(1, 103.0, 1.0, 502, "m2"),
        ];
        step(&mut c, &a, 105.0, true);
        // Within the window, or behind on the queue: still open.
        assert_eq!(
            total(&step(&mut c, &[], 160.0, true), Family::InboundRequests),
            0
        );
        assert_eq!(
            total(&step(&mut c, &[], 500.0, false), Family::InboundRequests),
            0
        );
        assert!(c.due(500.0));
        let p = step(&mut c, &[], 500.0, true);
        assert_eq!(
            count(&p, Family::InboundRequests, &["gpt-5", "sha256:k"]),
            1
        );
        assert_eq!(
            count(&p, Family::InboundFailures, &["gpt-5", "sha256:k", "502"]),
            1
        );
        assert_eq!(total(&p, Family::FailoverAttempts), 0);
        assert_eq!(c.open_count(), 0);
    }

    #[test]
    fn a_tool_record_with_the_same_key_and_start_is_not_a_request() {
        let mut c = chains();
        let main = attempt(1, 100.0, 9.0, 200, "gpt-5");
        let tool = attempt(1, 100.0, 3.0, 200, "gpt-image-1");
        let p = step(&mut c, &[main], 110.0, true);
        assert_eq!(total(&p, Family::InboundRequests), 1);
        // In a later batch, after the request finished.
        let p = step(&mut c, std::slice::from_ref(&tool), 111.0, true);
        assert_eq!(total(&p, Family::InboundRequests), 0);
        // A failed tool record of an open chain changes nothing either.
        let mut c = chains();
        let first = attempt(2, 100.0, 1.0, 429, "m1");
        let mut failed_tool = tool;
        failed_tool.request_key = Some(2);
        failed_tool.status_code = 500;
        failed_tool.failed = true;
        let p = step(&mut c, &[first, failed_tool], 102.0, true);
        assert_eq!(total(&p, Family::InboundRequests), 0);
        let p = step(&mut c, &[attempt(2, 103.0, 1.0, 200, "m2")], 104.0, true);
        assert_eq!(total(&p, Family::FailoverAttempts), 1);
    }

    #[test]
    fn the_same_key_far_apart_in_time_is_two_requests() {
        let mut c = chains();
        let p = step(
            &mut c,
            &[
                attempt(1, 100.0, 1.0, 500, "m1"),
                attempt(1, 5_000.0, 1.0, 200, "m1"),
            ],
            5_002.0,
            true,
        );
        assert_eq!(total(&p, Family::InboundRequests), 2);
        assert_eq!(
            count(&p, Family::InboundFailures, &["gpt-5", "sha256:k", "500"]),
            1
        );
        assert_eq!(total(&p, Family::FailoverAttempts), 0);
        // After a success, a new attempt under the key is a new request.
        let p = step(
            &mut c,
            &[attempt(1, 5_003.0, 1.0, 200, "m1")],
            5_005.0,
            true,
        );
        assert_eq!(total(&p, Family::InboundRequests), 1);
    }

    #[test]
    fn records_without_a_request_id_or_time_are_requests_of_their_own() {
        let mut c = chains();
        let mut a = attempt(1, 100.0, 1.0, 429, "m1");
        a.request_key = None;
        let mut b = attempt(1, 100.0, 1.0, 200, "m1");
        b.started = None;
        let p = step(&mut c, &[a, b], 101.0, false);
        assert_eq!(total(&p, Family::InboundRequests), 2);
        assert_eq!(total(&p, Family::InboundFailures), 1);
        assert_eq!(c.open_count(), 0);
    }

    #[test]
    fn open_chains_beyond_the_limit_are_closed_oldest_first_and_counted() {
        let mut c = Chains::new(std::time::Duration::from_secs(60), 2);
        step(&mut c, &[attempt(1, 100.0, 1.0, 500, "m")], 101.0, false);
        step(&mut c, &[attempt(2, 100.0, 1.0, 500, "m")], 102.0, false);
        let p = step(&mut c, &[attempt(3, 100.0, 1.0, 500, "m")], 103.0, false);
        assert_eq!(p.forced, [(forced::LIMIT, 1)]);
        assert_eq!(total(&p, Family::InboundFailures), 1);
        assert_eq!(c.open_count(), 2);
        assert!(!c.open.contains_key(&1));
    }

    #[test]
    fn planning_changes_nothing_until_applied() {
        let c = chains();
        let plan = c.plan(&[attempt(1, 100.0, 1.0, 500, "m")], 101.0, true);
        assert_eq!(plan.open_count(), 1);
        assert_eq!(plan.upserts.len(), 1);
        assert_eq!(c.open_count(), 0);
    }

    #[test]
    fn finished_requests_round_trip_through_their_blob() {
        let f = vec![
            (
                7,
                Finished {
                    starts: vec![1.5, 2.25],
                    at: 9.0,
                },
            ),
            (
                u64::MAX,
                Finished {
                    starts: vec![],
                    at: 9.0,
                },
            ),
        ];
        assert_eq!(decode_finished(&encode_finished(&f), 9.0), Some(f));
        assert_eq!(decode_finished(&[1, 2, 3], 9.0), None);
    }
}
