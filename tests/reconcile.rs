//! Reconciliation with CPA's own counts: records the fake CPA counted but never delivered show
//! as `cpa_exporter_unaccounted_records`, for a file credential (the credentials listing) and a
//! config API key (`api-key-usage`, joined by the `auth_index` CPA derives from the key), and
//! in `check`.

mod common;

use std::time::Duration;

use common::*;
use cpa_usage_exporter::cpa::mgmt::api_key_auth_index;
use fake_cpa::{FakeCpa, SimApiKey, SimConfig, SimCredential};

const KEY: &str = "test-management-key";
/// A file (OAuth) credential of the listing.
const FILE_CRED: &str = "0a1b2c3d4e5f6071";
/// A config API key: a secret that must reach neither /metrics nor the log.
const UPSTREAM_KEY: &str = "sk-upstream-secret-a";
const BASE_URL: &str = "http://127.0.0.1:18081/v1";
const COMPAT: &str = "fakeup";

/// The `auth_index` CPA gives the API key's records.
fn key_index() -> String {
    api_key_auth_index(COMPAT, BASE_URL, UPSTREAM_KEY)[0].clone()
}

/// A successful record of `auth_index`, as CPA publishes it.
fn record(auth_index: &str, provider: &str, n: usize) -> String {
    serde_json::json!({
        "timestamp": "2026-08-22T14:39:03.512874113Z", "latency_ms": 800, "ttft_ms": 100,
        "source": UPSTREAM_KEY, "auth_index": auth_index,
        "tokens": {"input_tokens": 10, "output_tokens": 5, "reasoning_tokens": 0,
                   "cached_tokens": 0, "total_tokens": 15},
        "failed": false, "fail": {"status_code": 200, "body": ""},
        "provider": provider, "model": "fake-ok", "endpoint": "POST /v1/chat/completions",
        "auth_type": "apikey", "api_key": "test-client-key", "request_id": format!("{n:08x}"),
        "event_id": format!("{auth_index}-{n}"),
    })
    .to_string()
}

fn api_key(success: u64, failed: u64) -> SimApiKey {
    let mut k = SimApiKey::new(COMPAT, BASE_URL, UPSTREAM_KEY);
    k.success = success;
    k.failed = failed;
    k
}

/// CPA's count of the file credential goes up by `n` without a record: lost on the way.
fn lose(cpa: &FakeCpa, n: u64) {
    let mut list = cpa.credentials();
    for c in list.iter_mut().filter(|c| c.auth_index == FILE_CRED) {
        c.success += n;
    }
    cpa.set_credentials(list);
}

async fn unaccounted(exporter: &Exporter, credential: &str) -> Option<f64> {
    let m = exporter.scrape().await;
    m.series("cpa_exporter_unaccounted_records")
        .into_iter()
        .find(|(labels, _)| labels.get("credential").map(String::as_str) == Some(credential))
        .map(|(_, v)| v)
}

async fn wait_for(exporter: &Exporter, credential: &str, want: f64) {
    let ok = eventually(Duration::from_secs(40), async || {
        unaccounted(exporter, credential).await == Some(want)
    })
    .await;
    assert!(
        ok,
        "{credential}: want {want}, have {:?}; log:\n{}",
        unaccounted(exporter, credential).await,
        exporter.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_counted_by_cpa_but_never_delivered_show_as_unaccounted() {
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        credentials: vec![SimCredential::new("codex", FILE_CRED, "alice@example.com")],
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA");
    // Delivered: 5 records of the file credential (the fake counts them), 4 of the API key.
    for n in 0..5 {
        cpa.push_raw(&record(FILE_CRED, "codex", n));
    }
    for n in 0..4 {
        cpa.push_raw(&record(&key_index(), "openai-compatible-fakeup", 100 + n));
    }
    cpa.set_api_keys(vec![api_key(4, 0)]);
    let dir = tempfile::tempdir().unwrap();
    // Popping: with both channels subscribed the listing (and CPA's counts) are read every
    // 5 minutes instead of every interval, longer than this test waits.
    let setup = Setup::in_dir(&cpa, KEY, &dir, "reconcile")
        .with_env("CPA_TRANSPORT", "resp")
        .with_env("CPA_EXPORTER_CREDENTIALS_INTERVAL", "5s");
    let exporter = Exporter::spawn(&setup);
    drained(&exporter, &cpa, 9.0).await;
    wait_for(&exporter, FILE_CRED, 0.0).await;
    wait_for(&exporter, &key_index(), 0.0).await;

    // CPA counts 3 more attempts on each credential whose records never arrive (another
    // consumer popped them, or they expired).
    lose(&cpa, 3);
    cpa.set_api_keys(vec![api_key(6, 1)]);
    wait_for(&exporter, FILE_CRED, 3.0).await;
    wait_for(&exporter, &key_index(), 3.0).await;

    let m = exporter.scrape().await;
    let attempts = |credential: &str, outcome: &str| {
        m.sum(
            "cpa_credential_attempts_total",
            &[("credential", credential), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts(FILE_CRED, "success"), 8.0);
    assert_eq!(attempts(&key_index(), "success"), 6.0);
    assert_eq!(attempts(&key_index(), "failed"), 1.0);
    let text = exporter.scrape_text().await;
    assert!(
        text.contains(&format!(
            r#"cpa_exporter_unaccounted_records{{credential="{}",provider="fakeup"}} 3"#,
            key_index()
        )),
        "{text}"
    );
    let log = exporter.log_text();
    assert!(
        log.contains("never reached the exporter"),
        "the loss is logged: {log}"
    );
    for place in [&text, &log] {
        assert!(!place.contains(UPSTREAM_KEY), "the upstream key leaked");
        assert!(!place.contains("alice@"), "an e-mail leaked");
    }

    // `check` (the exporter stopped, on the same database) reports the same loss.
    exporter.sigterm();
    exporter.wait_exit(Duration::from_secs(20));
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["check", "--consumer-window", "0s"])
        .env_clear()
        .env("CPA_URL", cpa.url())
        .env("CPA_MANAGEMENT_KEY", KEY)
        .env("CPA_EXPORTER_DB", setup.db);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run check"))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("reconcile"))
        .unwrap_or_default();
    assert!(line.starts_with("warn"), "{stdout}");
    assert!(
        line.contains("CPA counted 15 attempts on 2 credentials"),
        "{stdout}"
    );
    assert!(line.contains("6 of them on 2 credentials"), "{stdout}");
    assert!(line.contains("--transport subscribe"), "{stdout}");
    assert!(!stdout.contains(UPSTREAM_KEY));
}
