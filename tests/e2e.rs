//! End to end: the exporter, a real Prometheus and a real Alertmanager, wired the way the
//! shipped files wire them, all on loopback ports. It proves that the pieces work together:
//!
//! 1. Prometheus scrapes the exporter (`up` is 1) and `cpa_requests_total` grows;
//! 2. every query of every dashboard panel, variables expanded to `.*`, evaluates without an
//!    error, and all but those in [`ALLOWED_EMPTY`] return data; every variable has values;
//! 3. every recording rule produces samples;
//! 4. when the fake CPA fails most requests, `CPAHighFailureRatio` fires in Prometheus and
//!    Alertmanager delivers it to a webhook; after recovery it resolves, and the resolved
//!    notification arrives too;
//! 5. Prometheus (with `--enable-feature=exemplar-storage`) stores the exporter's OpenMetrics
//!    exemplars: `/api/v1/query_exemplars` names a planted slow record and a planted failed
//!    record by their `request_id`, on their own series.
//!
//! What runs where:
//! - the fake CPA ([`FakeCpa`]) and its traffic run inside this test, so the test decides when
//!   requests fail; the exporter binary polls it as it would poll CPA;
//! - Prometheus runs `deploy/prometheus/prometheus.yml` with only the addresses, the intervals
//!   (1 s) and the rule directory replaced, and loads the shipped rules as copied by
//!   `alerts/render.sh --for 0s` (the documented override; the shipped files are not edited);
//! - Alertmanager runs a test configuration (group_wait and group_interval 1 s) whose only
//!   receiver is a webhook served by this test, which records every notification.
//!
//! Timeline, 35 to 80 seconds when it passes; every wait has a deadline:
//! - healthy: 50 attempts/s, none failed, until the target is up and the counters grow;
//! - failing: 6 attempts/s, 90 % failed, until the alert fires and is delivered. The alert's
//!   long window, `provider_model:cpa_request_failures:ratio_rate1h`, comes from a rule group
//!   with `interval: 1m`, so firing can take up to a minute after the failures start. The
//!   dashboards and the recording rules are checked here, with healthy and failed attempts in
//!   every window;
//! - recovered: 2000 attempts/s, none failed, until the alert resolves and that is delivered.
//!   The rules' windows (5 minutes, 1 hour) are longer than the test, so the 5-minute failure
//!   ratio drops below 5 % only once healthy attempts outnumber the failures about 20 to 1.
//!   The test sends them fast instead of waiting 5 minutes for the failures to age out.
//!
//! Failed attempts are shaped like one failing client (one API key, endpoint and requested
//! model), so each model's failures fall into a few counter series. Every other failure is
//! failed over (the next success continues its request), the rest reach the client after a
//! `failover-window` of 2 s, so the failover and client-failure panels have data. The exporter runs with its
//! new-series hold off here (the test harness' default, so the timeline stays short), and then
//! Prometheus cannot see the first increment of a new series.
//!
//! A second test, [`rates_and_ratios_in_prometheus_match_the_truth_with_new_series_all_the_time`],
//! runs the exporter (with its new-series hold) and Prometheus alone for one full 5-minute
//! window of steady traffic whose client keys keep changing, and compares the failure ratio,
//! attempt rate and token rate of the shipped rules and the dashboards with the truth.
//!
//! A real node exporter (Debian's `prometheus-node-exporter`) runs beside them as job `node`,
//! so the host rules and the "Host" row are checked against the real thing. The exporter has two
//! budgets (its config file), and the fake CPA's codex credentials carry subscription ends, so
//! the budget and subscription panels have data too.
//!
//! Needs `prometheus`, `prometheus-alertmanager` and `prometheus-node-exporter` (Debian's names;
//! `alertmanager` and `node_exporter` work too). Without them the test is skipped, except under
//! CI (env `CI`), where it fails.

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fake_cpa::{Expect, FakeCpa, SimConfig, SimCredential, Workload, WorkloadMix, CLIENT_API_KEYS};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::watch;

use common::promql;

/// Dashboard panels allowed to return nothing in this test: (dashboard uid, panel title, why).
///
/// Empty, because the test feeds every panel: OpenAI-style rate-limit headers for the
/// OpenAI-compatible providers ([`shape`]), a credential cooling down with a retry time and
/// others disabled or in error ([`with_trouble`]), each kind of invalid element, a success
/// without tokens and an unpriced model ([`rare_elements`]), and failures of every status
/// class ([`FAIL_CODES`]). Queries comparing with yesterday or last week (`offset 1d`, `offset
/// 7d`) cannot have data in a test this short: they must evaluate, and must have data with the
/// offset taken out ([`without_offsets`]). A panel added later that cannot have data here goes
/// in this list with its reason.
const ALLOWED_EMPTY: &[(&str, &str, &str)] = &[];

/// The fallback of stat panels that should show 0 rather than "No data".
const FALLBACK: &str = " or vector(0)";
const KEY: &str = "e2e-management-key";
const ALERT: &str = "CPAHighFailureRatio";
/// Status codes of the failed attempts, in turn: server errors, a rate limit, an overload and
/// a client error, so every class of the error panels has data.
const FAIL_CODES: [u16; 5] = [502, 429, 503, 529, 401];

#[derive(Clone, Copy, Debug, PartialEq)]
struct Load {
    per_second: f64,
    failing: f64,
}

const HEALTHY: Load = Load {
    per_second: 50.0,
    failing: 0.0,
};
const FAILING: Load = Load {
    per_second: 6.0,
    failing: 0.9,
};
const RECOVERED: Load = Load {
    per_second: 2000.0,
    failing: 0.0,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stack_scrapes_records_alerts_and_notifies() {
    let Some((prometheus_bin, alertmanager_bin, node_exporter_bin)) = tools() else {
        return;
    };
    let started = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name);

    // The fake CPA with traffic the test controls, and a few credentials in trouble.
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA");
    let workload = Workload::new(
        7,
        WorkloadMix {
            failed: 0.0,
            ..WorkloadMix::default()
        },
    );
    cpa.set_credentials(with_trouble(workload.credentials()));
    for element in rare_elements() {
        cpa.push_raw(&element);
    }
    let (load, load_rx) = watch::channel(HEALTHY);
    tokio::spawn(traffic(cpa.clone(), workload, load_rx));

    let inbox = Inbox::default();
    let webhook = serve_webhook(inbox.clone()).await;

    std::fs::write(path("exporter.yml"), budgets_config()).expect("exporter.yml");
    let exporter = common::Exporter::spawn(&common::Setup {
        cpa_url: cpa.url(),
        key: KEY,
        db: &path("state.db"),
        log: path("exporter.log"),
        extra: vec![
            ("CPA_EXPORTER_CREDENTIALS_INTERVAL", "5s".to_owned()),
            ("CPA_EXPORTER_SETTINGS_INTERVAL", "10s".to_owned()),
            // Requests whose last attempt failed count as client failures within the test.
            ("CPA_EXPORTER_FAILOVER_WINDOW", "2s".to_owned()),
            (
                "CPA_EXPORTER_CONFIG",
                path("exporter.yml").display().to_string(),
            ),
        ],
    });
    let exporter_addr = format!("127.0.0.1:{}", exporter.port);
    let prometheus_addr = format!("127.0.0.1:{}", common::free_port());
    let alertmanager_addr = format!("127.0.0.1:{}", common::free_port());
    let node_addr = format!("127.0.0.1:{}", common::free_port());

    render_rules(&path("rules"));
    std::fs::write(
        path("prometheus.yml"),
        prometheus_config(
            &path("rules"),
            &exporter_addr,
            &prometheus_addr,
            &alertmanager_addr,
            &node_addr,
        ),
    )
    .expect("prometheus.yml");
    std::fs::write(path("alertmanager.yml"), alertmanager_config(webhook))
        .expect("alertmanager.yml");

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut alertmanager = Proc::spawn(
        "alertmanager",
        &alertmanager_bin,
        &[
            format!("--config.file={}", path("alertmanager.yml").display()),
            format!("--storage.path={}", path("alertmanager-data").display()),
            format!("--web.listen-address={alertmanager_addr}"),
            // No cluster gossip: it would listen on 0.0.0.0:9094.
            "--cluster.listen-address=".to_owned(),
        ],
        path("alertmanager.log"),
    );
    let mut node_exporter = Proc::spawn(
        "node exporter",
        &node_exporter_bin,
        &node_exporter_args(&node_addr),
        path("node-exporter.log"),
    );
    let mut prometheus = Proc::spawn(
        "prometheus",
        &prometheus_bin,
        &[
            format!("--config.file={}", path("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", path("prometheus-data").display()),
            format!("--web.listen-address={prometheus_addr}"),
            // Prometheus asks for OpenMetrics by default; exemplars are kept with this flag.
            "--enable-feature=exemplar-storage".to_owned(),
        ],
        path("prometheus.log"),
    );
    alertmanager
        .wait_ready(&http, &format!("http://{alertmanager_addr}/-/ready"))
        .await;
    prometheus
        .wait_ready(&http, &format!("http://{prometheus_addr}/-/ready"))
        .await;
    node_exporter
        .wait_ready(&http, &format!("http://{node_addr}/metrics"))
        .await;
    let prom = Prom {
        http,
        base: format!("http://{prometheus_addr}"),
    };
    let why = |what: &str| {
        format!(
            "{what}\n{}\n{}\n{}",
            prometheus.log_tail(),
            alertmanager.log_tail(),
            tail("exporter", &exporter.log_text())
        )
    };

    // 1. The target is up and the counters grow.
    step("healthy traffic: waiting for the exporter target to be up");
    let up = common::eventually(Duration::from_secs(20), async || {
        prom.value(r#"up{job="cpa-usage-exporter"}"#).await == Some(1.0)
    })
    .await;
    assert!(up, "{}", why("the exporter target never came up"));
    let node_up = common::eventually(Duration::from_secs(20), async || {
        prom.value(r#"up{job="node"}"#).await == Some(1.0)
    })
    .await;
    assert!(node_up, "{}", why("the node exporter target never came up"));
    let mut first = None;
    let grew = common::eventually(Duration::from_secs(15), async || {
        let now = prom.value("sum(cpa_requests_total)").await;
        match (first, now) {
            (None, Some(v)) if v > 0.0 => first = Some(v),
            (Some(a), Some(b)) => return b > a,
            _ => {}
        }
        false
    })
    .await;
    assert!(grew, "{}", why("cpa_requests_total did not grow"));
    step("target up, cpa_requests_total grows");
    // 5. Two records with known ids, on series of their own; checked at the end, by when
    // Prometheus has long scraped them.
    for element in exemplar_records() {
        cpa.push_raw(&element);
    }

    // 4a. Most attempts fail: the alert fires and is delivered.
    load.send_replace(FAILING);
    step("failing: 90 % of attempts fail; waiting for CPAHighFailureRatio to fire");
    let fired = common::eventually(Duration::from_secs(80), async || {
        prom.alert_states(ALERT).await.contains("firing")
    })
    .await;
    if !fired {
        panic!(
            "{}",
            why(&format!("{ALERT} never fired\n{}", prom.diagnose().await))
        );
    }
    step("firing in Prometheus");

    // 2 and 3, with healthy and failed attempts in every window.
    let evaluated = check_dashboards(&prom).await;
    step(&format!("dashboards: {evaluated} evaluated, with data"));
    let rules = check_recording_rules(&prom).await;
    step(&format!("all {rules} recording rules have samples"));

    let delivered = common::eventually(Duration::from_secs(10), async || {
        inbox.has(ALERT, "firing", 0)
    })
    .await;
    assert!(
        delivered,
        "{}",
        why(&format!(
            "the webhook got no firing {ALERT}: {:?}",
            inbox.all()
        ))
    );
    step("the firing notification reached the webhook");

    // 4b. Recovery: the alert resolves, and the resolution is delivered.
    let before_recovery = inbox.all().len();
    load.send_replace(RECOVERED);
    step("recovered: no failures, 2000 attempts/s; waiting for the alert to resolve");
    let resolved = common::eventually(Duration::from_secs(30), async || {
        prom.alert_states(ALERT).await.is_empty()
    })
    .await;
    if !resolved {
        panic!(
            "{}",
            why(&format!(
                "{ALERT} never resolved\n{}",
                prom.diagnose().await
            ))
        );
    }
    step("resolved in Prometheus");
    let delivered = common::eventually(Duration::from_secs(10), async || {
        inbox.has(ALERT, "resolved", before_recovery)
    })
    .await;
    assert!(
        delivered,
        "{}",
        why(&format!(
            "the webhook got no resolved {ALERT}: {:?}",
            inbox.all()
        ))
    );
    step("the resolved notification reached the webhook");

    // 5. The planted records are the exemplars of their bucket and failure series.
    for (selector, request_id) in [
        (
            format!(r#"cpa_request_duration_seconds_bucket{{model="{SLOW_MODEL}",le="600.0"}}"#),
            SLOW_ID,
        ),
        (
            format!(r#"cpa_request_failures_total{{model="{FAILED_MODEL}",status_code="418"}}"#),
            FAILED_ID,
        ),
    ] {
        let mut seen = Vec::new();
        let found = common::eventually(Duration::from_secs(20), async || {
            seen = prom.exemplars(&selector).await;
            seen.iter().any(|id| id == request_id)
        })
        .await;
        assert!(
            found,
            "{}",
            why(&format!("{selector}: exemplars {seen:?}, not {request_id}"))
        );
    }
    step("exemplars name the planted slow and failed records");
    drop(load);
}

/// The planted records of step 5: models no generated record uses, so nothing else becomes
/// the exemplar of their series.
const SLOW_MODEL: &str = "e2e-exemplar-slow";
const SLOW_ID: &str = "5104e2e5";
const FAILED_MODEL: &str = "e2e-exemplar-failed";
const FAILED_ID: &str = "fa11ed01";

/// A 500 s attempt (the 600 s bucket) and a failed one (status 418), with known request ids.
fn exemplar_records() -> Vec<String> {
    let mut clean = Workload::new(
        9,
        WorkloadMix {
            string_wrapped: 0.0,
            control: 0.0,
            invalid: 0.0,
            failed: 0.0,
            ..WorkloadMix::default()
        },
    );
    let mut record = |changes: Value| {
        let text = clean.next(unix_now()).element_json;
        let (Ok(Value::Object(mut r)), Value::Object(changes)) =
            (serde_json::from_str::<Value>(&text), changes)
        else {
            panic!("a clean workload yields objects: {text}");
        };
        r.extend(changes);
        Value::Object(r).to_string()
    };
    vec![
        record(json!({
            "model": SLOW_MODEL, "alias": "", "latency_ms": 500_000, "request_id": SLOW_ID,
        })),
        record(json!({
            "model": FAILED_MODEL, "alias": "", "failed": true,
            "fail": { "status_code": 418, "body": "" }, "request_id": FAILED_ID,
        })),
    ]
}

/// Attempts per second of the accuracy test, and the share that fails.
const STEADY_PER_SECOND: f64 = 40.0;
const STEADY_FAILED: f64 = 0.073;
/// The window of the shipped 5-minute rules, and how long the accuracy test lets traffic run
/// before it judges one (the window then lies wholly inside steady traffic).
const WINDOW_S: f64 = 300.0;
const SETTLE_S: f64 = 15.0;
/// The exporter's new-series hold in the accuracy test: more than two 1 s scrape intervals, with
/// room for a few scrapes that time out on a busy CI machine.
/// `CPA_E2E_HOLD=0` runs the test as the exporter behaved before the hold (the "before" figures).
const STEADY_HOLD: &str = "5s";

/// The accuracy test's clients change keys this often (seconds): each change brings new series
/// in every family with an `api_key` label, about 300 a time, well within the series limit.
const KEY_EVERY_S: f64 = 10.0;

/// One usage record the accuracy test pushed: when, whether it failed, its tokens.
#[derive(Clone, Copy)]
struct Sent {
    at: f64,
    failed: bool,
    tokens: u64,
}

/// What users see must be what was counted: a steady workload of known failure ratio whose
/// client keys change every 10 s (so new series of every family appear all the time, and
/// most failure series are one-offs), scraped by a real Prometheus with the shipped rules. After
/// a full 5-minute window of traffic, the failure ratio, attempt rate and token rate from the
/// shipped recording rules and from the dashboards' queries are within 10 % of the truth of that
/// window. Takes about 5.5 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rates_and_ratios_in_prometheus_match_the_truth_with_new_series_all_the_time() {
    let Some((prometheus_bin, _, _)) = tools() else {
        return;
    };
    let started = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name);
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA");
    let hold = std::env::var("CPA_E2E_HOLD").unwrap_or_else(|_| STEADY_HOLD.to_owned());
    let exporter = common::Exporter::spawn(&common::Setup {
        cpa_url: cpa.url(),
        key: KEY,
        db: &path("state.db"),
        log: path("exporter.log"),
        extra: vec![("CPA_EXPORTER_NEW_SERIES_HOLD", hold.clone())],
    });
    let exporter_addr = format!("127.0.0.1:{}", exporter.port);
    let prometheus_addr = format!("127.0.0.1:{}", common::free_port());
    // No Alertmanager: this test reads Prometheus only.
    let nowhere = format!("127.0.0.1:{}", common::free_port());
    render_rules(&path("rules"));
    std::fs::write(
        path("prometheus.yml"),
        prometheus_config(
            &path("rules"),
            &exporter_addr,
            &prometheus_addr,
            &nowhere,
            &nowhere,
        ),
    )
    .expect("prometheus.yml");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut prometheus = Proc::spawn(
        "prometheus",
        &prometheus_bin,
        &[
            format!("--config.file={}", path("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", path("prometheus-data").display()),
            format!("--web.listen-address={prometheus_addr}"),
        ],
        path("prometheus.log"),
    );
    prometheus
        .wait_ready(&http, &format!("http://{prometheus_addr}/-/ready"))
        .await;
    let prom = Prom {
        http,
        base: format!("http://{prometheus_addr}"),
    };
    let up = common::eventually(Duration::from_secs(20), async || {
        prom.value(r#"up{job="cpa-usage-exporter"}"#).await == Some(1.0)
    })
    .await;
    assert!(
        up,
        "the exporter target never came up\n{}",
        prometheus.log_tail()
    );

    step(&format!(
        "steady traffic: {STEADY_PER_SECOND}/s, {:.1} % failed, a new client key every {KEY_EVERY_S} s, hold {hold}",
        STEADY_FAILED * 100.0
    ));
    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let (stop, stop_rx) = watch::channel(());
    tokio::spawn(steady_traffic(cpa.clone(), sent.clone(), stop_rx));
    let traffic_start = unix_now();
    tokio::time::sleep(Duration::from_secs_f64(WINDOW_S + SETTLE_S)).await;
    let at = unix_now().floor();
    drop(stop);

    // The truth of the window that ends at `at`.
    let window: Vec<Sent> = sent
        .lock()
        .expect("sent")
        .iter()
        .copied()
        .filter(|s| s.at > at - WINDOW_S && s.at <= at)
        .collect();
    assert!(at - WINDOW_S > traffic_start);
    let attempts = window.len() as f64;
    let truth_ratio = window.iter().filter(|s| s.failed).count() as f64 / attempts;
    let truth_requests = attempts / WINDOW_S;
    let truth_tokens = window.iter().map(|s| s.tokens).sum::<u64>() as f64 / WINDOW_S;

    let panel = |dashboard: &str, title: &str| -> String {
        let q = promql::panel_queries()
            .into_iter()
            .find(|q| q.dashboard == dashboard && q.panel == title)
            .unwrap_or_else(|| panic!("no panel {dashboard} / {title}"));
        let (_, d) = promql::dashboards()
            .into_iter()
            .find(|(_, d)| d["uid"] == dashboard)
            .expect("dashboard");
        let five = q
            .expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "5m");
        promql::expand(&five, &promql::variable_values(&d))
    };
    let checks = [
        (
            "failure ratio, rule cpa:instance:request_failures:ratio_rate5m",
            "sum(cpa:instance:request_failures:ratio_rate5m)".to_owned(),
            truth_ratio,
        ),
        (
            "failure ratio, dashboard cpa-operations / Error ratio",
            panel("cpa-operations", "Error ratio"),
            truth_ratio,
        ),
        (
            "attempts/s, rule cpa:provider_model:requests:rate5m",
            "sum(cpa:provider_model:requests:rate5m)".to_owned(),
            truth_requests,
        ),
        (
            "attempts/s, dashboard cpa-operations / Current request rate",
            panel("cpa-operations", "Current request rate"),
            truth_requests,
        ),
        (
            "tokens/s, rule cpa:provider_model:tokens:rate5m",
            "sum(cpa:provider_model:tokens:rate5m)".to_owned(),
            truth_tokens,
        ),
        (
            "tokens/s, dashboard cpa-operations / Current token rate",
            panel("cpa-operations", "Current token rate"),
            truth_tokens,
        ),
    ];
    let mut report = Vec::new();
    let mut off = Vec::new();
    for (what, q, truth) in checks {
        let seen = prom.value_at(&q, at).await;
        let error = seen.map(|v| (v - truth).abs() / truth);
        let line = format!(
            "{what}: seen {}, truth {truth:.5} ({})",
            seen.map_or("nothing".to_owned(), |v| format!("{v:.5}")),
            seen.map_or("-".to_owned(), |v| format!(
                "{:+.1} %",
                100.0 * (v - truth) / truth
            ))
        );
        eprintln!("{line}");
        if error.is_none_or(|e| e > 0.10) {
            off.push(line.clone());
        }
        report.push(line);
    }
    let scraped = prom
        .value_at(r#"avg_over_time(up{job="cpa-usage-exporter"}[5m])"#, at)
        .await;
    let series = prom
        .value_at(r#"scrape_samples_scraped{job="cpa-usage-exporter"}"#, at)
        .await;
    step(&format!(
        "judged the window ending {:.0} s after traffic started ({attempts} attempts; share of \
         good scrapes {scraped:?}; {series:?} samples a scrape)",
        at - traffic_start
    ));
    assert!(
        off.is_empty(),
        "more than 10 % off the truth:\n{}\nall:\n{}\n{}",
        off.join("\n"),
        report.join("\n"),
        tail("exporter", &exporter.log_text())
    );
}

/// Push a steady workload until `stop` is dropped, recording every usage record sent. Every
/// [`KEY_EVERY_S`] brings a new client key, so new series appear in every family all the time.
async fn steady_traffic(cpa: FakeCpa, sent: Arc<Mutex<Vec<Sent>>>, stop: watch::Receiver<()>) {
    let mut workload = Workload::new(
        16,
        WorkloadMix {
            string_wrapped: 0.0,
            control: 0.0,
            invalid: 0.0,
            failed: STEADY_FAILED,
            duplicate_event_id: 0.0,
            ..WorkloadMix::default()
        },
    );
    let mut ticker = tokio::time::interval(Duration::from_millis(25));
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        ticker.tick().await;
        if stop.has_changed().is_err() {
            return;
        }
        let due = (start.elapsed().as_secs_f64() * STEADY_PER_SECOND) as u64;
        let now = unix_now();
        while n < due {
            n += 1;
            let g = workload.next(now);
            let Expect::Usage(truth) = &g.expect else {
                continue;
            };
            let Ok(Value::Object(mut record)) = serde_json::from_str::<Value>(&g.element_json)
            else {
                continue;
            };
            let key = format!(
                "sk-client-steady-{}",
                n / (STEADY_PER_SECOND * KEY_EVERY_S) as u64
            );
            record.insert("api_key".to_owned(), json!(key));
            cpa.push_raw(&Value::Object(record).to_string());
            sent.lock().expect("sent").push(Sent {
                at: now,
                failed: truth.failed,
                tokens: truth.total_tokens(),
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// Every panel query and variable of every dashboard against the live Prometheus; says how
/// many it evaluated.
async fn check_dashboards(prom: &Prom) -> String {
    let queries = promql::panel_queries();
    assert!(queries.len() > 50, "only {} panel queries", queries.len());
    let mut errors = Vec::new();
    let mut empty = BTreeSet::new();
    let mut fallbacks = 0;
    let mut offsets = 0;
    for q in &queries {
        // An `or vector(0)` fallback always answers: judge the query without it too.
        let expr = q.expanded.as_str();
        let without_fallback = expr.contains(FALLBACK).then(|| expr.replace(FALLBACK, ""));
        fallbacks += usize::from(without_fallback.is_some());
        // Yesterday and last week are before this test: the query must evaluate, and have data
        // with the offset taken out.
        let now = without_offsets(expr);
        offsets += usize::from(now.is_some());
        for expr in std::iter::once(expr).chain(without_fallback.as_deref()) {
            match prom.query(expr).await {
                Err(e) => errors.push(format!(
                    "{} / {} / {}: {e}\n  {expr}",
                    q.dashboard, q.panel, q.ref_id
                )),
                Ok(result) if result.is_empty() && now.is_none() => {
                    empty.insert((q.dashboard.clone(), q.panel.clone()));
                }
                Ok(_) => {}
            }
        }
        if let Some(now) = &now {
            match prom.query(now).await {
                Ok(result) if !result.is_empty() => {}
                other => {
                    errors.push(format!(
                        "{} / {} / {} without its offset: {other:?}\n  {now}",
                        q.dashboard, q.panel, q.ref_id
                    ));
                }
            }
        }
    }
    assert!(
        errors.is_empty(),
        "queries Prometheus refused:\n{}",
        errors.join("\n")
    );
    let allowed: BTreeSet<(String, String)> = ALLOWED_EMPTY
        .iter()
        .map(|(d, p, _)| (d.to_string(), p.to_string()))
        .collect();
    let unexpected: Vec<_> = empty.difference(&allowed).collect();
    assert!(
        unexpected.is_empty(),
        "panels without data (not in ALLOWED_EMPTY):\n{unexpected:#?}"
    );
    let panels: BTreeSet<(String, String)> = queries
        .iter()
        .map(|q| (q.dashboard.clone(), q.panel.clone()))
        .collect();
    let stale: Vec<_> = allowed.difference(&panels).collect();
    assert!(stale.is_empty(), "ALLOWED_EMPTY names no panel: {stale:?}");

    let variables = promql::variable_queries();
    assert!(!variables.is_empty());
    let mut without_values = Vec::new();
    for v in &variables {
        let values = prom.label_values(&v.label, v.selector.as_deref()).await;
        if values.is_empty() {
            without_values.push(format!("{} / ${}: {}", v.dashboard, v.name, v.query));
        }
    }
    assert!(
        without_values.is_empty(),
        "variables without values:\n{}",
        without_values.join("\n")
    );
    format!(
        "{} panel queries ({fallbacks} also without `or vector(0)`, {offsets} also without their offset) and {} variables",
        queries.len(),
        variables.len()
    )
}

/// Recording rules allowed to have no samples in this test: (name, why).
const RULES_WITHOUT_SAMPLES: &[(&str, &str)] = &[
    (
        "cpa:provider_model:request_duration_seconds:p95_baseline1d",
        "a model's usual p95 needs an hour of minutes with traffic, an hour back",
    ),
    (
        "cpa:provider_model:time_to_first_token_seconds:p95_baseline1d",
        "a model's usual p95 needs an hour of minutes with traffic, an hour back",
    ),
];

/// Every `record:` of `alerts/` has samples, except [`RULES_WITHOUT_SAMPLES`]; says how many
/// rules that is.
async fn check_recording_rules(prom: &Prom) -> usize {
    let mut names = promql::recording_rule_names().expect("alerts/ has rules");
    assert!(names.len() > 20, "{names:?}");
    for (name, _) in RULES_WITHOUT_SAMPLES {
        assert!(
            names.remove(*name),
            "RULES_WITHOUT_SAMPLES names no rule: {name}"
        );
    }
    let mut missing = names.clone();
    // Two groups are evaluated once a minute (`interval: 1m`), first at an offset Prometheus
    // derives from the group, up to a minute after it started: wait that long for them.
    let all = common::eventually(Duration::from_secs(75), async || {
        let mut still = BTreeSet::new();
        for name in &missing {
            if prom.query(name).await.map_or(true, |r| r.is_empty()) {
                still.insert(name.clone());
            }
        }
        missing = still;
        missing.is_empty()
    })
    .await;
    assert!(all, "recording rules without samples: {missing:?}");
    names.len()
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// Push generated records at the current load until the sender is dropped.
async fn traffic(cpa: FakeCpa, mut workload: Workload, mut load: watch::Receiver<Load>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut last = Instant::now();
    let (mut due, mut fail_due, mut n, mut failures) = (0.0, 0.0, 0u64, 0usize);
    // Every other failure is failed over: the next successful attempt continues its request
    // (same request_id and client key, starting when it ended), so the failover panels have
    // data; the other failures are what the client saw.
    let mut failed_over: Option<(String, f64)> = None;
    loop {
        ticker.tick().await;
        if load.has_changed().is_err() {
            return;
        }
        let l = *load.borrow_and_update();
        due += l.per_second * last.elapsed().as_secs_f64();
        last = Instant::now();
        let now = unix_now();
        while due >= 1.0 {
            due -= 1.0;
            n += 1;
            fail_due += l.failing;
            let fail = (fail_due >= 1.0).then(|| {
                fail_due -= 1.0;
                failures += 1;
                FAIL_CODES[failures % FAIL_CODES.len()]
            });
            let g = workload.next(now);
            let mut element = shape(&g.element_json, fail, n);
            if fail.is_some() && failures % 2 == 0 {
                failed_over = request_of(&element).or(failed_over);
            } else if fail.is_none() {
                if let Some(failed) = failed_over.take() {
                    element = continue_request(&element, &failed);
                }
            }
            cpa.push_raw(&element);
        }
    }
}

/// Adjust a generated element: OpenAI-style rate-limit headers for the providers that send
/// them, and, for a failed attempt, the failure as one failing client would see it.
fn shape(element: &str, fail: Option<u16>, n: u64) -> String {
    let Ok(Value::Object(mut record)) = serde_json::from_str::<Value>(element) else {
        return element.to_owned();
    };
    if !record.contains_key("timestamp") {
        return element.to_owned();
    }
    let provider = record["provider"].as_str().unwrap_or_default().to_owned();
    if matches!(provider.as_str(), "openrouter" | "qwen" | "kimi") {
        if let Some(Value::Object(headers)) = record.get_mut("response_headers") {
            let used = n % 500;
            for (name, value) in [
                ("x-ratelimit-limit-requests", 500),
                ("x-ratelimit-remaining-requests", 500 - used),
                ("x-ratelimit-limit-tokens", 2_000_000),
                ("x-ratelimit-remaining-tokens", 2_000_000 - used * 3_000),
            ] {
                headers.insert(name.to_owned(), json!([value.to_string()]));
            }
        }
    }
    if let Some(code) = fail {
        for (k, v) in [
            ("failed", json!(true)),
            ("fail", json!({ "status_code": code, "body": "" })),
            ("api_key", json!(CLIENT_API_KEYS[0])),
            ("alias", json!("")),
            ("endpoint", json!("POST /v1/chat/completions")),
        ] {
            record.insert(k.to_owned(), v);
        }
    }
    Value::Object(record).to_string()
}

/// The `request_id` of a record and when it ended (start + latency), Unix seconds.
fn request_of(element: &str) -> Option<(String, f64)> {
    let record: Value = serde_json::from_str(element).ok()?;
    let id = record["request_id"].as_str()?.to_owned();
    let start = cpa_usage_exporter::time::parse_rfc3339(record["timestamp"].as_str()?)?;
    Some((id, start + record["latency_ms"].as_f64()? / 1000.0))
}

/// Make a successful record the next attempt of a failed request: its request_id and client
/// key, starting when the failed attempt ended.
fn continue_request(element: &str, (id, ended): &(String, f64)) -> String {
    let Ok(Value::Object(mut record)) = serde_json::from_str::<Value>(element) else {
        return element.to_owned();
    };
    if !record.contains_key("timestamp") {
        return element.to_owned();
    }
    record.insert("request_id".to_owned(), json!(id));
    record.insert("api_key".to_owned(), json!(CLIENT_API_KEYS[0]));
    record.insert(
        "timestamp".to_owned(),
        json!(fake_cpa::workload::rfc3339_nano(*ended)),
    );
    Value::Object(record).to_string()
}

/// Elements too rare in generated traffic for a short test, sent once at the start so the
/// panels about them have data: each kind of invalid element, a control payload, a success
/// without tokens and a model without a price.
fn rare_elements() -> Vec<String> {
    let mut clean = Workload::new(
        8,
        WorkloadMix {
            string_wrapped: 0.0,
            control: 0.0,
            invalid: 0.0,
            failed: 0.0,
            ..WorkloadMix::default()
        },
    );
    let mut record = |changes: &[(&str, Value)]| {
        let text = clean.next(unix_now()).element_json;
        let Ok(Value::Object(mut r)) = serde_json::from_str::<Value>(&text) else {
            panic!("a clean workload yields objects: {text}");
        };
        for (k, v) in changes {
            if v.is_null() {
                r.remove(*k);
            } else {
                r.insert(k.to_string(), v.clone());
            }
        }
        Value::Object(r).to_string()
    };
    vec![
        "upstream usage payload: <nil>".to_owned(),
        "42".to_owned(),
        r#"{"refresh":true}"#.to_owned(),
        record(&[("failed", json!("yes"))]),
        record(&[("latency_ms", json!(-3))]),
        record(&[
            (
                "tokens",
                json!({ "input_tokens": 0, "output_tokens": 0, "total_tokens": 0 }),
            ),
            ("token_breakdown", Value::Null),
            ("accounting_version", Value::Null),
        ]),
        record(&[("model", json!("acme-llm-1")), ("alias", json!(""))]),
    ]
}

/// The workload's credentials with one held back until a retry time, one disabled and one in
/// error, so the credential panels have something to show.
fn with_trouble(mut credentials: Vec<SimCredential>) -> Vec<SimCredential> {
    assert!(credentials.len() >= 3, "{credentials:?}");
    let retry = SystemTime::now() + Duration::from_secs(600);
    credentials[0].unavailable = true;
    credentials[0].next_retry_after = Some(humantime::format_rfc3339_seconds(retry).to_string());
    credentials[1].disabled = true;
    credentials[1].status = "disabled".to_owned();
    credentials[2].status = "error".to_owned();
    credentials[2].status_message = "token expired".to_owned();
    credentials
}

/// `expr` with its `offset 1d` / `offset 7d` modifiers removed, or `None` if it has none.
fn without_offsets(expr: &str) -> Option<String> {
    let out = expr.replace(" offset 1d", "").replace(" offset 7d", "");
    (out != expr).then_some(out)
}

/// The exporter's config file: a day budget small enough to be passed during the test and a
/// month budget, for two of the simulated client keys (given in plaintext, hashed at load).
fn budgets_config() -> String {
    format!(
        "budgets:\n  - {{ api-key: {}, usd: 0.5, period: day }}\n  - {{ api-key: {}, usd: 1000, period: month }}\n",
        CLIENT_API_KEYS[0], CLIENT_API_KEYS[1]
    )
}

/// The node exporter on a loopback port. Its defaults leave out `overlay` file systems, the root
/// of a container (a CI runner may be one): the test keeps them, so the disk panels have data.
fn node_exporter_args(addr: &str) -> Vec<String> {
    vec![
        format!("--web.listen-address={addr}"),
        "--collector.filesystem.fs-types-exclude=^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|sysfs|tracefs)$".to_owned(),
    ]
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// The shipped rules with every `for:` set to 0s, by the documented `alerts/render.sh`.
fn render_rules(out: &Path) {
    let script = promql::repo_root().join("alerts/render.sh");
    let status = Command::new("sh")
        .arg(&script)
        .args(["--for", "0s"])
        .arg(out)
        .status()
        .expect("run alerts/render.sh");
    assert!(status.success(), "alerts/render.sh failed");
}

/// `deploy/prometheus/prometheus.yml` with loopback targets, 1 s intervals and the rendered
/// rules. Every job of the shipped file must be one this test can point somewhere.
fn prometheus_config(
    rules: &Path,
    exporter: &str,
    prometheus: &str,
    alertmanager: &str,
    node: &str,
) -> String {
    use serde_norway::Value as Y;
    let shipped = promql::repo_root().join("deploy/prometheus/prometheus.yml");
    let text = std::fs::read_to_string(&shipped).expect("deploy/prometheus/prometheus.yml");
    let mut cfg: Y = serde_norway::from_str(&text).expect("prometheus.yml is YAML");
    let targets = |addr: &str| -> Y {
        serde_norway::from_str(&format!("[{{targets: [\"{addr}\"]}}]")).expect("targets")
    };
    for key in ["scrape_interval", "scrape_timeout", "evaluation_interval"] {
        cfg["global"][key] = Y::from("1s");
    }
    let rule_files: Vec<Y> = cfg["rule_files"]
        .as_sequence()
        .expect("rule_files")
        .iter()
        .map(|p| {
            let glob = p.as_str().and_then(|p| p.rsplit('/').next()).expect("glob");
            Y::from(rules.join(glob).to_string_lossy().into_owned())
        })
        .collect();
    cfg["rule_files"] = Y::Sequence(rule_files);
    cfg["alerting"]["alertmanagers"][0]["static_configs"] = targets(alertmanager);
    for job in cfg["scrape_configs"]
        .as_sequence_mut()
        .expect("scrape_configs")
    {
        let addr = match job["job_name"].as_str() {
            Some("cpa-usage-exporter") => exporter,
            Some("prometheus") => prometheus,
            Some("alertmanager") => alertmanager,
            Some("node") => node,
            other => panic!("prometheus.yml has a job this test cannot run: {other:?}"),
        };
        job["static_configs"] = targets(addr);
        if let Some(m) = job.as_mapping_mut() {
            m.remove("scrape_interval");
            m.remove("scrape_timeout");
        }
    }
    serde_norway::to_string(&cfg).expect("prometheus.yml")
}

/// Everything to the test's webhook, at once, resolutions included.
fn alertmanager_config(webhook: SocketAddr) -> String {
    format!(
        "route:\n\
         \x20 receiver: webhook\n\
         \x20 group_by: [alertname]\n\
         \x20 group_wait: 1s\n\
         \x20 group_interval: 1s\n\
         \x20 repeat_interval: 30s\n\
         receivers:\n\
         \x20 - name: webhook\n\
         \x20   webhook_configs:\n\
         \x20     - url: http://{webhook}/alerts\n\
         \x20       send_resolved: true\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Processes, Prometheus' API and the webhook
// ---------------------------------------------------------------------------------------------

/// Prometheus, Alertmanager and node exporter binaries, or `None` (skip) outside CI.
fn tools() -> Option<(String, String, String)> {
    let runs = |name: &&&str| {
        Command::new(**name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let prometheus = ["prometheus"].iter().find(runs);
    let alertmanager = ["prometheus-alertmanager", "alertmanager"]
        .iter()
        .find(runs);
    let node_exporter = ["prometheus-node-exporter", "node_exporter"]
        .iter()
        .find(runs);
    match (prometheus, alertmanager, node_exporter) {
        (Some(p), Some(a), Some(n)) => Some((p.to_string(), a.to_string(), n.to_string())),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "prometheus, prometheus-alertmanager and prometheus-node-exporter are required under CI (.ci/run installs them)"
            );
            eprintln!(
                "skipping: prometheus, prometheus-alertmanager or prometheus-node-exporter is not installed"
            );
            None
        }
    }
}

/// A child process with its output in a log file; killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, program: &str, args: &[String], log: PathBuf) -> Proc {
        let out = File::create(&log).expect("log file");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { name, child, log }
    }

    async fn wait_ready(&mut self, http: &reqwest::Client, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status})\n{}", self.name, self.log_tail());
            }
            if http
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} not ready in 20 s\n{}", self.name, self.log_tail());
    }

    fn log_tail(&self) -> String {
        tail(
            self.name,
            &std::fs::read_to_string(&self.log).unwrap_or_default(),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(name: &str, log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(30);
    format!(
        "--- last lines of the {name} log:\n{}",
        lines[from..].join("\n")
    )
}

struct Prom {
    http: reqwest::Client,
    base: String,
}

impl Prom {
    async fn get_json(&self, req: reqwest::RequestBuilder) -> Result<Value, String> {
        let text = req
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"].clone())
    }

    /// The `request_id`s of the exemplars of the series `selector` matches, over the last hour.
    async fn exemplars(&self, selector: &str) -> Vec<String> {
        let now = unix_now();
        let req = self
            .http
            .post(format!("{}/api/v1/query_exemplars", self.base))
            .form(&[
                ("query", selector.to_owned()),
                ("start", (now - 3600.0).to_string()),
                ("end", (now + 60.0).to_string()),
            ]);
        let Ok(data) = self.get_json(req).await else {
            return Vec::new();
        };
        data.as_array()
            .into_iter()
            .flatten()
            .flat_map(|series| series["exemplars"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["labels"]["request_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// An instant query at the current time: its series (a scalar counts as one).
    async fn query(&self, q: &str) -> Result<Vec<Value>, String> {
        let req = self
            .http
            .post(format!("{}/api/v1/query", self.base))
            .form(&[("query", q)]);
        let data = self.get_json(req).await?;
        Ok(match data["resultType"].as_str() {
            Some("vector" | "matrix") => data["result"].as_array().cloned().unwrap_or_default(),
            _ => vec![data["result"].clone()],
        })
    }

    /// The value of the first series of a query evaluated at Unix time `at`.
    async fn value_at(&self, q: &str, at: f64) -> Option<f64> {
        let req = self
            .http
            .post(format!("{}/api/v1/query", self.base))
            .form(&[("query", q), ("time", &at.to_string())]);
        let data = self.get_json(req).await.ok()?;
        let first = match data["resultType"].as_str() {
            Some("vector") => data["result"].get(0)?.clone(),
            _ => data["result"].clone(),
        };
        first["value"][1].as_str()?.parse().ok()
    }

    /// The value of the first series of a query.
    async fn value(&self, q: &str) -> Option<f64> {
        let result = self.query(q).await.ok()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// The states (`pending`, `firing`) of the active alerts named `name`.
    async fn alert_states(&self, name: &str) -> BTreeSet<String> {
        let req = self.http.get(format!("{}/api/v1/alerts", self.base));
        let Ok(data) = self.get_json(req).await else {
            return BTreeSet::from(["unknown".to_owned()]);
        };
        data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Grafana's `label_values(selector, label)`.
    async fn label_values(&self, label: &str, selector: Option<&str>) -> Vec<Value> {
        let mut req = self
            .http
            .get(format!("{}/api/v1/label/{label}/values", self.base));
        if let Some(s) = selector {
            req = req.query(&[("match[]", s)]);
        }
        self.get_json(req)
            .await
            .ok()
            .and_then(|d| d.as_array().cloned())
            .unwrap_or_default()
    }

    /// What the failure-ratio alert looks at, for a failure message.
    async fn diagnose(&self) -> String {
        let mut out = String::new();
        for q in [
            "provider_model:cpa_request_failures:ratio_rate5m > 0",
            "provider_model:cpa_request_failures:ratio_rate1h > 0",
            "provider_model:cpa_requests:rate5m * 300",
            r#"ALERTS{alertname="CPAHighFailureRatio"}"#,
        ] {
            let r = self.query(q).await;
            out.push_str(&format!("{q}:\n  {r:?}\n"));
        }
        out
    }
}

/// What the webhook received: Alertmanager's JSON payloads.
#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<Value>>>);

impl Inbox {
    fn all(&self) -> Vec<Value> {
        self.0.lock().expect("inbox").clone()
    }

    /// Whether a notification of group `alertname` with this status (`firing`, `resolved`)
    /// arrived, not counting the first `skip` notifications.
    fn has(&self, alertname: &str, status: &str, skip: usize) -> bool {
        self.all().iter().skip(skip).any(|n| {
            n["status"] == status
                && n["groupLabels"]["alertname"] == alertname
                && n["alerts"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|a| a["labels"]["alertname"] == alertname))
        })
    }
}

async fn serve_webhook(inbox: Inbox) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind webhook");
    let addr = listener.local_addr().expect("webhook address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let inbox = inbox.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let inbox = inbox.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                            inbox.0.lock().expect("inbox").push(v);
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}
