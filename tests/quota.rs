//! Quota and rate-limit gauges from response headers, exact values, across a restart.

mod common;

use std::time::Duration;

use common::*;
use fake_cpa::{FakeCpa, SimConfig};

const KEY: &str = "quota-test-key";

fn record(ts: &str, provider: &str, credential: &str, headers: &str) -> String {
    format!(
        r#"{{"timestamp":"{ts}","latency_ms":2000,"ttft_ms":500,"provider":"{provider}","model":"m","auth_index":"{credential}",
            "tokens":{{"input_tokens":10,"output_tokens":5,"total_tokens":15}},"response_headers":{headers}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_gauges_hold_the_latest_header_values_per_credential() {
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.into(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ts = |ago: u64| {
        // RFC 3339 in UTC from Unix seconds, without a date crate.
        let t = now - ago;
        let (days, secs) = (t / 86_400, t % 86_400);
        let (y, m, d) = cpa_usage_exporter::time::civil_from_days(days as i64);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    };
    // Older codex observation first, then a newer one: the newer values win.
    cpa.push_raw(&record(&ts(120), "codex", "c0dec0dec0dec0de", r#"{"X-Codex-Primary-Used-Percent":["10"],"x-codex-primary-window-minutes":["300"],"Set-Cookie":["session=SECRET-COOKIE"]}"#));
    cpa.push_raw(&record(&ts(60), "codex", "c0dec0dec0dec0de", r#"{"x-codex-primary-used-percent":["42.5"],"x-codex-primary-reset-after-seconds":["1000"],"x-codex-secondary-used-percent":["90"]}"#));
    cpa.push_raw(&record(&ts(30), "claude", "c1a0dec1a0dec1a0", r#"{"anthropic-ratelimit-unified-5h-utilization":["0.985"],"anthropic-ratelimit-unified-5h-reset":["1999999999"]}"#));
    cpa.push_raw(&record(&ts(10), "openrouter", "0bee0bee0bee0bee", r#"{"x-ratelimit-limit-requests":["500"],"x-ratelimit-remaining-requests":["499"],"x-ratelimit-remaining-tokens":["123456"]}"#));

    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        cpa_url: cpa.url(),
        key: KEY,
        db: &dir.path().join("q.db"),
        log: dir.path().join("q.log"),
        extra: vec![],
    };
    let exporter = Exporter::spawn(&setup);
    let ok = eventually(Duration::from_secs(20), async || {
        accounted(&exporter.scrape().await) >= 4.0
    })
    .await;
    assert!(ok, "{}", exporter.log_text());

    let check = |m: &Metrics| {
        let g = |name: &str, labels: &[(&str, &str)]| m.sum(name, labels);
        let codex = [("credential", "c0dec0dec0dec0de"), ("provider", "codex")];
        let w = |win: &'static str| [codex[0], codex[1], ("window", win)];
        assert_eq!(g("cpa_quota_used_ratio", &w("primary")), 0.425);
        assert_eq!(g("cpa_quota_used_ratio", &w("secondary")), 0.9);
        assert_eq!(
            g("cpa_quota_window_seconds", &w("primary")),
            18_000.0,
            "kept from the older record"
        );
        // Reset = arrival of the response (start 60 s ago + 0.5 s ttft) + 1000 s.
        let reset = g("cpa_quota_reset_timestamp_seconds", &w("primary"));
        assert!(
            (reset - ((now - 60) as f64 + 0.5 + 1000.0)).abs() < 1e-3,
            "{reset}"
        );
        let claude = [("credential", "c1a0dec1a0dec1a0"), ("window", "5h")];
        assert_eq!(g("cpa_quota_used_ratio", &claude), 0.985);
        assert_eq!(g("cpa_quota_window_seconds", &claude), 18_000.0);
        assert_eq!(
            g("cpa_quota_reset_timestamp_seconds", &claude),
            1_999_999_999.0
        );
        let rl = |res: &'static str| [("credential", "0bee0bee0bee0bee"), ("resource", res)];
        assert_eq!(g("cpa_ratelimit_limit", &rl("requests")), 500.0);
        assert_eq!(g("cpa_ratelimit_remaining", &rl("requests")), 499.0);
        assert_eq!(g("cpa_ratelimit_remaining", &rl("tokens")), 123_456.0);
        let seen = g(
            "cpa_quota_last_observed_timestamp_seconds",
            &[("credential", "0bee0bee0bee0bee")],
        );
        assert!((seen - ((now - 10) as f64 + 0.5)).abs() < 1e-3);
        assert_eq!(
            m.series("cpa_quota_last_observed_timestamp_seconds").len(),
            3
        );
    };
    check(&exporter.scrape().await);

    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());
    let restarted = Exporter::spawn(&setup);
    check(&restarted.scrape().await);
    drop(restarted);
    let db = std::fs::read(dir.path().join("q.db")).unwrap();
    assert!(!String::from_utf8_lossy(&db).contains("SECRET-COOKIE"));
}

async fn quota_cpa() -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.into(),
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A record stamped 2099 counts as made when it was popped: no gauge moves into the future,
/// and a later real observation replaces its values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_stamped_in_the_future_freezes_nothing() {
    let cpa = quota_cpa().await;
    let headers = |pct: u32| format!(r#"{{"x-codex-primary-used-percent":["{pct}"]}}"#);
    cpa.push_raw(&record(
        "2099-01-01T00:00:00Z",
        "codex",
        "c0dec0dec0dec0de",
        &headers(90),
    ));
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        cpa_url: cpa.url(),
        key: KEY,
        db: &dir.path().join("q.db"),
        log: dir.path().join("q.log"),
        extra: vec![],
    };
    let exporter = Exporter::spawn(&setup);
    let used = |m: &Metrics| m.sum("cpa_quota_used_ratio", &[("window", "primary")]);
    let ok = eventually(Duration::from_secs(20), async || {
        used(&exporter.scrape().await) == 0.9
    })
    .await;
    assert!(ok, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    let now = unix_now() + 1.0;
    assert!(m.get("cpa_exporter_last_record_timestamp_seconds").unwrap() <= now);
    assert!(m.sum("cpa_quota_last_observed_timestamp_seconds", &[]) <= now);
    // A real observation popped later wins, and keeps winning after a restart.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let ts = fake_cpa::workload::rfc3339_nano(unix_now() - 0.6);
    cpa.push_raw(&record(&ts, "codex", "c0dec0dec0dec0de", &headers(30)));
    let ok = eventually(Duration::from_secs(20), async || {
        used(&exporter.scrape().await) == 0.3
    })
    .await;
    assert!(ok, "{}", exporter.log_text());
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());
    let restarted = Exporter::spawn(&setup);
    assert_eq!(used(&restarted.scrape().await), 0.3);
}

/// 300 credentials against a series limit of 20: each quota family holds at most 20 series,
/// reported in cpa_exporter_series, and the refused records are counted as overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_families_stay_under_the_series_limit() {
    let cpa = quota_cpa().await;
    let ts = fake_cpa::workload::rfc3339_nano(unix_now() - 5.0);
    for i in 0..300 {
        cpa.push_raw(&record(
            &ts,
            "codex",
            &format!("{i:016x}"),
            r#"{"x-codex-primary-used-percent":["10"],"x-codex-secondary-used-percent":["20"],"x-ratelimit-remaining-requests":["9"]}"#,
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "series-limit: 20\n").unwrap();
    let setup = Setup {
        cpa_url: cpa.url(),
        key: KEY,
        db: &dir.path().join("q.db"),
        log: dir.path().join("q.log"),
        extra: vec![("CPA_EXPORTER_CONFIG", config.display().to_string())],
    };
    let exporter = Exporter::spawn(&setup);
    let ok = eventually(Duration::from_secs(20), async || {
        accounted(&exporter.scrape().await) == 300.0
    })
    .await;
    assert!(ok, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    for (family, metric) in [
        ("quota_used_ratio", "cpa_quota_used_ratio"),
        ("ratelimit_remaining", "cpa_ratelimit_remaining"),
        (
            "quota_last_observed_timestamp_seconds",
            "cpa_quota_last_observed_timestamp_seconds",
        ),
    ] {
        let reported = m.sum("cpa_exporter_series", &[("family", family)]);
        assert_eq!(reported, m.series(metric).len() as f64, "{family}");
        assert_eq!(reported, 20.0, "{family}");
    }
    // Twenty credentials fit; the used-ratio family is full after ten of them (two windows
    // each), so the next ten keep only their rate limit; the other 280 records are refused.
    let overflow = |family| m.sum("cpa_exporter_series_overflow_total", &[("family", family)]);
    assert_eq!(overflow("quota_used_ratio"), 10.0);
    assert_eq!(overflow("ratelimit_remaining"), 0.0);
    assert_eq!(
        m.sum(
            "cpa_exporter_series_overflow_total",
            &[("family", "quota_last_observed_timestamp_seconds")]
        ),
        280.0
    );
}
