//! The drain loop: pop -> ingest -> commit -> (pop again or wait).
//!
//! CPA's queue is destructive and has no ack, so a popped batch exists only in this process until
//! it is committed. The loop therefore commits each batch before the next pop, retries a failed
//! commit instead of popping more, and on shutdown finishes the batch in hand (an in-flight
//! request is never cancelled: CPA may already have removed its records).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::cpa::source::Source;
use crate::cpa::{PopError, Popped};
use crate::families::Family;
use crate::ingest::{Batch, BatchBuilder};
use crate::metrics::Shared;
use crate::pipeline::backoff::{self, auth_wait, sleep_or_shutdown};
use crate::pipeline::events::EventLog;
use crate::pipeline::gap::{Gap, GapWatch};
use crate::pricing::Pricing;
use crate::store::Store;
use crate::time::unix_now;

/// At most one warning a minute about malformed elements; the rest go to debug.
const INVALID_LOG_EVERY: Duration = Duration::from_secs(60);

/// Pop once, decoding the elements as they arrive (memory follows the largest element, not the
/// response). The batch holds every element that arrived, also when the pop failed part way:
/// CPA removed those records, so they are committed like any others. `check` pops this way too.
pub async fn pop_batch<S: Source>(
    source: &mut S,
    count: usize,
    store: &Store,
    pricing: &Pricing,
) -> (Batch, Result<Popped, PopError>) {
    let seen = store.seen_ids();
    let mut builder =
        BatchBuilder::new(pricing, unix_now(), |id| seen.contains(&id)).with_clock(unix_now);
    let popped = source.pop(count, &mut builder).await;
    (builder.finish(), popped)
}

#[derive(Debug, Clone)]
pub struct DrainOptions {
    pub batch_size: usize,
    pub poll_interval: Duration,
    /// Prices for `cpa_cost_usd_total`: an input of ingest, so it travels with the drain.
    pub pricing: Pricing,
    /// The opt-in per-record log, handed each batch after it committed.
    pub event_log: Option<Arc<EventLog>>,
}

/// The failure class of the previous poll, to log a change once instead of every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Up,
    Down(&'static str),
}

/// Run the loop on a thread and runtime of its own; the returned future ends with it. Scrapes
/// render on the server's runtime and are CPU-bound: with the loop there, a crowd of them
/// would keep its sockets and timers waiting (CPA's records expire from its queue).
pub fn spawn<S: Source + Send + 'static>(
    source: S,
    store: Store,
    shared: Arc<Shared>,
    opts: DrainOptions,
    shutdown: watch::Receiver<bool>,
) -> impl Future<Output = ()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let started = std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run(source, store, shared, opts, shutdown)),
                Err(e) => error!("cannot start the drain loop's runtime: {e}"),
            }
            let _ = done_tx.send(());
        });
    if let Err(e) = &started {
        error!("cannot start the drain loop's thread: {e}");
    }
    async move {
        // Err: the thread ended without saying so (it panicked); either way the loop is over.
        let _ = done_rx.await;
        // The thread has ended or is ending. A panic there is one here, as if the loop had run
        // on this task: the process fails and its supervisor restarts it.
        if let Ok(thread) = started {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

pub async fn run<S: Source>(
    mut source: S,
    mut store: Store,
    shared: Arc<Shared>,
    opts: DrainOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut health = Health::Up;
    let mut failures = 0u32;
    let mut first_success = true;
    let mut notes = Notes::default();
    // Stale series are retired at start and then every tenth of the retirement (at most 1 h).
    let mut next_retire = Instant::now();
    let mut gaps = GapWatch::new(store.last_pop());
    shared.live.open_requests.set(store.open_requests() as i64);
    loop {
        if *shutdown.borrow() {
            break;
        }
        if let Some(after) = store.limits().series_retirement {
            if Instant::now() >= next_retire {
                retire(&mut store, &shared, after);
                next_retire = Instant::now() + retire_every(after);
            }
        }
        let started = Instant::now();
        // On the store's clock: an hour of wall-clock step between two pops is no gap.
        let started_at = store.now();
        let (mut batch, popped) =
            pop_batch(&mut source, opts.batch_size, &store, &opts.pricing).await;
        let elements = batch.elements;
        // Less than a full batch: nothing older waits in CPA's queue, so a failed request's
        // successor, if any, has been seen and its wall-clock window may close it.
        batch.caught_up = popped.is_ok() && elements < opts.batch_size;
        note_invalid(&batch, &mut notes);
        if elements > 0 || (batch.caught_up && store.chains_due(store.now() as i64)) {
            let log = opts.event_log.as_deref();
            commit_until_done(&batch, &mut store, &shared, &mut shutdown, &mut notes, log).await;
        }
        drop(batch);
        if let Some(status) = source.subscription() {
            if shared.live.subscription.update(status) > 0 {
                // CPA's credentials changed: the poller reads the listing (debounced).
                shared.live.credentials_changed.notify_one();
            }
        }
        let wait = match popped {
            Ok(popped) => {
                shared.live.record_poll("success", started.elapsed());
                gaps.popped(started_at);
                if let Err(e) = blocking(|| store.note_pop(started_at)) {
                    debug!("cannot record the time of the last pop: {e}");
                }
                let retention = shared.observed.get().settings().map(|s| s.retention);
                for gap in gaps.settle(retention, store.now()) {
                    note_gap(&gap, &shared, &mut notes);
                }
                shared.live.set_key_accepted(true);
                shared
                    .live
                    .set_idle_interval(source.idle_interval().unwrap_or(opts.poll_interval));
                shared
                    .observed
                    .get()
                    .set_identity(popped.cpa_version.as_deref(), popped.cpa_commit.as_deref());
                if first_success || health != Health::Up {
                    info!(
                        route = popped.via.name(),
                        cpa_version = popped.cpa_version.as_deref().unwrap_or("unknown"),
                        "polling CPA's usage queue"
                    );
                }
                first_success = false;
                health = Health::Up;
                failures = 0;
                // A full batch means more is waiting: pop again at once (CPA's own drain rule).
                if elements >= opts.batch_size {
                    continue;
                }
                source.idle_interval().unwrap_or(opts.poll_interval)
            }
            Err(e) => {
                let result = e.result_label();
                shared.live.record_poll(result, started.elapsed());
                failures += 1;
                let wait = match &e {
                    PopError::Auth(cause) => auth_wait(cause, failures),
                    _ => backoff::transient(failures),
                };
                let retry_in = humantime::format_duration(wait).to_string();
                if matches!(e, PopError::Auth(_)) {
                    shared.live.set_key_accepted(false);
                    // Rare by construction (minutes apart), and each one matters: always log.
                    error!(retry_in, "{e}");
                } else if is_cut_off(&e) {
                    // CPA removed the rest of the response's records too: each occurrence is a
                    // loss. The elements that arrived whole were committed.
                    error!(
                        retry_in,
                        kept = elements,
                        "{e}; the elements that arrived whole were kept, the rest of the response is lost"
                    );
                } else if health != Health::Down(result) {
                    warn!(retry_in, "{e}");
                } else {
                    debug!(retry_in, failures, "{e}");
                }
                health = Health::Down(result);
                wait
            }
        };
        if sleep_or_shutdown(wait, &mut shutdown).await {
            break;
        }
    }
    // A subscription's records are CPA's no more once received: stop receiving, then commit
    // what arrived (close returns once the reader has ended).
    source.close();
    while source.pending() {
        let (batch, _) = pop_batch(&mut source, opts.batch_size, &store, &opts.pricing).await;
        if batch.elements == 0 {
            break;
        }
        let log = opts.event_log.as_deref();
        commit_until_done(&batch, &mut store, &shared, &mut shutdown, &mut notes, log).await;
    }
    if let Err(e) = store.flush_last_pop() {
        warn!("cannot record the time of the last pop: {e}");
    }
    info!("drain loop stopped");
}

/// At most one warning a minute about gaps in the drain; the rest go to debug.
const GAP_LOG_EVERY: Duration = Duration::from_secs(60);

/// Count a gap beyond the retention and say so (one warning per gap, at most one a minute).
fn note_gap(gap: &Gap, shared: &Shared, notes: &mut Notes) {
    shared.live.drain_gaps.inc();
    shared.live.drain_gap_seconds.inc_by(gap.beyond);
    let seconds = format!("{:.0}", gap.seconds);
    let beyond = format!("{:.0}", gap.beyond);
    let retention = humantime::format_duration(gap.retention).to_string();
    let message = "no successful pop for longer than CPA's queue retention: records CPA queued in the first part of that stretch expired before they could be popped (counted in cpa_exporter_drain_gaps_total); see the log before it for why (exporter stopped or paused, CPA unreachable, database failing)";
    if notes
        .last_gap_warning
        .is_none_or(|t| t.elapsed() >= GAP_LOG_EVERY)
    {
        notes.last_gap_warning = Some(Instant::now());
        warn!(
            gap_seconds = seconds,
            lost_seconds = beyond,
            retention,
            "{message}"
        );
    } else {
        debug!(
            gap_seconds = seconds,
            lost_seconds = beyond,
            retention,
            "{message}"
        );
    }
}

/// Pop errors after CPA handed records out: what did not arrive whole is lost.
fn is_cut_off(e: &PopError) -> bool {
    matches!(
        e,
        PopError::TooLarge(_) | PopError::Interrupted(_) | PopError::NotAnArray(_)
    )
}

/// How often stale series are looked for: a tenth of the retirement, between 1 s and 1 h.
fn retire_every(after: Duration) -> Duration {
    (after / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Run blocking store work without stalling the runtime's other tasks (when it has others).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Delete series no record updated within the retirement, from the store and then from memory.
fn retire(store: &mut Store, shared: &Shared, after: Duration) {
    // On the store's clock: a wall clock stepped forward past the retirement retires nothing.
    let retired = match blocking(|| store.retire(store.now() as i64)) {
        Ok(r) => r,
        Err(e) => {
            warn!("cannot retire stale series (will try again later): {e}");
            return;
        }
    };
    if retired.series.is_empty() {
        return;
    }
    shared.committed.write().forget(&retired);
    for family in Family::ALL {
        let n = retired.series.iter().filter(|(f, _)| *f == family).count() as u64;
        if n > 0 {
            shared
                .live
                .series_retired
                .get_or_create(&[("family", family.id())])
                .inc_by(n);
        }
    }
    info!(
        series = retired.series.len(),
        series_retirement = %humantime::format_duration(after),
        "retired series that no record updated within series-retirement; a retired counter that comes back restarts at zero"
    );
}

/// What the loop remembers to keep its logs short.
#[derive(Debug, Default)]
struct Notes {
    last_invalid_warning: Option<Instant>,
    last_gap_warning: Option<Instant>,
    /// Families whose series limit was reached, said once per process.
    overflow_said: [bool; Family::COUNT],
    quota_overflow_said: [bool; crate::ingest::quota::FAMILIES.len()],
    /// The open-request limit was reached, said once per process.
    open_requests_said: bool,
}

/// Say that a batch held malformed elements: a warning at most once a minute, else debug.
fn note_invalid(batch: &Batch, notes: &mut Notes) {
    let invalid: u64 = batch.invalid.values().sum();
    if invalid == 0 && batch.repaired_utf8 == 0 {
        return;
    }
    let reasons = batch
        .invalid
        .iter()
        .map(|(r, n)| format!("{r}={n}"))
        .collect::<Vec<_>>()
        .join(",");
    let due = notes
        .last_invalid_warning
        .is_none_or(|t| t.elapsed() >= INVALID_LOG_EVERY);
    let message = "a batch from CPA held elements that are not valid usage records (counted in cpa_exporter_invalid_records_total by reason) or bytes that are not UTF-8 (replaced by U+FFFD); the rest of the batch is kept";
    if due {
        notes.last_invalid_warning = Some(Instant::now());
        warn!(
            invalid,
            reasons,
            repaired_utf8 = batch.repaired_utf8,
            elements = batch.elements,
            "{message}"
        );
    } else {
        debug!(
            invalid,
            reasons,
            repaired_utf8 = batch.repaired_utf8,
            elements = batch.elements,
            "{message}"
        );
    }
}

/// Commit a batch, retrying while the store fails. Popping more meanwhile would lose records.
async fn commit_until_done(
    batch: &Batch,
    store: &mut Store,
    shared: &Shared,
    shutdown: &mut watch::Receiver<bool>,
    notes: &mut Notes,
    event_log: Option<&EventLog>,
) {
    let mut attempts = 0u32;
    loop {
        let now = store.now() as i64;
        let wall = unix_now() as i64;
        let mut plan = store.plan_batch_at(&shared.committed.read(), batch, now, wall);
        match blocking(|| store.commit(&mut plan, now)) {
            Ok(()) => {
                if let Some(chains) = &plan.chains {
                    for &(reason, n) in &chains.forced {
                        shared
                            .live
                            .requests_forced_closed
                            .get_or_create(&[("reason", reason)])
                            .inc_by(n);
                    }
                    if chains
                        .forced
                        .iter()
                        .any(|(r, _)| *r == crate::store::chains::forced::LIMIT)
                        && !std::mem::replace(&mut notes.open_requests_said, true)
                    {
                        warn!(
                            limit = store.limits().open_requests,
                            "more inbound requests waiting for a failover attempt than the limit: the oldest are finished as client failures (counted in cpa_exporter_requests_forced_closed_total)"
                        );
                    }
                    shared.live.open_requests.set(chains.open_count() as i64);
                }
                for family in Family::ALL {
                    let n = plan.overflowed[family as usize];
                    if n > 0 {
                        shared
                            .live
                            .series_overflow
                            .get_or_create(&[("family", family.id())])
                            .inc_by(n);
                        if !std::mem::replace(&mut notes.overflow_said[family as usize], true) {
                            warn!(
                                family = family.id(),
                                series_limit = store.limits().series_per_family,
                                "the family reached its series limit: new label sets are folded into one __other__ series (sums stay exact; counted in cpa_exporter_series_overflow_total)"
                            );
                        }
                    }
                }
                for (f, &n) in plan.quota_overflowed.iter().enumerate() {
                    let family = crate::ingest::quota::FAMILIES[f];
                    if n > 0 {
                        shared
                            .live
                            .series_overflow
                            .get_or_create(&[("family", family)])
                            .inc_by(n);
                        if !std::mem::replace(&mut notes.quota_overflow_said[f], true) {
                            warn!(
                                family,
                                series_limit = store.limits().series_per_family,
                                "the quota family reached its series limit: values of new credentials (or new windows) are not kept (counted in cpa_exporter_series_overflow_total)"
                            );
                        }
                    }
                }
                let failover = plan
                    .chains
                    .as_mut()
                    .map(|c| std::mem::take(&mut c.failover))
                    .unwrap_or_default();
                {
                    let mut state = shared.committed.write();
                    store.apply(&mut state, plan);
                }
                // Only now: the log never shows a record the counters do not hold.
                if let Some(log) = event_log {
                    log.committed(&batch.attempts, failover);
                }
                shared.live.set_store_healthy(true);
                debug!(
                    elements = batch.elements,
                    ingested = batch.ingested,
                    "batch committed"
                );
                return;
            }
            Err(e) => {
                attempts += 1;
                shared.live.store_errors.inc();
                shared.live.set_store_healthy(false);
                let wait = backoff::transient(attempts);
                error!(
                    attempts,
                    records = batch.ingested,
                    retry_in = %humantime::format_duration(wait),
                    "cannot commit the batch to the state database, holding it and not popping more: {e}"
                );
                if *shutdown.borrow() && attempts >= 5 {
                    error!(
                        records = batch.ingested,
                        "shutting down with an uncommitted batch; its records are lost"
                    );
                    return;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpa::split::Sink;
    use crate::cpa::AuthCause;
    use crate::metrics::LabelOptions;
    use crate::store::Limits;

    /// A source that always refuses the key, logging when it was asked.
    struct Refusing(std::sync::Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>);

    impl Source for Refusing {
        fn pop<K: Sink + Send>(
            &mut self,
            _: usize,
            _: &mut K,
        ) -> impl Future<Output = Result<Popped, PopError>> + Send {
            self.0.lock().unwrap().push(tokio::time::Instant::now());
            std::future::ready(Err(PopError::Auth(AuthCause::WrongKey)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_makes_at_most_three_attempts_with_a_wrong_key_in_ten_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, state) = Store::open(&dir.path().join("s.db"), Limits::default()).unwrap();
        let shared = Arc::new(Shared::new(
            state,
            LabelOptions::default(),
            dir.path().join("s.db"),
        ));
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (_tx, rx) = watch::channel(false);
        let opts = DrainOptions {
            batch_size: 10,
            event_log: None,
            poll_interval: Duration::from_millis(100),
            pricing: Pricing::embedded(),
        };
        let start = tokio::time::Instant::now();
        let drain = run(Refusing(calls.clone()), store, shared.clone(), opts, rx);
        // Virtual time: 30 minutes pass instantly.
        let _ = tokio::time::timeout(Duration::from_secs(30 * 60), drain).await;
        let times: Vec<u64> = calls
            .lock()
            .unwrap()
            .iter()
            .map(|t| (*t - start).as_secs())
            .collect();
        assert_eq!(times, [0, 300, 900], "attempts at 0, 5 and 15 minutes");
        for (i, t) in times.iter().enumerate() {
            assert!(times[i..].iter().take_while(|u| **u < t + 600).count() <= 3);
        }
        assert_eq!(shared.live.cpa_up.get(), 0);
    }
}
