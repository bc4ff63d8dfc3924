//! CPA's errors channel: the real binary, subscribed to the fake CPA, counts failed attempts per
//! credential and moves the credential gauges within a second of the failure; the next listing
//! read is the authority again. And what subscribing saves CPA in bcrypt checks.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fake_cpa::{FakeCpa, SimConfig, SimCredential};
use serde_json::json;

const KEY: &str = "test-management-key";
const INDEX: &str = "27317114bd5866cb";
/// A failure must show within this long of CPA publishing it.
const LIVE: Duration = Duration::from_secs(1);

async fn fake_cpa() -> FakeCpa {
    let mut c = SimCredential::new("codex", INDEX, "alice@example.com");
    c.status = "active".to_owned();
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        credentials: vec![c],
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA")
}

/// The event the real CPA v7.2.140 sent for a 429 (captured), with times an hour ahead and the
/// upstream's text carrying a key and an e-mail, as it may.
fn cooling_event(until: &str) -> String {
    let body = r#"{"error":{"message":"Rate limit reached for sk-upstream-secret user alice@example.com"}}"#;
    json!({
        "timestamp": "2026-12-07T21:28:16.262223979Z", "provider": "codex", "model": "gpt-5",
        "auth_id": "codex-alice@example.com.json", "auth_index": INDEX, "status_code": 429,
        "body": body,
        "auth_status": {
            "status": "error", "status_message": body, "disabled": false, "unavailable": true,
            "next_retry_after": until,
            "quota": {"exceeded": true, "reason": "quota", "next_recover_at": until, "backoff_level": 1},
            "model": {"name": "gpt-5", "status": "error", "unavailable": true, "next_retry_after": until}
        }
    })
    .to_string()
}

fn failed_record(status: u16) -> serde_json::Value {
    json!({
        "timestamp": "2026-12-07T21:22:08.114445816Z", "auth_index": INDEX,
        "failed": true, "fail": { "status_code": status, "body": "upstream down for alice@example.com" },
        "provider": "codex", "model": "gpt-5", "request_id": "3ddebe62",
        "tokens": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
    })
}

/// Wait until the scrape satisfies `check`; returns how long it took.
async fn within(
    exporter: &Exporter,
    limit: Duration,
    check: impl Fn(&Metrics) -> bool,
) -> Duration {
    let start = Instant::now();
    let ok = eventually(limit, async || check(&exporter.scrape().await)).await;
    assert!(
        ok,
        "not within {limit:?}; scrape:\n{}\nlog:\n{}",
        exporter.scrape_text().await,
        exporter.log_text()
    );
    start.elapsed()
}

fn status_is(m: &Metrics, status: &str) -> bool {
    m.sum(
        "cpa_credential_status",
        &[("credential", INDEX), ("status", status)],
    ) == 1.0
}

// Two workers: the fake CPA must answer the exporter's UNSUBSCRIBE while this thread waits
// for the exporter to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_count_and_move_the_credential_gauges_within_a_second() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(
        &Setup::in_dir(&cpa, KEY, &dir, "errors")
            .with_env("CPA_TRANSPORT", "subscribe")
            .with_env("CPA_EXPORTER_CREDENTIALS_INTERVAL", "30s"),
    );
    // Both channels subscribed and the listing read once.
    within(&exporter, Duration::from_secs(15), |m| {
        m.get("cpa_exporter_errors_subscribed") == Some(1.0)
            && m.get("cpa_exporter_subscribed") == Some(1.0)
            && status_is(m, "active")
    })
    .await;
    assert_eq!(cpa.stats().error_subscribers, 1);

    // A failed record: one event on errors (with the listed state), counted at once.
    cpa.push(&failed_record(503));
    let took = within(&exporter, LIVE * 3, |m| {
        m.sum(
            "cpa_credential_errors_total",
            &[
                ("provider", "codex"),
                ("credential", INDEX),
                ("status_code", "503"),
            ],
        ) == 1.0
    })
    .await;
    assert!(took <= LIVE, "counted after {took:?}");

    // CPA cools the credential down: the gauges say so before any listing read.
    let until = "2099-01-01T00:00:00Z";
    cpa.push_error_raw(&cooling_event(until));
    let took = within(&exporter, LIVE * 3, |m| {
        let c = [("credential", INDEX), ("provider", "codex")];
        m.sum(
            "cpa_credential_errors_total",
            &[("credential", INDEX), ("status_code", "429")],
        ) == 1.0
            && status_is(m, "error")
            && m.sum("cpa_credential_unavailable", &c) == 1.0
            && m.sum("cpa_credential_next_retry_timestamp_seconds", &c) == 4_070_908_800.0
            && m.sum("cpa_credential_quota_recover_timestamp_seconds", &c) == 4_070_908_800.0
    })
    .await;
    assert!(took <= LIVE, "the gauges moved after {took:?}");

    // The listing (still active) is the authority again once read: a refresh notice has it read.
    cpa.refresh();
    within(&exporter, Duration::from_secs(10), |m| {
        status_is(m, "active")
            && m.sum("cpa_credential_unavailable", &[("credential", INDEX)]) == 0.0
            && m.series("cpa_credential_quota_recover_timestamp_seconds")
                .is_empty()
    })
    .await;

    let text = exporter.scrape_text().await;
    let log = exporter.log_text();
    for secret in ["alice", "sk-upstream", "Rate limit", "codex-alice"] {
        assert!(!text.contains(secret), "{secret} in /metrics");
        assert!(!log.contains(secret), "{secret} in the log");
    }
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(15)).success());
    let hung_up = eventually(Duration::from_secs(5), async || {
        cpa.stats().error_subscribers == 0
    })
    .await;
    assert!(hung_up, "the reader hung up on exit");
}

#[tokio::test]
async fn over_http_the_errors_channel_is_not_touched() {
    // Configured HTTP, and `auto` beside a CPA without RESP (as v7.1.17).
    for (transport, resp_enabled) in [("http", true), ("auto", false)] {
        let mut c = SimCredential::new("codex", INDEX, "alice@example.com");
        c.status = "active".to_owned();
        let cpa = FakeCpa::start(SimConfig {
            management_key: KEY.to_owned(),
            credentials: vec![c],
            resp_enabled,
            ..SimConfig::default()
        })
        .await
        .expect("fake CPA");
        let dir = tempfile::tempdir().unwrap();
        let exporter = Exporter::spawn(
            &Setup::in_dir(&cpa, KEY, &dir, transport).with_env("CPA_TRANSPORT", transport),
        );
        within(&exporter, Duration::from_secs(10), |m| {
            status_is(m, "active")
        })
        .await;
        cpa.push(&failed_record(503));
        within(&exporter, Duration::from_secs(10), |m| {
            m.sum("cpa_requests_total", &[]) > 0.0
        })
        .await;
        let m = exporter.scrape().await;
        assert_eq!(m.get("cpa_exporter_errors_subscribed"), None, "{transport}");
        assert!(m.series("cpa_credential_errors_total").is_empty());
        let stats = cpa.stats();
        assert_eq!((stats.error_subscribers, stats.auth_failures), (0, 0));
    }
}

/// Authenticated management requests per minute (each a bcrypt compare in CPA), idle, with the
/// default intervals, after a minute of start-up (the first reads and logins):
/// `cargo test --test errors_channel -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "runs seven minutes; prints the numbers"]
async fn bcrypt_checks_per_minute() {
    const WARM_UP: Duration = Duration::from_secs(60);
    /// Covers one 5-minute listing read while subscribed.
    const MINUTES: u64 = 6;
    let modes = [("http", "5s"), ("resp", "1s"), ("subscribe", "1s")];
    let dir = tempfile::tempdir().unwrap();
    // A copy: the shared target directory's binary may be rebuilt meanwhile.
    let bin = dir.path().join("exporter");
    std::fs::copy(BIN, &bin).unwrap();
    let mut runs = Vec::new();
    for (transport, poll) in modes {
        let cpa = fake_cpa().await;
        let db = dir.path().join(format!("{transport}.db"));
        let mut setup = Setup::in_dir(&cpa, KEY, &dir, transport)
            .with_env("CPA_TRANSPORT", transport)
            .with_env("CPA_EXPORTER_POLL_INTERVAL", poll)
            .with_env("CPA_EXPORTER_CREDENTIALS_INTERVAL", "30s");
        setup.db = Box::leak(db.into_boxed_path());
        let exporter = Exporter::spawn_via(&setup, std::process::Command::new(&bin));
        runs.push((transport, cpa, exporter));
    }
    let checks = |s: &fake_cpa::SimStats| (s.authorized_requests, s.resp_auths);
    tokio::time::sleep(WARM_UP).await;
    let start: Vec<_> = runs
        .iter()
        .map(|(_, cpa, _)| checks(&cpa.stats()))
        .collect();
    tokio::time::sleep(Duration::from_secs(MINUTES * 60)).await;
    for ((transport, cpa, exporter), (http0, resp0)) in runs.iter().zip(start) {
        let (http, resp) = checks(&cpa.stats());
        let (http, resp) = (http - http0, resp - resp0);
        println!(
            "{transport:>9}: {:.2} bcrypt checks/min ({http} HTTP management requests, {resp} RESP logins in {MINUTES} min after {WARM_UP:?}; errors subscribers {})",
            (http + resp) as f64 / MINUTES as f64,
            cpa.stats().error_subscribers,
        );
        exporter.sigterm();
    }
}
