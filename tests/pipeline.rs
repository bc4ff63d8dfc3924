//! The core pipeline, end to end: the real binary drains the fake CPA (written from API.md) and
//! `/metrics` must equal what the generated workload says, across restarts and failures.

mod common;

use std::time::Duration;

use common::*;
use cpa_usage_exporter::store::{Limits, Store};
use fake_cpa::{FakeCpa, Fault, Routes, SimConfig, WorkloadMix};

const KEY: &str = "test-management-key";

async fn fake_cpa(routes: Routes) -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        routes,
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_totals_for_a_generated_workload() {
    let cpa = fake_cpa(Routes::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let mix = edge_case_mix();
    let n = 5_000;
    let expected = push_workload(&cpa, 42, mix, n);
    let mut s = Setup::in_dir(&cpa, KEY, &dir, "exact");
    s.extra.push(("CPA_EXPORTER_BATCH_SIZE", "300".into()));
    let exporter = Exporter::spawn(&s);
    let m = drained(&exporter, &cpa, n as f64).await;
    let observed = Expected::observed(&m);
    assert_eq!(observed.outcomes, expected.outcomes);
    assert_eq!(observed.invalid, expected.invalid);
    assert_eq!(observed.requests, expected.requests);
    assert_eq!(observed.failures, expected.failures);
    assert_eq!(observed.tokens, expected.tokens);
    assert_eq!(observed.latency_count, expected.latency_count);
    assert_eq!(observed.ttft_count, expected.ttft_count);
    assert_eq!(m.get("cpa_up"), Some(1.0));
    // Several batches were needed, each popped at once after a full one.
    assert!(m.sum("cpa_exporter_polls_total", &[("result", "success")]) >= (n / 300) as f64);
    assert!(expected.outcomes.get("duplicate").is_some_and(|d| *d > 0.0));

    // A restart serves the same totals before any new record arrives.
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());
    let restarted = Exporter::spawn(&s);
    let after = restarted.scrape().await;
    assert_eq!(Expected::observed(&after), observed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_routes_find_v0_and_v8_cpa() {
    for (routes, version) in [(Routes::V0, "v0"), (Routes::V8, "v8")] {
        let cpa = fake_cpa(routes).await;
        let dir = tempfile::tempdir().unwrap();
        let expected = push_workload(&cpa, 7, WorkloadMix::default(), 500);
        // HTTP routes: `auto` would pick RESP, which has no routes.
        let mut s = Setup::in_dir(&cpa, KEY, &dir, version);
        s.extra.push(("CPA_TRANSPORT", "http".into()));
        let exporter = Exporter::spawn(&s);
        let m = drained(&exporter, &cpa, 500.0).await;
        assert_eq!(Expected::observed(&m).requests, expected.requests);
        assert!(
            exporter
                .log_text()
                .contains(&format!("route=\"{version}\"")),
            "{}",
            exporter.log_text()
        );
    }
    // A fixed version that CPA does not have is reported, not guessed around.
    let cpa = fake_cpa(Routes::V8).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = Setup::in_dir(&cpa, KEY, &dir, "fixed");
    s.extra.push(("CPA_API_VERSION", "v0".into()));
    s.extra.push(("CPA_TRANSPORT", "http".into()));
    let exporter = Exporter::spawn(&s);
    let said = eventually(Duration::from_secs(10), async || {
        exporter.log_text().contains("no usage-queue route")
    })
    .await;
    assert!(said, "{}", exporter.log_text());
    assert_eq!(exporter.scrape().await.get("cpa_up"), Some(0.0));
}

/// Each refusal gets one clear log line naming the cause and the fix, and no retry storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_explained_and_never_hammered() {
    struct Case {
        name: &'static str,
        cfg: SimConfig,
        key: &'static str,
        says: &'static str,
        result: &'static str,
    }
    let base = SimConfig {
        management_key: KEY.to_owned(),
        ..SimConfig::default()
    };
    let cases = [
        Case {
            name: "wrong_key",
            cfg: base.clone(),
            key: "not-the-key-0123",
            says: "wrong key",
            result: "unauthorized",
        },
        Case {
            name: "remote",
            cfg: SimConfig {
                clients_are_remote: true,
                ..base.clone()
            },
            key: KEY,
            says: "allow-remote",
            result: "unauthorized",
        },
        Case {
            name: "disabled",
            cfg: SimConfig {
                management_key: String::new(),
                ..base.clone()
            },
            key: KEY,
            says: "management API is disabled",
            result: "management_disabled",
        },
    ];
    for case in cases {
        let cpa = FakeCpa::start(case.cfg).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let exporter = Exporter::spawn(&Setup::in_dir(&cpa, case.key, &dir, case.name));
        let said = eventually(Duration::from_secs(10), async || {
            exporter.log_text().contains(case.says)
        })
        .await;
        assert!(said, "{}: {}", case.name, exporter.log_text());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m = exporter.scrape().await;
        assert_eq!(m.get("cpa_up"), Some(0.0), "{}", case.name);
        assert!(
            m.sum("cpa_exporter_polls_total", &[("result", case.result)]) >= 1.0,
            "{}",
            case.name
        );
        let log = exporter.log_text();
        assert!(
            !log.contains(case.key),
            "{}: the key leaked into the log",
            case.name
        );
        if case.result == "unauthorized" {
            // One attempt, then minutes of quiet: nowhere near CPA's 5-failure ban.
            assert_eq!(
                m.sum("cpa_exporter_polls_total", &[("result", "unauthorized")]),
                1.0
            );
            assert!(cpa.stats().auth_failures <= 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_already_banned_ip_is_waited_out() {
    let cpa = fake_cpa(Routes::Both).await;
    // Five failed logins from this IP, as a mistyped key in the admin UI would cause.
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let _ = http
            .get(format!("{}/v0/management/usage-queue", cpa.url()))
            .bearer_auth("wrong")
            .send()
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&Setup::in_dir(&cpa, KEY, &dir, "banned"));
    let said = eventually(Duration::from_secs(10), async || {
        exporter.log_text().contains("banned this IP")
    })
    .await;
    assert!(said, "{}", exporter.log_text());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(cpa.stats().banned_requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_in_hand_and_loses_nothing() {
    let cpa = fake_cpa(Routes::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let n = 20_000;
    let expected = push_workload(&cpa, 3, WorkloadMix::default(), n);
    cpa.set_fault(Some(Fault::Delay(Duration::from_millis(150))));
    let mut s = Setup::in_dir(&cpa, KEY, &dir, "term");
    s.extra.push(("CPA_EXPORTER_BATCH_SIZE", "500".into()));
    let exporter = Exporter::spawn(&s);
    let started = eventually(Duration::from_secs(10), async || cpa.stats().popped > 0).await;
    assert!(started);
    // Signal while a pop is in flight (each one takes 150 ms).
    tokio::time::sleep(Duration::from_millis(400)).await;
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());
    let popped = cpa.stats().popped;
    assert!(popped < n as u64, "stopped mid-drain");
    cpa.set_fault(None);
    let restarted = Exporter::spawn(&s);
    let m = restarted.scrape().await;
    assert_eq!(
        accounted(&m),
        popped as f64,
        "every popped record was committed"
    );
    let m = drained(&restarted, &cpa, n as f64).await;
    assert_eq!(Expected::observed(&m).requests, expected.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_drain_loses_at_most_the_batch_in_flight_and_never_double_counts() {
    let cpa = fake_cpa(Routes::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let n = 30_000;
    let batch = 400u64;
    push_workload(&cpa, 11, WorkloadMix::default(), n);
    cpa.set_fault(Some(Fault::Delay(Duration::from_millis(40))));
    let mut s = Setup::in_dir(&cpa, KEY, &dir, "kill");
    s.extra.push(("CPA_EXPORTER_BATCH_SIZE", batch.to_string()));
    let kills = 10u64;
    let mut last = 0.0;
    for i in 0..kills {
        let exporter = Exporter::spawn(&s);
        let m = exporter.scrape().await;
        assert!(accounted(&m) >= last, "a restart never goes backwards");
        tokio::time::sleep(Duration::from_millis(80 + 37 * i)).await;
        last = accounted(&exporter.scrape().await);
        exporter.sigkill();
        let popped = cpa.stats().popped as f64;
        assert!(last <= popped, "counted {last} of {popped} handed out");
    }
    cpa.set_fault(None);
    let exporter = Exporter::spawn(&s);
    let m = drained(&exporter, &cpa, (n as u64 - kills * batch) as f64).await;
    let popped = cpa.stats().popped as f64;
    let counted = accounted(&m);
    assert!(counted <= popped, "double counted: {counted} > {popped}");
    assert!(
        counted >= popped - (kills * batch) as f64,
        "lost more than the batches in flight: {counted} of {popped}"
    );
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());
    let (store, _) = Store::open(s.db, Limits::default()).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cpa_shows_as_down_while_stored_counters_are_served() {
    let cpa = fake_cpa(Routes::Both).await;
    let dir = tempfile::tempdir().unwrap();
    push_workload(&cpa, 5, WorkloadMix::default(), 300);
    let s = Setup::in_dir(&cpa, KEY, &dir, "down");
    let exporter = Exporter::spawn(&s);
    let before = drained(&exporter, &cpa, 300.0).await;
    cpa.shutdown();
    let down = eventually(Duration::from_secs(10), async || {
        exporter.scrape().await.get("cpa_up") == Some(0.0)
    })
    .await;
    assert!(down, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    assert_eq!(
        Expected::observed(&m).requests,
        Expected::observed(&before).requests
    );
    assert!(m.sum("cpa_exporter_polls_total", &[("result", "unreachable")]) >= 1.0);
    let ready = reqwest::get(exporter.url("/readyz")).await.unwrap();
    // Not ready only after the window; alive regardless.
    assert!(ready.status().is_success() || ready.status().as_u16() == 503);
    assert!(reqwest::get(exporter.url("/healthz"))
        .await
        .unwrap()
        .status()
        .is_success());
    assert!(exporter.log_text().contains("cannot reach CPA"));
}

#[test]
fn a_bad_setting_fails_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str); 4] = [
        (
            "CPA_EXPORTER_BATCH_SIZE",
            "0",
            "batch size (from CPA_EXPORTER_BATCH_SIZE)",
        ),
        (
            "CPA_EXPORTER_POLL_INTERVAL",
            "often",
            "poll interval (from CPA_EXPORTER_POLL_INTERVAL)",
        ),
        ("CPA_URL", "localhost:8317", "CPA URL"),
        ("CPA_EXPORTER_LISTEN", "9317", "listen address"),
    ];
    for (var, value, says) in cases {
        let out = std::process::Command::new(BIN)
            .env_clear()
            .env("CPA_MANAGEMENT_KEY", "k")
            .env("CPA_EXPORTER_DB", dir.path().join("x.db"))
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert!(stderr.contains(says), "{var}: {stderr}");
    }
    let out = std::process::Command::new(BIN)
        .env_clear()
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("management key is required"));
}

/// Dropping labels and aliasing keys changes only how stored series are shown: sums are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_options_and_series_limit_keep_sums_exact() {
    let cpa = fake_cpa(Routes::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let expected = push_workload(&cpa, 9, WorkloadMix::default(), 2_000);
    let config = dir.path().join("config.yaml");
    let alias_key = fake_cpa::CLIENT_API_KEYS[0];
    std::fs::write(
        &config,
        format!("series-limit: 10\nlabels:\n  drop: [endpoint, requested_model]\n  api-key-aliases:\n    {alias_key}: team-a\n"),
    )
    .unwrap();
    let mut s = Setup::in_dir(&cpa, KEY, &dir, "labels");
    s.extra
        .push(("CPA_EXPORTER_CONFIG", config.display().to_string()));
    let exporter = Exporter::spawn(&s);
    let m = drained(&exporter, &cpa, 2_000.0).await;
    let total: f64 = expected.requests.values().sum();
    assert_eq!(m.sum("cpa_requests_total", &[]), total);
    let tokens: f64 = expected.tokens.values().sum();
    assert_eq!(m.sum("cpa_tokens_total", &[]), tokens);
    for labels in m.series("cpa_requests_total").keys() {
        assert!(!labels.contains_key("endpoint") && !labels.contains_key("requested_model"));
    }
    // The aliased key is never shown by its hash. Which label sets win the 10 slots depends
    // on the first batch's order, so `team-a` itself may be folded into `__other__`.
    let hashed = cpa_usage_exporter::labels::api_key_label(alias_key);
    assert_eq!(m.sum("cpa_requests_total", &[("api_key", &hashed)]), 0.0);
    let shown: Vec<_> = m.series("cpa_requests_total").keys().cloned().collect();
    assert!(
        shown
            .iter()
            .any(|l| l.get("api_key").map(String::as_str) == Some("team-a"))
            || m.sum("cpa_requests_total", &[("api_key", "__other__")]) > 0.0,
        "{shown:?}"
    );
    // The cap held: 10 real series plus one overflow series, and the overflow was counted.
    assert_eq!(
        m.sum("cpa_exporter_series", &[("family", "requests")]),
        11.0
    );
    assert!(m.sum("cpa_requests_total", &[("model", "__other__")]) > 0.0);
    assert!(
        m.sum(
            "cpa_exporter_series_overflow_total",
            &[("family", "requests")]
        ) > 0.0
    );
}

/// Keys, e-mails, upstream keys, error bodies and client IPs from records never leave the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_metrics_pages_or_the_database() {
    let cpa = fake_cpa(Routes::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let mix = WorkloadMix {
        failed: 0.3,
        invalid: 0.05,
        ..WorkloadMix::default()
    };
    push_workload(&cpa, 13, mix, 2_000);
    let mut s = Setup::in_dir(&cpa, KEY, &dir, "secrets");
    s.extra.push(("CPA_EXPORTER_LOG_LEVEL", "trace".into()));
    let exporter = Exporter::spawn(&s);
    drained(&exporter, &cpa, 2_000.0).await;
    let metrics = exporter.scrape_text().await;
    let landing = reqwest::get(exporter.url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    exporter.sigterm();
    let log = exporter.log.clone();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());
    let log = std::fs::read_to_string(log).unwrap();
    let mut db = std::fs::read(s.db).unwrap();
    db.extend(std::fs::read(format!("{}-wal", s.db.display())).unwrap_or_default());
    let db = String::from_utf8_lossy(&db);
    let mut secrets: Vec<&str> = vec![
        KEY,
        "sk-client-",
        "sk-upstream-",
        "@example.",
        "203.0.113.7",
        "198.51.100.23",
        "Bad Gateway",
        "too long",
    ];
    secrets.extend(fake_cpa::CLIENT_API_KEYS);
    for secret in secrets {
        for (place, text) in [
            ("log", &log),
            ("/metrics", &metrics),
            ("/", &landing),
            ("database", &db.to_string()),
        ] {
            assert!(!text.contains(secret), "{secret} found in the {place}");
        }
    }
    assert!(log.contains("batch committed"), "trace logging was on");
}

/// A new series is exported at 0 for `new-series-hold`, then at its exact value: every scraper
/// gets a zero sample to count the first increment from. The exporter's own record counters
/// (known in advance, exported at 0 from the start) are never held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_series_show_zero_for_the_hold_then_their_exact_value() {
    let cpa = fake_cpa(Routes::Both).await;
    let dir = tempfile::tempdir().unwrap();
    let expected = push_workload(&cpa, 61, WorkloadMix::default(), 500);
    let s = Setup::in_dir(&cpa, KEY, &dir, "hold").with_env("CPA_EXPORTER_NEW_SERIES_HOLD", "8s");
    let exporter = Exporter::spawn(&s);
    let m = drained(&exporter, &cpa, 500.0).await;
    assert!(!m.series("cpa_requests_total").is_empty());
    assert_eq!(m.sum("cpa_requests_total", &[]), 0.0, "held at zero");
    assert_eq!(m.sum("cpa_tokens_total", &[]), 0.0);
    assert_eq!(m.sum("cpa_request_duration_seconds_count", &[]), 0.0);
    let invalid: f64 = expected.invalid.values().sum();
    assert_eq!(
        m.sum("cpa_exporter_records_total", &[("outcome", "invalid")]),
        invalid,
        "known in advance: not held"
    );
    let exact = eventually(Duration::from_secs(15), async || {
        let observed = Expected::observed(&exporter.scrape().await);
        observed.requests == expected.requests && observed.tokens == expected.tokens
    })
    .await;
    assert!(exact, "not exact after the hold");
}
