//! `/metrics`: stored counters and histograms written straight from the state on every scrape
//! ([`render`]), plus live gauges and counters of the exporter itself ([`Live`]).

pub mod budget;
pub mod cpa_view;
pub mod cred_errors;
mod labels;
mod process;
mod quota;
pub mod reconcile;
pub mod render;
pub mod sink;
pub mod text;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;

use crate::families::Family;
use crate::series::Hist;
use crate::store::State;
use crate::time::unix_now;
pub use labels::LabelOptions;
use text::{Meta, Writer};

use crate::families::meta::live::{
    CPA_UP, CREDENTIAL_REFRESHES, DRAIN_GAP, DRAIN_GAPS, EVENT_LOG_FAILURES, EVENT_LOG_LINES,
    OPEN_REQUESTS, POLLS, POLL_DURATION, REQUESTS_FORCED_CLOSED, SERIES_OVERFLOW, SERIES_RETIRED,
    STORE_ERRORS, STORE_HEALTHY, SUBSCRIBED, SUBSCRIPTION_DROPS, SUBSCRIPTION_GAP,
};

/// Buckets of `cpa_exporter_poll_duration_seconds`.
const POLL_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

type OneLabel = [(&'static str, &'static str); 1];

/// Metrics that live only in this process (reset on restart).
#[derive(Debug)]
pub struct Live {
    pub cpa_up: Gauge,
    pub polls: MetricFamily<OneLabel, Counter>,
    pub poll_duration: PollDuration,
    pub series_overflow: MetricFamily<OneLabel, Counter>,
    pub store_errors: Counter,
    /// Series deleted by `series-retirement`, per family.
    pub series_retired: MetricFamily<OneLabel, Counter>,
    /// Stretches without a successful pop longer than CPA's queue retention, and their
    /// seconds beyond it (see [`crate::pipeline::gap`]).
    pub drain_gaps: Counter,
    pub drain_gap_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Inbound requests whose last attempt failed, waiting for a failover attempt.
    pub open_requests: Gauge,
    /// Open inbound requests finished without waiting for their window, by reason.
    pub requests_forced_closed: MetricFamily<OneLabel, Counter>,
    /// The event log's lines, written and not (exported only when the log is on).
    pub event_log: EventLogCounts,
    /// The usage subscription (exported only with transport subscribe).
    pub subscription: SubscriptionCounts,
    /// CPA's errors channel: failed attempts per credential (exported with subscribe or auto).
    pub credential_errors: cred_errors::CredentialErrors,
    /// CPA said its credentials changed: the management poller reads them again.
    pub credentials_changed: tokio::sync::Notify,
    /// Last successful poll, Unix seconds as f64 bits; 0 = never.
    last_success_bits: AtomicU64,
    store_healthy: AtomicBool,
    /// Why the state database's path no longer names the file opened (deleted or replaced):
    /// set once, for the process's life.
    store_lost: Mutex<Option<String>>,
    /// What the drain loop last learned about the management key: 0 unknown, 1 accepted,
    /// 2 refused. Other management calls wait for 1, so a wrong key is not tried twice.
    key_state: std::sync::atomic::AtomicU8,
    /// The drain loop's idle wait for the transport in use, in milliseconds; 0 = not yet known.
    idle_ms: AtomicU64,
}

/// What became of the event log's lines ([`crate::pipeline::events`]).
#[derive(Debug, Default)]
pub struct EventLogCounts {
    enabled: AtomicBool,
    lines: Counter,
    failures: MetricFamily<OneLabel, Counter>,
}

/// The usage subscription's state as the drain loop last read it from its source.
#[derive(Debug, Default)]
pub struct SubscriptionCounts {
    enabled: AtomicBool,
    status: Mutex<crate::cpa::subscribe::Status>,
}

impl SubscriptionCounts {
    /// Take the source's latest status; returns how many refresh notices are new.
    pub fn update(&self, status: crate::cpa::subscribe::Status) -> u64 {
        self.enabled.store(true, Ordering::Relaxed);
        let mut last = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let new_refreshes = status.refreshes.saturating_sub(last.refreshes);
        *last = status;
        new_refreshes
    }

    pub fn get(&self) -> Option<crate::cpa::subscribe::Status> {
        self.enabled
            .load(Ordering::Relaxed)
            .then(|| *self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn encode(&self, w: &mut Writer) {
        let Some(s) = self.get() else {
            return;
        };
        w.declare(&SUBSCRIBED);
        w.gauge(SUBSCRIBED.name, &[], i64::from(s.subscribed));
        w.declare(&SUBSCRIPTION_DROPS);
        w.counter(SUBSCRIPTION_DROPS.name, &[], s.drops);
        w.declare(&SUBSCRIPTION_GAP);
        w.counter(SUBSCRIPTION_GAP.name, &[], s.gap_seconds);
        w.declare(&CREDENTIAL_REFRESHES);
        w.counter(CREDENTIAL_REFRESHES.name, &[], s.refreshes);
    }
}

/// `reason` values of `cpa_exporter_event_log_failures_total`.
pub mod event_log_reason {
    /// The writer was behind by a full queue of batches: their lines were dropped.
    pub const QUEUE_FULL: &str = "queue_full";
    /// Writing (or rotating) failed: disk full, permissions, a closed stdout.
    pub const WRITE: &str = "write";
    pub const ALL: [&str; 2] = [QUEUE_FULL, WRITE];
}

impl EventLogCounts {
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn written(&self, lines: u64) {
        self.lines.inc_by(lines);
    }

    pub fn failed(&self, reason: &'static str, lines: u64) {
        self.failures
            .get_or_create(&[("reason", reason)])
            .inc_by(lines);
    }

    fn encode(&self, w: &mut Writer) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        w.declare(&EVENT_LOG_LINES);
        w.counter(EVENT_LOG_LINES.name, &[], self.lines.get());
        w.declare(&EVENT_LOG_FAILURES);
        for reason in event_log_reason::ALL {
            let set = [("reason", reason)];
            w.counter(
                EVENT_LOG_FAILURES.name,
                &set,
                self.failures.get_or_create(&set).get(),
            );
        }
    }
}

/// Every `result` of `cpa_exporter_polls_total`, exported from zero so `rate()` sees the first one.
pub const POLL_RESULTS: [&str; 6] = [
    "success",
    "unreachable",
    "unauthorized",
    "management_disabled",
    "http_error",
    "bad_response",
];

impl Default for Live {
    fn default() -> Self {
        let live = Live {
            cpa_up: Gauge::default(),
            polls: MetricFamily::default(),
            poll_duration: PollDuration::default(),
            series_overflow: MetricFamily::default(),
            store_errors: Counter::default(),
            series_retired: MetricFamily::default(),
            drain_gaps: Counter::default(),
            drain_gap_seconds: Counter::default(),
            open_requests: Gauge::default(),
            requests_forced_closed: MetricFamily::default(),
            event_log: EventLogCounts::default(),
            subscription: SubscriptionCounts::default(),
            credential_errors: cred_errors::CredentialErrors::default(),
            credentials_changed: tokio::sync::Notify::new(),
            last_success_bits: AtomicU64::new(0),
            store_healthy: AtomicBool::new(true),
            store_lost: Mutex::new(None),
            key_state: std::sync::atomic::AtomicU8::new(0),
            idle_ms: AtomicU64::new(0),
        };
        // Counters start at zero rather than appearing with their first increment, so alerts
        // and dashboards see every series (as node_exporter and statsd_exporter do).
        for result in POLL_RESULTS {
            let _ = live.polls.get_or_create(&[("result", result)]);
        }
        for family in Family::ALL.into_iter().filter(|f| f.is_capped()) {
            let _ = live
                .series_overflow
                .get_or_create(&[("family", family.id())]);
            let _ = live
                .series_retired
                .get_or_create(&[("family", family.id())]);
        }
        for family in other_capped() {
            let _ = live.series_overflow.get_or_create(&[("family", family)]);
        }
        live
    }
}

/// Capped families outside [`Family`]: quota gauges, the credential errors counter and the
/// credentials listing's gauges.
fn other_capped() -> impl Iterator<Item = &'static str> {
    crate::ingest::quota::FAMILIES
        .into_iter()
        .chain([cred_errors::FAMILY])
        .chain(cpa_view::capped_families())
}

/// `cpa_exporter_poll_duration_seconds`.
#[derive(Debug)]
pub struct PollDuration(Mutex<Hist>);

impl Default for PollDuration {
    fn default() -> Self {
        PollDuration(Mutex::new(Hist::new(&POLL_BUCKETS)))
    }
}

impl PollDuration {
    pub fn observe(&self, seconds: f64) {
        self.get().observe(&POLL_BUCKETS, seconds);
    }

    fn get(&self) -> MutexGuard<'_, Hist> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Live {
    pub fn record_poll(&self, result: &'static str, took: Duration) {
        self.polls.get_or_create(&[("result", result)]).inc();
        self.poll_duration.observe(took.as_secs_f64());
        let ok = result == "success";
        self.cpa_up.set(i64::from(ok));
        if ok {
            self.last_success_bits
                .store(unix_now().to_bits(), Ordering::Relaxed);
        }
    }

    pub fn last_success(&self) -> Option<f64> {
        let bits = self.last_success_bits.load(Ordering::Relaxed);
        (bits != 0).then(|| f64::from_bits(bits))
    }

    pub fn set_store_healthy(&self, healthy: bool) {
        self.store_healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn store_healthy(&self) -> bool {
        self.store_healthy.load(Ordering::Relaxed)
    }

    /// The state database's file was deleted or replaced: `why` names it.
    pub fn set_store_lost(&self, why: String) {
        *self.store_lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Why the state database's path no longer names the file opened, if it does not.
    pub fn store_lost(&self) -> Option<String> {
        self.store_lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Called by the drain loop: `true` after a successful pop, `false` after a 401/403.
    pub fn set_key_accepted(&self, accepted: bool) {
        self.key_state
            .store(if accepted { 1 } else { 2 }, Ordering::Relaxed);
    }

    pub fn set_idle_interval(&self, idle: Duration) {
        let ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        self.idle_ms.store(ms, Ordering::Relaxed);
    }

    /// The drain loop's idle wait, once it has polled successfully.
    pub fn idle_interval(&self) -> Option<Duration> {
        let ms = self.idle_ms.load(Ordering::Relaxed);
        (ms != 0).then(|| Duration::from_millis(ms))
    }

    /// `None` until the drain loop has heard from CPA about the key.
    pub fn key_accepted(&self) -> Option<bool> {
        match self.key_state.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }
}

/// What the drain loop commits: the stored state that scrapes render. Read by scrapes
/// (concurrently, a chunk of series at a time, never across the network), written by the drain
/// loop only to apply a committed batch or a retirement. Writers are preferred: a waiting write
/// holds back new readers, so a crowd of scrapes delays ingestion by at most the chunks being
/// rendered.
#[derive(Debug)]
pub struct Committed(RwLock<State>);

impl Committed {
    pub fn new(state: State) -> Committed {
        Committed(RwLock::new(state))
    }

    /// The committed state. A panic elsewhere while holding the lock must not stop scrapes.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed state, to change it (the drain loop, after a commit).
    pub fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the management poller observes about CPA itself (build, settings, credentials).
#[derive(Debug, Default)]
pub struct Observed(Mutex<cpa_view::CpaView>);

impl Observed {
    pub fn get(&self) -> MutexGuard<'_, cpa_view::CpaView> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What rendering needs besides the data; fixed at start.
#[derive(Debug)]
pub struct View {
    pub labels: LabelOptions,
    /// For the database size gauge.
    pub db_path: PathBuf,
}

/// What the loops and the HTTP server share, by owner: the drain loop writes `committed`, the
/// management poller `observed`, both their own counters in `live`; `view` never changes.
/// Prices are no part of it: they travel with the drain loop, the only one that ingests.
#[derive(Debug)]
pub struct Shared {
    pub committed: Committed,
    pub observed: Observed,
    pub live: Live,
    pub view: View,
}

impl Shared {
    pub fn new(state: State, labels: LabelOptions, db_path: PathBuf) -> Shared {
        Shared {
            committed: Committed::new(state),
            observed: Observed::default(),
            live: Live::default(),
            view: View { labels, db_path },
        }
    }
}

/// The live metrics, in the order they were registered before the exposition was streamed.
fn encode_live(w: &mut Writer, live: &Live) {
    w.declare(&CPA_UP);
    w.gauge(CPA_UP.name, &[], live.cpa_up.get());
    w.declare(&POLLS);
    for result in POLL_RESULTS {
        let n = live.polls.get_or_create(&[("result", result)]).get();
        w.counter(POLLS.name, &[("result", result)], n);
    }
    w.declare(&POLL_DURATION);
    {
        let h = live.poll_duration.get();
        w.histogram(
            POLL_DURATION.name,
            &[],
            &POLL_BUCKETS,
            &h.buckets,
            h.sum,
            h.count,
            None,
        );
    }
    let per_family = |w: &mut Writer,
                      meta: &Meta,
                      counters: &MetricFamily<OneLabel, Counter>,
                      extra: &[&'static str]| {
        w.declare(meta);
        let capped = Family::ALL
            .into_iter()
            .filter(|f| f.is_capped())
            .map(|f| f.id());
        for family in capped.chain(extra.iter().copied()) {
            let set = [("family", family)];
            w.counter(meta.name, &set, counters.get_or_create(&set).get());
        }
    };
    let others: Vec<&'static str> = other_capped().collect();
    per_family(w, &SERIES_OVERFLOW, &live.series_overflow, &others);
    w.declare(&STORE_ERRORS);
    w.counter(STORE_ERRORS.name, &[], live.store_errors.get());
    w.declare(&STORE_HEALTHY);
    let healthy = live.store_healthy() && live.store_lost().is_none();
    w.gauge(STORE_HEALTHY.name, &[], i64::from(healthy));
    per_family(w, &SERIES_RETIRED, &live.series_retired, &[]);
    w.declare(&DRAIN_GAPS);
    w.counter(DRAIN_GAPS.name, &[], live.drain_gaps.get());
    w.declare(&DRAIN_GAP);
    w.counter(DRAIN_GAP.name, &[], live.drain_gap_seconds.get());
    w.declare(&OPEN_REQUESTS);
    w.gauge(OPEN_REQUESTS.name, &[], live.open_requests.get());
    w.declare(&REQUESTS_FORCED_CLOSED);
    for reason in crate::store::chains::forced::ALL {
        let set = [("reason", reason)];
        let n = live.requests_forced_closed.get_or_create(&set).get();
        w.counter(REQUESTS_FORCED_CLOSED.name, &set, n);
    }
    live.event_log.encode(w);
    live.subscription.encode(w);
    live.credential_errors.encode(w);
}
