//! Wall-clock steps (issue 22): NTP correcting a fast clock, a VM restored from a snapshot.
//! The exporter runs under libfaketime with its wall clock read from a file the test rewrites;
//! its monotonic clock stays real, as an NTP step leaves it.
//!
//! A counter that has been shown never goes down, whatever the wall clock does: Prometheus
//! reads a drop as a reset and counts everything again when it comes back.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{accounted, eventually, have, push_workload, Exporter, Metrics, Setup};
use fake_cpa::{FakeCpa, SimConfig, WorkloadMix};

const KEY: &str = "clock-test-key";
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const REQUESTS: &str = "cpa_requests_total";
/// Short, so a test waits seconds rather than the default minute; the rule is the same.
const HOLD: &str = "2s";

/// libfaketime is installed (required under CI: `.ci/run` installs Debian's `faketime`).
fn faketime() -> bool {
    have("faketime") && {
        let found = Path::new(LIBFAKETIME).exists();
        assert!(
            found || std::env::var_os("CI").is_none(),
            "{LIBFAKETIME} is required under CI"
        );
        found
    }
}

async fn fake_cpa() -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA")
}

/// The exporter's wall clock: an offset such as `+1h` or `+0`, read on every clock call.
struct Clock(PathBuf);

impl Clock {
    fn new(dir: &tempfile::TempDir, offset: &str) -> Clock {
        let clock = Clock(dir.path().join("faketime"));
        clock.set(offset);
        clock
    }

    /// Step the clock: written to a new file and renamed, so no read sees half of it.
    fn set(&self, offset: &str) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset}\n")).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }

    fn setup<'a>(&self, setup: Setup<'a>) -> Setup<'a> {
        setup
            .with_env("LD_PRELOAD", LIBFAKETIME)
            .with_env("FAKETIME_TIMESTAMP_FILE", self.0.display().to_string())
            .with_env("FAKETIME_NO_CACHE", "1")
            // Tokio's timers run on the monotonic clock, which an NTP step leaves alone.
            .with_env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .with_env("CPA_EXPORTER_NEW_SERIES_HOLD", HOLD)
    }
}

/// Requests a workload adds to `REQUESTS`.
fn total(expected: &common::Expected) -> f64 {
    expected.requests.values().sum()
}

async fn requests(exporter: &Exporter) -> f64 {
    exporter.scrape().await.sum(REQUESTS, &[])
}

/// Wait until the exporter shows `want` requests; fail with what it shows otherwise.
async fn shows(exporter: &Exporter, want: f64, when: &str) {
    let ok = eventually(Duration::from_secs(30), async || {
        requests(exporter).await == want
    })
    .await;
    assert!(
        ok,
        "{when}: {REQUESTS} sums to {} instead of {want}; log:\n{}",
        requests(exporter).await,
        exporter.log_text()
    );
}

/// Scrape for `span`, failing if the sum of `REQUESTS` ever drops below `floor`; the samples.
async fn never_below(exporter: &Exporter, floor: f64, span: Duration, when: &str) -> Vec<f64> {
    let end = std::time::Instant::now() + span;
    let mut seen = Vec::new();
    let mut last = floor;
    while std::time::Instant::now() < end {
        let now = requests(exporter).await;
        seen.push(now);
        assert!(
            now >= last,
            "{when}: {REQUESTS} went down from {last} to {now} (samples {seen:?})"
        );
        last = now;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_back_an_hour_neither_hides_nor_recounts_requests() {
    if !faketime() {
        return;
    }
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::new(&dir, "+1h");
    let exporter = Exporter::spawn(&clock.setup(Setup::in_dir(&cpa, KEY, &dir, "fast")));
    // The report: 200 requests counted while the clock runs an hour fast.
    let first = push_workload(&cpa, 1, WorkloadMix::default(), 200);
    shows(&exporter, total(&first), "an hour fast").await;
    // NTP corrects the clock. Nothing shown may go down, now or while new records arrive.
    clock.set("+0");
    never_below(
        &exporter,
        total(&first),
        Duration::from_secs(1),
        "stepped back",
    )
    .await;
    let more = push_workload(&cpa, 2, WorkloadMix::default(), 50);
    let sum = total(&first) + total(&more);
    let samples = never_below(&exporter, total(&first), Duration::from_secs(4), "after").await;
    eprintln!("after the step back: {samples:?}");
    shows(&exporter, sum, "stepped back, 50 more").await;
    // A restart with the clock still behind the database's times shows the same, without
    // holding the series it showed before (a drop across the restart would count them again).
    // A stop writes the time of the last pop, the latest time the database holds.
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(15)).success());
    let exporter = Exporter::spawn(&clock.setup(Setup::in_dir(&cpa, KEY, &dir, "restart")));
    never_below(&exporter, sum, Duration::from_secs(3), "restarted").await;
    assert_eq!(requests(&exporter).await, sum);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_forward_an_hour_neither_retires_series_nor_invents_a_gap() {
    if !faketime() {
        return;
    }
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    // The shortest retirement, looked at every 6 s: a step of an hour is far beyond it.
    std::fs::write(&config, "series-retirement: 1m\n").unwrap();
    let clock = Clock::new(&dir, "+0");
    let setup = clock
        .setup(Setup::in_dir(&cpa, KEY, &dir, "forward"))
        .with_env("CPA_EXPORTER_CONFIG", config.display().to_string());
    let exporter = Exporter::spawn(&setup);
    let first = push_workload(&cpa, 3, WorkloadMix::default(), 200);
    shows(&exporter, total(&first), "before the step").await;
    let accounted_before = accounted(&exporter.scrape().await);
    clock.set("+1h");
    never_below(
        &exporter,
        total(&first),
        Duration::from_secs(8),
        "stepped forward",
    )
    .await;
    let m: Metrics = exporter.scrape().await;
    assert_eq!(accounted(&m), accounted_before);
    assert_eq!(
        m.get("cpa_exporter_drain_gaps_total"),
        Some(0.0),
        "an hour of wall clock between two pops a poll apart is no gap"
    );
    assert_eq!(
        m.sum("cpa_exporter_series_retired_total", &[]),
        0.0,
        "nothing went a minute without an update on the exporter's own clock"
    );
}
