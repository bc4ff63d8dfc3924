//! Crash safety: the exporter is SIGKILLed at random moments while it drains a large backlog,
//! then restarted, again and again. After every kill the committed totals must equal what CPA
//! handed out minus at most the one batch that was in flight, never more, and SQLite's
//! `integrity_check` must stay `ok`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cpa_usage_exporter::families::Family;
use cpa_usage_exporter::series::Value;
use cpa_usage_exporter::store::{Limits, State, Store};
use fake_cpa::{FakeCpa, Fault, SimConfig, WorkloadMix};

const KEY: &str = "crash-test-management-key";

/// Elements the store has committed, every outcome (what `cpa_exporter_records_total` sums to).
fn committed(state: &State) -> u64 {
    state.families[Family::Records as usize]
        .values()
        .map(|s| match s.value {
            Value::Counter(n) => n,
            Value::Histogram(_) => 0,
        })
        .sum()
}

/// splitmix64, seeded from the clock; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_double_counts_and_loses_at_most_the_batch_in_flight() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        // Longer than the test: the backlog must not expire while the exporter is down.
        retention: Duration::from_secs(3600),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let n = 20_000u64;
    let mix = WorkloadMix {
        duplicate_event_id: 0.02,
        ..WorkloadMix::default()
    };
    push_workload(&cpa, seed, mix, n as usize);
    // Every pop takes a while, so kills land before, during and after pops and commits alike.
    cpa.set_fault(Some(Fault::Delay(Duration::from_millis(50))));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let batch = 200u64;
    let s = Setup {
        cpa_url: cpa.url(),
        key: KEY,
        db: &db,
        log: dir.path().join("crash.log"),
        extra: vec![("CPA_EXPORTER_BATCH_SIZE", batch.to_string())],
    };
    let kills = 24;
    let started = Instant::now();
    let mut lost = 0u64;
    for i in 0..kills {
        let exporter = Exporter::spawn(&s);
        // Anywhere from start-up (before the first pop) to well into the drain.
        let wait = rng.next() % 500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        exporter.sigkill();
        let popped = cpa.stats().popped;
        let (store, state) = Store::open(&db, Limits::default()).unwrap();
        assert_eq!(store.integrity_check().unwrap(), "ok", "kill {i}");
        let stored = committed(&state);
        drop(store);
        assert!(
            stored <= popped,
            "kill {i} after {wait} ms: {stored} committed but CPA handed out only {popped}"
        );
        let lost_now = popped - stored;
        assert!(
            lost_now - lost <= batch,
            "kill {i} after {wait} ms lost {} records, more than one batch of {batch}",
            lost_now - lost
        );
        assert!(lost_now >= lost, "kill {i}: a committed record disappeared");
        lost = lost_now;
    }
    let popped = cpa.stats().popped;
    assert!(
        popped > 10 * batch && lost > 0,
        "the kills landed mid-drain ({popped} of {n} popped, {lost} lost)"
    );
    // Finally let it drain the rest: everything not lost to a kill is counted exactly once.
    cpa.set_fault(None);
    let exporter = Exporter::spawn(&s);
    let done = eventually(Duration::from_secs(60), async || {
        cpa.stats().queued == 0 && accounted(&exporter.scrape().await) as u64 + lost >= n
    })
    .await;
    assert!(done, "did not drain: {}", exporter.log_text());
    let m = exporter.scrape().await;
    assert_eq!(
        accounted(&m) as u64,
        n - lost,
        "{lost} lost in {kills} kills"
    );
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());
    let (store, state) = Store::open(&db, Limits::default()).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert_eq!(committed(&state), n - lost);
    println!(
        "{kills} kills in {:.1} s, {popped} of {n} popped by then, {lost} records lost in flight (at most {} allowed)",
        started.elapsed().as_secs_f64(),
        kills * batch
    );
}

/// SIGTERM right after start-up, before the first poll, stops the exporter cleanly (exit 0):
/// the handlers are installed before the database is opened and the port bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_start_is_a_clean_stop() {
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let s = Setup {
        cpa_url: cpa.url(),
        key: KEY,
        db: &db,
        log: dir.path().join("term.log"),
        extra: Vec::new(),
    };
    for _ in 0..5 {
        let exporter = Exporter::spawn(&s);
        exporter.sigterm();
        let log = exporter.log.clone();
        let status = exporter.wait_exit(Duration::from_secs(10));
        assert!(
            status.success(),
            "{status:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}
