//! `/metrics`: stored counters and histograms rendered by a custom collector on every scrape,
//! plus live gauges and counters of the exporter itself.

pub mod cpa;
mod process;
mod quota;
pub mod text;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::config::LabelOptions;
use crate::schema::{label, Family, Kind};
use crate::series::{LabelValues, Value};
use crate::store::{State, Store, Stored};

pub const CPA_UP: &str = "cpa_up";
pub const BUILD_INFO: &str = "cpa_exporter_build_info";
pub const POLLS: &str = "cpa_exporter_polls";
pub const POLL_DURATION: &str = "cpa_exporter_poll_duration";
pub const LAST_SUCCESS: &str = "cpa_exporter_last_success_timestamp";
pub const LAST_RECORD: &str = "cpa_exporter_last_record_timestamp";
pub const SERIES: &str = "cpa_exporter_series";
pub const SERIES_OVERFLOW: &str = "cpa_exporter_series_overflow";
pub const STORE_SIZE: &str = "cpa_exporter_store_size";
pub const STORE_ERRORS: &str = "cpa_exporter_store_errors";
pub const SERIES_RETIRED: &str = "cpa_exporter_series_retired";
pub const DRAIN_GAPS: &str = "cpa_exporter_drain_gaps";
pub const DRAIN_GAP: &str = "cpa_exporter_drain_gap";

/// Buckets of `cpa_exporter_poll_duration_seconds`.
const POLL_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

type OneLabel = [(&'static str, &'static str); 1];

/// Metrics that live only in this process (reset on restart).
#[derive(Debug)]
pub struct Live {
    pub cpa_up: Gauge,
    pub polls: MetricFamily<OneLabel, Counter>,
    pub poll_duration: Histogram,
    pub series_overflow: MetricFamily<OneLabel, Counter>,
    pub store_errors: Counter,
    /// Series deleted by `series-retirement`, per family.
    pub series_retired: MetricFamily<OneLabel, Counter>,
    /// Stretches without a successful pop longer than CPA's queue retention, and their
    /// seconds beyond it (see [`crate::gap`]).
    pub drain_gaps: Counter,
    pub drain_gap_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Last successful poll, Unix seconds as f64 bits; 0 = never.
    last_success_bits: AtomicU64,
    store_healthy: AtomicBool,
    /// What the drain loop last learned about the management key: 0 unknown, 1 accepted,
    /// 2 refused. Other management calls wait for 1, so a wrong key is not tried twice.
    key_state: std::sync::atomic::AtomicU8,
    /// The drain loop's idle wait for the transport in use, in milliseconds; 0 = not yet known.
    idle_ms: AtomicU64,
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
            poll_duration: Histogram::new(POLL_BUCKETS),
            series_overflow: MetricFamily::default(),
            store_errors: Counter::default(),
            series_retired: MetricFamily::default(),
            drain_gaps: Counter::default(),
            drain_gap_seconds: Counter::default(),
            last_success_bits: AtomicU64::new(0),
            store_healthy: AtomicBool::new(true),
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
        for family in crate::ingest::quota::FAMILIES {
            let _ = live.series_overflow.get_or_create(&[("family", family)]);
        }
        live
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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

/// What the drain loop, the collector and the HTTP server share.
#[derive(Debug)]
pub struct Shared {
    /// Read by scrapes (concurrently), written by the drain loop only to apply a committed
    /// batch. Writers are preferred: a waiting write holds back new readers, so a crowd of
    /// scrapes delays ingestion by at most the renders already under way.
    state: RwLock<State>,
    pub live: Live,
    pub labels: LabelOptions,
    pub db_path: PathBuf,
    cpa: Mutex<cpa::CpaView>,
    /// Prices for `cpa_cost_usd_total`, used by the drain loop at ingest.
    pub pricing: crate::cost::Pricing,
}

impl Shared {
    pub fn new(state: State, labels: LabelOptions, db_path: PathBuf) -> Shared {
        Shared {
            state: RwLock::new(state),
            live: Live::default(),
            labels,
            db_path,
            cpa: Mutex::default(),
            pricing: crate::cost::Pricing::embedded(),
        }
    }

    pub fn with_pricing(mut self, pricing: crate::cost::Pricing) -> Shared {
        self.pricing = pricing;
        self
    }

    /// What is known about CPA itself (build, settings, credentials).
    pub fn cpa(&self) -> MutexGuard<'_, cpa::CpaView> {
        self.cpa.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed state. A panic elsewhere while holding the lock must not stop scrapes.
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed state, to change it (the drain loop, after a commit).
    pub fn state_mut(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Build the registry served on `/metrics`.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut r = Registry::default();
    let live = &shared.live;
    r.register(
        CPA_UP,
        "Whether the last poll of CPA's usage queue succeeded (1) or not (0)",
        live.cpa_up.clone(),
    );
    r.register(
        POLLS,
        "Polls of CPA's usage queue by result",
        live.polls.clone(),
    );
    r.register_with_unit(
        POLL_DURATION,
        "Duration of one poll of CPA's usage queue, including the commit of its batch",
        Unit::Seconds,
        live.poll_duration.clone(),
    );
    r.register(
        SERIES_OVERFLOW,
        "Records whose label set was folded into the __other__ series because the family reached its series limit",
        live.series_overflow.clone(),
    );
    r.register(
        STORE_ERRORS,
        "Failed commits to the state database (the batch is kept and retried)",
        live.store_errors.clone(),
    );
    r.register(
        SERIES_RETIRED,
        "Series deleted because no record updated them within series-retirement (a returning series restarts at zero)",
        live.series_retired.clone(),
    );
    r.register(
        DRAIN_GAPS,
        "Stretches without a successful pop (between two pops, or across a restart) longer than CPA's queue retention: records queued then expired unseen",
        live.drain_gaps.clone(),
    );
    r.register_with_unit(
        DRAIN_GAP,
        "Seconds of those stretches beyond CPA's queue retention: records queued in them expired unseen",
        Unit::Seconds,
        live.drain_gap_seconds.clone(),
    );
    r.register_collector(Box::new(cpa::CpaCollector(shared.clone())));
    r.register_collector(Box::new(StoredCollector(shared)));
    r.register_collector(Box::new(process::ProcessCollector));
    r
}

#[derive(Debug)]
struct StoredCollector(Arc<Shared>);

/// A metric name and the unit OpenMetrics wants declared for its suffix.
fn split_unit(name: &str) -> (&str, Option<Unit>) {
    if let Some(base) = name.strip_suffix("_seconds") {
        (base, Some(Unit::Seconds))
    } else if let Some(base) = name.strip_suffix("_bytes") {
        (base, Some(Unit::Bytes))
    } else {
        (name, None)
    }
}

pub(crate) fn encode_gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    m.encode_gauge(&value)
}

impl prometheus_client::collector::Collector for StoredCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let build = [
            ("version", env!("CARGO_PKG_VERSION")),
            (
                "revision",
                option_env!("CPA_EXPORTER_REVISION").unwrap_or("unknown"),
            ),
        ];
        let mut m = enc.encode_descriptor(
            BUILD_INFO,
            "Build of the exporter; constant 1",
            None,
            MetricType::Gauge,
        )?;
        m.encode_family(&build)?.encode_gauge(&1i64)?;
        if let Some(t) = shared.live.last_success() {
            encode_gauge(
                &mut enc,
                LAST_SUCCESS,
                "Unix time of the last successful poll of CPA",
                Some(Unit::Seconds),
                t,
            )?;
        }
        encode_gauge(
            &mut enc,
            STORE_SIZE,
            "Size of the state database on disk, including its write-ahead log",
            Some(Unit::Bytes),
            Store::size_bytes(&shared.db_path) as f64,
        )?;
        // Hold the lock only while encoding: O(series), never O(records).
        let state = shared.state();
        if let Some(t) = state.last_record_timestamp {
            encode_gauge(
                &mut enc,
                LAST_RECORD,
                "Start time of the newest record ingested, Unix seconds",
                Some(Unit::Seconds),
                t,
            )?;
        }
        let mut m = enc.encode_descriptor(
            SERIES,
            "Stored series per family (the series limit applies to these)",
            None,
            MetricType::Gauge,
        )?;
        for family in Family::ALL {
            m.encode_family(&[("family", family.id())])?
                .encode_gauge(&(state.series_count(family) as i64))?;
        }
        for (family, n) in crate::ingest::quota::FAMILIES
            .iter()
            .zip(state.quota_series())
        {
            m.encode_family(&[("family", *family)])?
                .encode_gauge(&(n as i64))?;
        }
        let now = unix_now();
        for family in Family::ALL {
            encode_family(
                &mut enc,
                family,
                &state.families[family as usize],
                &shared.labels,
                (now, state.new_series_hold),
            )?;
        }
        quota::encode(&mut enc, &state, &shared.labels, now)?;
        state.budgets.encode(&mut enc, &shared.labels, now)?;
        Ok(())
    }
}

fn encode_value(m: &mut MetricEncoder, v: &Value, family: Family) -> Result<(), std::fmt::Error> {
    let kind = family.kind();
    match (v, kind) {
        (Value::Counter(n), _) if family.output_divisor().is_some() => {
            let scaled = *n as f64 / family.output_divisor().unwrap_or(1.0);
            m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&scaled, None)
        }
        (Value::Counter(n), _) => {
            m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(n, None)
        }
        (Value::Histogram(h), Kind::Histogram(bounds)) => {
            let buckets: Vec<(f64, u64)> = bounds
                .iter()
                .copied()
                .chain(std::iter::once(f64::INFINITY))
                .zip(h.buckets.iter().copied())
                .collect();
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum, h.count, &buckets, None,
            )
        }
        (Value::Histogram(_), Kind::Counter) => Ok(()),
    }
}

/// Render one stored family, projecting label sets through the label options: dropped labels are
/// summed away and API key hashes shown by alias.
fn encode_family(
    enc: &mut DescriptorEncoder,
    family: Family,
    series: &BTreeMap<LabelValues, Stored>,
    opts: &LabelOptions,
    (now, hold): (f64, Duration),
) -> Result<(), std::fmt::Error> {
    let kind = family.kind();
    let metric_type = match kind {
        Kind::Counter => MetricType::Counter,
        Kind::Histogram(_) => MetricType::Histogram,
    };
    let (name, unit) = split_unit(family.metric_name());
    let mut m = enc.encode_descriptor(name, family.help(), unit.as_ref(), metric_type)?;
    let names = family.labels();
    if opts.is_identity() {
        for (values, stored) in series {
            // New series show zero for the hold, so rate() sees their first increment.
            let v = &*stored.shown_at(now, hold);
            let pairs: Vec<(&str, &str)> = names
                .iter()
                .copied()
                .zip(values.iter().map(|v| &**v))
                .collect();
            encode_value(&mut m.encode_family(&pairs)?, v, family)?;
        }
        return Ok(());
    }
    let kept: Vec<(usize, &str)> = names
        .iter()
        .enumerate()
        .filter(|(_, n)| !opts.drop.contains(n))
        .map(|(i, n)| (i, *n))
        .collect();
    let mut projected: BTreeMap<Vec<&str>, Value> = BTreeMap::new();
    for (values, stored) in series {
        let v = &*stored.shown_at(now, hold);
        let key: Vec<&str> = kept
            .iter()
            .map(|&(i, name)| {
                let value = &*values[i];
                let shown = match name {
                    label::API_KEY => opts.api_key_aliases.get(value),
                    label::CREDENTIAL => opts.credential_names.get(value),
                    _ => None,
                };
                shown.map_or(value, String::as_str)
            })
            .collect();
        projected
            .entry(key)
            .and_modify(|acc| acc.merge(v))
            .or_insert_with(|| v.clone());
    }
    for (values, v) in &projected {
        let pairs: Vec<(&str, &str)> = kept
            .iter()
            .map(|(_, n)| *n)
            .zip(values.iter().copied())
            .collect();
        encode_value(&mut m.encode_family(&pairs)?, v, family)?;
    }
    Ok(())
}
