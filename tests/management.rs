//! CPA's settings, identity and credentials (the management poller), and the `check`
//! subcommand: the real binary against the fake CPA.

mod common;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use common::*;
use fake_cpa::{FakeCpa, Routes, SimConfig, SimCredential, Workload, WorkloadMix};

const KEY: &str = "test-management-key";
/// Every e-mail local part the credentials below carry: none may reach /metrics or the log.
const LOCAL_PARTS: [&str; 5] = ["alice@", "dev-team", "carol.ops", "erin.k@", "frank@"];
/// 2026-08-22T14:40:00Z.
const RETRY_AT: f64 = 1_787_409_600.0;

fn cred(provider: &str, index: &str, account: &str, status: &str) -> SimCredential {
    let mut c = SimCredential::new(provider, index, account);
    c.status = status.to_owned();
    c
}

/// One credential per status CPA knows, plus one it does not, with labels, flags and e-mails.
fn credentials() -> Vec<SimCredential> {
    let mut a = cred("codex", "0a1b2c3d4e5f6071", "alice@example.com", "active");
    a.success = 40;
    a.failed = 2;
    let mut b = cred(
        "claude",
        "1b2c3d4e5f607182",
        "dev-team@example.com",
        "error",
    );
    b.status_message = "refresh token revoked for dev-team@example.com".to_owned();
    b.unavailable = true;
    b.next_retry_after = Some("2026-08-22T14:40:00Z".to_owned());
    let mut c = cred(
        "gemini-cli",
        "2c3d4e5f60718293",
        "carol.ops@example.net",
        "disabled",
    );
    c.label = "gemini-team".to_owned();
    c.disabled = true;
    let d = cred(
        "vertex",
        "3d4e5f6071829304",
        "acme-vertex-prod-4821",
        "refreshing",
    );
    let e = cred("qwen", "4e5f607182930415", "erin.k@example.org", "pending");
    let f = cred(
        "kimi",
        "5f60718293041526",
        "frank@example.net",
        "cooling-down",
    );
    vec![a, b, c, d, e, f]
}

async fn fake_cpa(routes: Routes, version: &str) -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        routes,
        version: version.to_owned(),
        credentials: credentials(),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA")
}

fn setup<'a>(cpa: &FakeCpa, key: &'a str, dir: &'a tempfile::TempDir, name: &str) -> Setup<'a> {
    Setup::in_dir(cpa, key, dir, name).with_env("CPA_EXPORTER_CREDENTIALS_INTERVAL", "5s")
}

type Series = BTreeMap<BTreeMap<String, String>, f64>;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `name -> (credential, provider)` for the credentials above.
const SHOWN: [(&str, &str, &str, &str); 6] = [
    (
        "0a1b2c3d4e5f6071",
        "codex",
        "codex-a***@example.com.json",
        "active",
    ),
    (
        "1b2c3d4e5f607182",
        "claude",
        "claude-d***@example.com.json",
        "error",
    ),
    ("2c3d4e5f60718293", "gemini-cli", "gemini-team", "disabled"),
    (
        "3d4e5f6071829304",
        "vertex",
        "vertex-acme-vertex-prod-4821.json",
        "refreshing",
    ),
    (
        "4e5f607182930415",
        "qwen",
        "qwen-e***@example.org.json",
        "pending",
    ),
    (
        "5f60718293041526",
        "kimi",
        "kimi-f***@example.net.json",
        "unknown",
    ),
];
const STATUSES: [&str; 6] = [
    "active",
    "pending",
    "refreshing",
    "error",
    "disabled",
    "unknown",
];

fn expected_info() -> Series {
    SHOWN
        .iter()
        .map(|(c, p, n, _)| {
            (
                labels(&[("credential", c), ("provider", p), ("name", n)]),
                1.0,
            )
        })
        .collect()
}

fn expected_status() -> Series {
    let mut out = Series::new();
    for (c, p, _, current) in SHOWN {
        for s in STATUSES {
            let v = if s == current { 1.0 } else { 0.0 };
            out.insert(
                labels(&[("credential", c), ("provider", p), ("status", s)]),
                v,
            );
        }
    }
    out
}

fn expected_flag(set: &[&str]) -> Series {
    SHOWN
        .iter()
        .map(|(c, p, _, _)| {
            let v = if set.contains(c) { 1.0 } else { 0.0 };
            (labels(&[("credential", c), ("provider", p)]), v)
        })
        .collect()
}

async fn with_credentials(exporter: &Exporter) -> Metrics {
    let ok = eventually(Duration::from_secs(20), async || {
        !exporter
            .scrape()
            .await
            .series("cpa_credential_info")
            .is_empty()
    })
    .await;
    assert!(ok, "no credentials; log:\n{}", exporter.log_text());
    exporter.scrape().await
}

fn assert_no_personal_data(text: &str, place: &str) {
    for secret in LOCAL_PARTS
        .iter()
        .chain(&["refresh token revoked", KEY, "sk-client-"])
    {
        assert!(!text.contains(secret), "{secret} found in {place}");
    }
}

async fn metrics_text(exporter: &Exporter) -> String {
    exporter.scrape_text().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gauge_is_exact_on_v0_and_v8() {
    for (routes, version) in [(Routes::V0, "v7.2.140"), (Routes::V8, "v8.0.3")] {
        let cpa = fake_cpa(routes, version).await;
        let dir = tempfile::tempdir().unwrap();
        let exporter = Exporter::spawn(&setup(&cpa, KEY, &dir, version));
        let m = with_credentials(&exporter).await;
        assert_eq!(
            m.series("cpa_credential_info"),
            expected_info(),
            "{version}"
        );
        assert_eq!(
            m.series("cpa_credential_status"),
            expected_status(),
            "{version}"
        );
        assert_eq!(
            m.series("cpa_credential_unavailable"),
            expected_flag(&["1b2c3d4e5f607182"])
        );
        assert_eq!(
            m.series("cpa_credential_disabled"),
            expected_flag(&["2c3d4e5f60718293"])
        );
        let retry = labels(&[("credential", "1b2c3d4e5f607182"), ("provider", "claude")]);
        assert_eq!(
            m.series("cpa_credential_next_retry_timestamp_seconds"),
            Series::from([(retry, RETRY_AT)])
        );
        let info = labels(&[("version", version), ("commit", "4e7b1c9")]);
        assert_eq!(m.series("cpa_info"), Series::from([(info, 1.0)]));
        let ok = eventually(Duration::from_secs(10), async || {
            exporter.scrape().await.get("cpa_usage_statistics_enabled") == Some(1.0)
        })
        .await;
        assert!(ok, "{}", exporter.log_text());
        let m = exporter.scrape().await;
        assert_eq!(m.get("cpa_usage_queue_retention_seconds"), Some(60.0));
        assert_no_personal_data(&metrics_text(&exporter).await, "/metrics");
        let route = if routes == Routes::V0 { "v0" } else { "v8" };
        assert!(
            exporter.log_text().contains(&format!("route=\"{route}\"")),
            "{}",
            exporter.log_text()
        );
        assert_no_personal_data(&exporter.log_text(), "the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_and_removals_show_after_the_next_poll() {
    let cpa = fake_cpa(Routes::Both, "v8.0.3").await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(&cpa, KEY, &dir, "changes"));
    with_credentials(&exporter).await;
    let mut list = credentials();
    list.retain(|c| c.provider != "kimi");
    list[0].status = "error".to_owned();
    list[0].unavailable = true;
    list[0].next_retry_after = Some("2026-08-22T14:40:00+02:00".to_owned());
    cpa.set_credentials(list);
    let changed = eventually(Duration::from_secs(15), async || {
        exporter.scrape().await.series("cpa_credential_info").len() == 5
    })
    .await;
    assert!(changed, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    let codex = [("credential", "0a1b2c3d4e5f6071"), ("provider", "codex")];
    let status = |s: &str| {
        let mut l = codex.to_vec();
        l.push(("status", s));
        m.series("cpa_credential_status")[&labels(&l)]
    };
    assert_eq!((status("error"), status("active")), (1.0, 0.0));
    assert_eq!(m.series("cpa_credential_unavailable")[&labels(&codex)], 1.0);
    assert_eq!(
        m.series("cpa_credential_next_retry_timestamp_seconds")[&labels(&codex)],
        RETRY_AT - 7200.0
    );
    for family in [
        "cpa_credential_info",
        "cpa_credential_status",
        "cpa_credential_unavailable",
        "cpa_credential_disabled",
    ] {
        assert!(
            m.series(family)
                .keys()
                .all(|l| l["credential"] != "5f60718293041526"),
            "{family} still shows the removed credential"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn display_names_apply_everywhere_and_unmasking_is_a_switch() {
    let seed = 21;
    let listed = Workload::new(seed, WorkloadMix::default()).credentials();
    let codex = listed
        .iter()
        .find(|c| c.provider == "codex")
        .expect("a codex credential")
        .clone();
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        credentials: listed.clone(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let expected = push_workload(&cpa, seed, WorkloadMix::default(), 1_000);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let write_config = |unmask: bool| {
        let text = format!(
            "labels:\n  unmask-credential-names: {unmask}\n  credential-names:\n    {}: team-codex\n",
            codex.auth_index
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config(false);
    let mut s = setup(&cpa, KEY, &dir, "names");
    s.extra
        .push(("CPA_EXPORTER_CONFIG", config.display().to_string()));
    let exporter = Exporter::spawn(&s);
    let ok = eventually(Duration::from_secs(20), async || {
        let m = exporter.scrape().await;
        accounted(&m) >= 1_000.0 && !m.series("cpa_credential_info").is_empty()
    })
    .await;
    assert!(ok, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    let raw_count: f64 = expected
        .requests
        .iter()
        .filter(|(k, _)| k[3] == codex.auth_index)
        .map(|(_, v)| v)
        .sum();
    assert!(raw_count > 0.0);
    assert_eq!(
        m.sum("cpa_requests_total", &[("credential", "team-codex")]),
        raw_count
    );
    assert_eq!(
        m.sum("cpa_requests_total", &[("credential", &codex.auth_index)]),
        0.0
    );
    assert_eq!(
        m.sum("cpa_requests_total", &[]),
        expected.requests.values().sum::<f64>()
    );
    let info = m.series("cpa_credential_info");
    assert_eq!(info.len(), listed.len());
    let shown = info
        .keys()
        .find(|l| l["credential"] == "team-codex")
        .expect("the codex credential under its display name");
    let local = codex.email.split('@').next().unwrap_or_default();
    let masked = codex
        .file_name
        .replace(&format!("{local}@"), &format!("{}***@", &local[..1]));
    assert_eq!(shown["name"], masked);
    let text = metrics_text(&exporter).await;
    for c in &listed {
        if !c.email.is_empty() {
            assert!(!text.contains(&c.email), "{} in /metrics", c.email);
            assert!(!exporter.log_text().contains(&c.email));
        }
    }
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());

    write_config(true);
    let exporter = Exporter::spawn(&s);
    let m = with_credentials(&exporter).await;
    let shown = m
        .series("cpa_credential_info")
        .into_keys()
        .find(|l| l["credential"] == "team-codex")
        .expect("the codex credential");
    assert_eq!(shown["name"], codex.file_name, "unmasked on request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_warnings_are_logged_once_per_change() {
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        usage_statistics_enabled: false,
        retention: Duration::from_secs(10),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(&cpa, KEY, &dir, "warnings");
    s.extra.extend([
        ("CPA_EXPORTER_POLL_INTERVAL", "5s".to_owned()),
        ("CPA_EXPORTER_SETTINGS_INTERVAL", "10s".to_owned()),
        ("CPA_EXPORTER_CREDENTIALS_INTERVAL", "0s".to_owned()),
    ]);
    let exporter = Exporter::spawn(&s);
    let count = |needle: &str| exporter.log_text().matches(needle).count();
    let off = "usage statistics are off in CPA";
    let short = "longer than a quarter of CPA's queue retention";
    let said = eventually(Duration::from_secs(10), async || {
        count(off) == 1 && count(short) == 1
    })
    .await;
    assert!(said, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    assert_eq!(m.get("cpa_usage_statistics_enabled"), Some(0.0));
    assert_eq!(m.get("cpa_usage_queue_retention_seconds"), Some(10.0));
    cpa.set_usage_statistics_enabled(true);
    // The next read (10 s later) sees the change; the unchanged retention is not repeated.
    let on = eventually(Duration::from_secs(15), async || {
        count("usage statistics are on again") == 1
    })
    .await;
    assert!(on, "{}", exporter.log_text());
    assert_eq!(
        (count(off), count(short)),
        (1, 1),
        "{}",
        exporter.log_text()
    );
    assert_eq!(
        exporter.scrape().await.get("cpa_usage_statistics_enabled"),
        Some(1.0)
    );
    assert_no_personal_data(&exporter.log_text(), "the log");
}

/// With a wrong key only the drain loop's attempt reaches CPA; the poller waits for a good key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_management_calls_while_the_key_is_refused() {
    let cpa = fake_cpa(Routes::Both, "v8.0.3").await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(&cpa, "not-the-key-4711", &dir, "wrong"));
    tokio::time::sleep(Duration::from_secs(7)).await;
    let stats = cpa.stats();
    assert_eq!(stats.auth_failures, 1, "{}", exporter.log_text());
    assert_eq!(stats.authorized_requests, 0);
    let m = exporter.scrape().await;
    assert!(m.series("cpa_credential_info").is_empty());
    assert!(m.series("cpa_usage_statistics_enabled").is_empty());

    // A key rotated in CPA while running: each loop stops after at most one refusal.
    let cpa = fake_cpa(Routes::Both, "v8.0.3").await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(&cpa, KEY, &dir, "rotated"));
    with_credentials(&exporter).await;
    cpa.set_management_key("rotated-key");
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        cpa.stats().auth_failures <= 2,
        "{} failures; log:\n{}",
        cpa.stats().auth_failures,
        exporter.log_text()
    );
}

async fn run_check(cpa: &FakeCpa, key: &str, dir: &tempfile::TempDir, window: &str) -> Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["check", "--consumer-window", window])
        .env_clear()
        .env("CPA_URL", cpa.url())
        .env("CPA_MANAGEMENT_KEY", key)
        .env("CPA_EXPORTER_DB", dir.path().join("check.db"));
    tokio::task::spawn_blocking(move || cmd.output().expect("run check"))
        .await
        .expect("join")
}

/// Push generated records (bumping CPA's credential counters) until `stop`.
fn traffic(cpa: &FakeCpa, seed: u64) -> tokio::sync::oneshot::Sender<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let cpa = cpa.clone();
    tokio::spawn(async move {
        let mut workload = Workload::new(seed, WorkloadMix::default());
        while rx.try_recv().is_err() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            cpa.push_raw(&workload.next(now).element_json);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tx
}

fn line<'a>(out: &'a str, check: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(check))
        .unwrap_or_else(|| panic!("no {check} line in\n{out}"))
}

/// A fake CPA whose credentials listing matches the traffic `traffic(&cpa, seed)` generates.
async fn cpa_with_workload_credentials(seed: u64) -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        credentials: Workload::new(seed, WorkloadMix::default()).credentials(),
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_good_setup_with_five_authenticated_calls() {
    let seed = 5;
    let cpa = cpa_with_workload_credentials(seed).await;
    let dir = tempfile::tempdir().unwrap();
    let stop = traffic(&cpa, seed);
    let out = run_check(&cpa, KEY, &dir, "2s").await;
    let _ = stop.send(());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for check in [
        "database",
        "cpa",
        "version",
        "routes",
        "key",
        "statistics",
        "retention",
        "consumers",
        "reconcile",
    ] {
        assert!(line(&stdout, check).starts_with("ok"), "{check}: {stdout}");
    }
    assert!(line(&stdout, "version").contains("v8.0.3"));
    assert!(line(&stdout, "routes").contains("v8"));
    assert!(stdout.contains("made 5 authenticated requests"), "{stdout}");
    let stats = cpa.stats();
    assert_eq!((stats.authorized_requests, stats.auth_failures), (5, 0));
    // What the pop took is in the state database, not lost.
    let (_, state) = cpa_usage_exporter::store::Store::open(
        &dir.path().join("check.db"),
        cpa_usage_exporter::store::Limits::default(),
    )
    .unwrap();
    let stored = state.total_series();
    assert!(stats.popped > 0 && stored > 0, "{stdout}");
    assert!(!stdout.contains(KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_spots_another_consumer() {
    let seed = 6;
    let cpa = cpa_with_workload_credentials(seed).await;
    let stop = traffic(&cpa, seed);
    // Another reader drains the queue every 100 ms.
    let rival = {
        let url = format!("{}/v0/management/usage-queue?count=1000", cpa.url());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let _ = http.get(&url).bearer_auth(KEY).send().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let out = run_check(&cpa, KEY, &dir, "3s").await;
    rival.abort();
    let _ = stop.send(());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let consumers = line(&stdout, "consumers");
    assert!(consumers.starts_with("warn"), "{stdout}");
    assert!(consumers.contains("another consumer"), "{stdout}");
    assert!(out.status.success(), "a suspicion is a warning: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_with_a_wrong_key_fails_after_exactly_one_login() {
    let cpa = fake_cpa(Routes::Both, "v8.0.3").await;
    let dir = tempfile::tempdir().unwrap();
    let out = run_check(&cpa, "not-the-key-0815", &dir, "2s").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let key = line(&stdout, "key");
    assert!(
        key.starts_with("FAIL") && key.contains("wrong key"),
        "{stdout}"
    );
    assert!(line(&stdout, "version").contains("v8.0.3"), "{stdout}");
    assert!(line(&stdout, "consumers").starts_with("skip"), "{stdout}");
    assert!(stdout.contains("made 1 authenticated request "), "{stdout}");
    assert!(!stdout.contains("not-the-key-0815"));
    let stats = cpa.stats();
    assert_eq!((stats.auth_failures, stats.authorized_requests), (1, 0));

    // Statistics off and an unreachable CPA fail with a fix each.
    let off = FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        usage_statistics_enabled: false,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let out = run_check(&off, KEY, &dir, "0s").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    let stats = line(&stdout, "statistics");
    assert!(
        stats.starts_with("FAIL") && stats.contains("fix:"),
        "{stdout}"
    );
    off.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = run_check(&off, KEY, &dir, "0s").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(line(&stdout, "cpa").starts_with("FAIL"), "{stdout}");
    assert!(line(&stdout, "key").starts_with("skip"), "{stdout}");
    assert!(stdout.contains("made 0 authenticated requests"), "{stdout}");
}
