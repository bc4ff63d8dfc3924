//! The alerting files under `alerts/`: Prometheus' and Alertmanager's own checkers, the promtool
//! unit tests, the conventions every alert follows, and the metric names the rules read, which
//! must all exist in the exporter's output (a renamed metric breaks this test).
//!
//! `promtool` and `amtool` are needed; without them the tool checks are skipped, except under CI
//! (the `CI` environment variable set), where a missing tool fails the test.

mod common;

use common::have;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

const RUNBOOK: &str =
    "https://github.com/cpa-usage-exporter/cpa-usage-exporter/blob/main/docs/runbook.md#";
const SEVERITIES: [&str; 3] = ["critical", "warning", "info"];
/// Metrics of the Prometheus node exporter, which the host rules read.
const NODE_EXPORTER_PREFIX: &str = "node_";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Files in `dir` whose names end with `suffix`, sorted.
fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_str().is_some_and(|s| s.ends_with(suffix)))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no {suffix} files in {dir}");
    out
}

fn rule_files() -> Vec<PathBuf> {
    files("alerts", ".rules.yml")
}

fn test_files() -> Vec<PathBuf> {
    files("alerts/tests", ".yml")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Run a command from the repository root; panic with its output unless it succeeds.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{program} {} failed:\n{said}",
        args.join(" ")
    );
    said
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .to_str()
        .expect("utf-8 path")
        .to_owned()
}

/// One rule of a rules file.
struct Rule {
    file: String,
    /// `record` or `alert` name.
    name: String,
    alert: bool,
    expr: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().expect("string key").to_owned(),
                        v.as_str().expect("string value").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn rules() -> Vec<Rule> {
    let mut out = Vec::new();
    for path in rule_files() {
        let doc = yaml(&path);
        let groups = doc["groups"].as_sequence().expect("groups");
        for group in groups {
            for rule in group["rules"].as_sequence().expect("rules") {
                let (name, alert) = match (rule["alert"].as_str(), rule["record"].as_str()) {
                    (Some(a), None) => (a, true),
                    (None, Some(r)) => (r, false),
                    _ => panic!(
                        "{}: a rule needs exactly one of alert/record",
                        path.display()
                    ),
                };
                out.push(Rule {
                    file: rel(&path),
                    name: name.to_owned(),
                    alert,
                    expr: rule["expr"].as_str().expect("expr").to_owned(),
                    labels: string_map(&rule["labels"]),
                    annotations: string_map(&rule["annotations"]),
                });
            }
        }
    }
    out
}

#[test]
fn promtool_accepts_every_rules_file() {
    if !have("promtool") {
        return;
    }
    for file in rule_files() {
        let said = run("promtool", &["check", "rules", &rel(&file)]);
        assert!(said.contains("SUCCESS"), "{said}");
    }
}

#[test]
fn promtool_unit_tests_pass() {
    if !have("promtool") {
        return;
    }
    for file in test_files() {
        let said = run("promtool", &["test", "rules", &rel(&file)]);
        assert!(said.contains("SUCCESS"), "{said}");
    }
}

#[test]
fn alertmanager_example_is_valid_and_routes_by_severity() {
    if !have("amtool") {
        return;
    }
    let config = "--config.file=alerts/alertmanager.yml";
    run("amtool", &["check-config", "alerts/alertmanager.yml"]);
    for (labels, receivers) in [
        (
            ["alertname=CPAUnreachable", "severity=critical"],
            "im-bots,critical",
        ),
        (
            ["alertname=CPAHighFailureRatio", "severity=warning"],
            "im-bots,warning",
        ),
        (["alertname=CPACredentialDisabled", "severity=info"], "info"),
        (["alertname=Watchdog", "severity=none"], "webhook"),
    ] {
        let verify = format!("--verify.receivers={receivers}");
        let mut args = vec!["config", "routes", "test", config, verify.as_str()];
        args.extend(labels);
        run("amtool", &args);
    }
}

#[test]
fn every_alert_follows_the_conventions_and_has_a_runbook_section() {
    let runbook = text("docs/runbook.md");
    let headings: BTreeSet<&str> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(str::trim)
        .collect();
    let rules = rules();
    let mut alerts = BTreeSet::new();
    for r in rules.iter().filter(|r| r.alert) {
        let at = format!("{} ({})", r.name, r.file);
        assert!(
            r.name.starts_with("CPA")
                && r.name.chars().all(|c| c.is_ascii_alphanumeric())
                && r.name[3..].starts_with(|c: char| c.is_ascii_uppercase()),
            "{at}: alert names are CamelCase with a CPA prefix"
        );
        let severity = r.labels.get("severity").map(String::as_str);
        assert!(
            severity.is_some_and(|s| SEVERITIES.contains(&s)),
            "{at}: severity must be one of {SEVERITIES:?}, is {severity:?}"
        );
        let summary = &r.annotations["summary"];
        assert!(
            !summary.contains("{{") && summary.ends_with('.'),
            "{at}: the summary is one static sentence: {summary}"
        );
        let description = &r.annotations["description"];
        assert!(
            description.contains("{{ $labels.") || description.contains("{{ $value"),
            "{at}: the description names what and how much: {description}"
        );
        let url = &r.annotations["runbook_url"];
        assert_eq!(
            url,
            &format!("{RUNBOOK}{}", r.name.to_lowercase()),
            "{at}: runbook_url"
        );
        assert!(
            headings.contains(r.name.as_str()),
            "{at}: docs/runbook.md needs a section `## {}`",
            r.name
        );
        alerts.insert(r.name.clone());
    }
    // No runbook section for an alert that does not exist.
    for h in headings.iter().filter(|h| h.starts_with("CPA")) {
        assert!(
            alerts.contains(*h),
            "docs/runbook.md: `## {h}` has no alert"
        );
    }
    // Recording rules: cpa:level:metric:operations; nothing else has colons.
    for r in rules.iter().filter(|r| !r.alert) {
        assert!(
            r.name.starts_with("cpa:"),
            "{}: recording rules carry the cpa: prefix",
            r.name
        );
        assert_eq!(
            r.name.matches(':').count(),
            3,
            "{}: recording rule names are cpa:level:metric:operations",
            r.name
        );
        // Aggregations name job and instance; rules over recorded series inherit them.
        assert!(
            (r.expr.contains("job") && r.expr.contains("instance"))
                || metric_names(&r.expr).iter().all(|n| n.contains(':')),
            "{}: keeps job and instance",
            r.name
        );
    }
    let alerting = text("docs/alerting.md");
    for r in &rules {
        assert!(
            alerting.contains(&format!("`{}`", r.name)),
            "docs/alerting.md does not mention `{}`",
            r.name
        );
    }
}

/// Every alert (and each of its severities) is shown firing, and shown not firing; every
/// recording rule is evaluated by a test.
#[test]
fn every_alert_and_recording_rule_has_unit_tests() {
    let mut fired: BTreeSet<(String, String)> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    // The names every `promql_expr_test` reads.
    let mut evaluated: BTreeSet<String> = BTreeSet::new();
    for path in test_files() {
        let doc = yaml(&path);
        for file in doc["rule_files"].as_sequence().expect("rule_files") {
            let file = path.parent().unwrap().join(file.as_str().unwrap());
            assert!(
                file.exists(),
                "{}: {} is missing",
                path.display(),
                file.display()
            );
        }
        for t in doc["tests"].as_sequence().expect("tests") {
            for a in t["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = a["alertname"].as_str().expect("alertname").to_owned();
                let exp = a["exp_alerts"].as_sequence().expect("exp_alerts");
                if exp.is_empty() {
                    quiet.insert(name.clone());
                }
                for e in exp {
                    let severity = e["exp_labels"]["severity"].as_str().unwrap_or("");
                    fired.insert((name.clone(), severity.to_owned()));
                }
            }
            for p in t["promql_expr_test"].as_sequence().into_iter().flatten() {
                evaluated.extend(metric_names(p["expr"].as_str().expect("expr")));
            }
        }
    }
    let mut missing = Vec::new();
    for r in rules() {
        if r.alert {
            let severity = r.labels["severity"].clone();
            if !fired.contains(&(r.name.clone(), severity.clone())) {
                missing.push(format!("{} ({severity}) is never shown firing", r.name));
            }
            if !quiet.contains(&r.name) {
                missing.push(format!("{} is never shown not firing", r.name));
            }
        } else if !evaluated.contains(&r.name) {
            missing.push(format!("recording rule {} is never evaluated", r.name));
        }
    }
    assert!(
        missing.is_empty(),
        "missing unit tests:\n{}",
        missing.join("\n")
    );
}

#[test]
fn render_sh_rewrites_for_and_job_in_copies_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    run(
        "sh",
        &["alerts/render.sh", "--for", "0s", "--job", "cpa-e2e", out],
    );
    for file in rule_files() {
        let shipped = std::fs::read_to_string(&file).unwrap();
        let copy = std::fs::read_to_string(dir.path().join(file.file_name().unwrap())).unwrap();
        let (a, b): (Vec<&str>, Vec<&str>) = (shipped.lines().collect(), copy.lines().collect());
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(&b) {
            if a.trim_start().starts_with("for: ") {
                assert_eq!(b.trim(), "for: 0s", "{}", file.display());
            } else if a.contains(r#"job="cpa-usage-exporter""#) {
                assert_eq!(*b, a.replace("cpa-usage-exporter", "cpa-e2e"));
            } else {
                assert_eq!(a, b, "{}: only `for:` and the job change", file.display());
            }
        }
        if have("promtool") {
            let copy = dir.path().join(file.file_name().unwrap());
            run("promtool", &["check", "rules", copy.to_str().unwrap()]);
        }
    }
    assert!(
        Command::new("sh")
            .args(["alerts/render.sh", "--for", "soon", out])
            .current_dir(root())
            .output()
            .unwrap()
            .status
            .code()
            == Some(2),
        "a bad duration is refused"
    );
}

/// Every metric a rule or an annotation's query reads exists in the exporter's output; every
/// recording rule read is defined.
#[tokio::test]
async fn every_metric_in_the_rules_exists_in_the_exporter_output() {
    let rules = rules();
    let records: BTreeSet<&str> = rules
        .iter()
        .filter(|r| !r.alert)
        .map(|r| r.name.as_str())
        .collect();
    // Series that Prometheus itself makes.
    let prometheus: BTreeSet<&str> = ["up", "ALERTS", "ALERTS_FOR_STATE"].into();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &rules {
        let mut queries = vec![r.expr.clone()];
        for a in r.annotations.values() {
            // Template queries are the backquoted strings, formats of `printf`: its `%q` writes
            // a quoted string.
            queries.extend(
                a.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|q| q.replace("%q", "\"x\"")),
            );
        }
        for q in &queries {
            for name in metric_names(q) {
                used.entry(name).or_default().insert(r.name.clone());
            }
        }
    }
    assert!(used.contains_key("cpa_requests_total") && used.contains_key("cpa_up"));

    let undefined: Vec<String> = used
        .iter()
        .filter(|(n, _)| n.contains(':') && !records.contains(n.as_str()))
        .map(|(n, by)| format!("{n} (used by {by:?})"))
        .collect();
    assert!(
        undefined.is_empty(),
        "recording rules used but not defined:\n{}",
        undefined.join("\n")
    );

    let exposed = common::demo_metric_names().await;
    let missing: Vec<String> = used
        .iter()
        .filter(|(n, _)| !n.contains(':') && !prometheus.contains(n.as_str()))
        // The node exporter's (alerts/cpa-host.rules.yml); tests/e2e.rs runs a real one.
        .filter(|(n, _)| !n.starts_with(NODE_EXPORTER_PREFIX))
        .filter(|(n, _)| !exposed.contains(n.as_str()))
        .map(|(n, by)| format!("{n} (used by {by:?})"))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics the rules read but the exporter does not expose:\n{}\n\nexposed: {exposed:?}",
        missing.join("\n")
    );
}

/// Metric names (and recording-rule names) a PromQL expression reads, from its syntax tree as
/// the dashboard tests read theirs; an expression that does not parse fails the test.
fn metric_names(expr: &str) -> BTreeSet<String> {
    common::promql::metric_names(expr).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn metric_names_reads_promql_carefully() {
    let expr = r#"
        # a comment naming not_a_metric
        sum by (job, instance, le) (rate(cpa_a_bucket{le="+Inf", x=~"a}b"}[5m] offset 1d))
          / ignoring (class) group_left () (cpa:level:b:rate5m > bool 0)
        or on (job) label_replace(cpa_c, "class", "x", "", "")
        and max without (quantile) (histogram_quantile(0.95, max_over_time(cpa_d[1h:5m]))) * 1e3 + Inf
        unless absent(up{job="j"}) or vector(1) or topk(3, cpa_e) or time() - cpa_f @ 100
    "#;
    let got: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        got,
        [
            "cpa:level:b:rate5m",
            "cpa_a_bucket",
            "cpa_c",
            "cpa_d",
            "cpa_e",
            "cpa_f",
            "up"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// A healthy workload fires nothing
// ---------------------------------------------------------------------------------------------

/// Real seconds between scrapes of the healthy-workload test, and the virtual seconds each
/// stands for in promtool: time runs `VIRTUAL_STEP / REAL_STEP` times faster. Ratios and
/// quantiles do not change with the speed; rates grow, which only makes the traffic guards of
/// the alerts easier to pass.
const REAL_STEP: f64 = 0.5;
const VIRTUAL_STEP: f64 = 15.0;
/// Scrapes: 50 of them are 12.5 virtual minutes.
const SCRAPES: usize = 50;
/// Upstream attempts per real second.
const HEALTHY_RATE: f64 = 300.0;

/// Healthy traffic, as an operator would run it, fires no alert in ten minutes with the shipped
/// `for:` durations: 2 % of attempts fail, latency is LLM-like (median 4 s, p95 25 s, time to
/// first token a share of it), quota values move up and down and come and go, new client keys
/// keep appearing. The real exporter drains a fake CPA and is scraped every 0.5 s; the scrapes
/// become promtool input series 15 s apart (12.5 minutes), with every `*_timestamp_seconds`
/// gauge moved to that virtual clock, and every shipped rule is evaluated over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_workload_fires_no_alert_in_ten_minutes() {
    if !have("promtool") {
        return;
    }
    use fake_cpa::{Expect, FakeCpa, SimConfig, Workload, WorkloadMix};
    let dir = tempfile::tempdir().expect("tempdir");
    let cpa = FakeCpa::start(SimConfig {
        management_key: "healthy-key".to_owned(),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA");
    let mut workload = Workload::new(
        23,
        WorkloadMix {
            invalid: 0.0,
            failed: 0.02,
            ..WorkloadMix::default()
        },
    );
    cpa.set_credentials(workload.credentials());
    let exporter = common::Exporter::spawn(&common::Setup {
        cpa_url: cpa.url(),
        key: "healthy-key",
        db: &dir.path().join("state.db"),
        log: dir.path().join("exporter.log"),
        extra: vec![
            ("CPA_EXPORTER_NEW_SERIES_HOLD", "2s".to_owned()),
            ("CPA_EXPORTER_CREDENTIALS_INTERVAL", "5s".to_owned()),
            ("CPA_EXPORTER_SETTINGS_INTERVAL", "10s".to_owned()),
        ],
    });

    let traffic = {
        let cpa = cpa.clone();
        tokio::spawn(async move {
            let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
            let start = std::time::Instant::now();
            let mut n = 0u64;
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let due = (start.elapsed().as_secs_f64() * HEALTHY_RATE) as u64;
                while n < due {
                    n += 1;
                    let g = workload.next(unix_now());
                    let element = match &g.expect {
                        Expect::Usage(_) => healthy(&g.element_json, n, &mut rng),
                        _ => g.element_json,
                    };
                    cpa.push_raw(&element);
                }
            }
        })
    };

    // Scrape on a fixed real-time grid.
    let client = reqwest::Client::new();
    let mut scrapes = Vec::new();
    let first = std::time::Instant::now();
    for i in 0..SCRAPES {
        let due = first + std::time::Duration::from_secs_f64(i as f64 * REAL_STEP);
        tokio::time::sleep_until(due.into()).await;
        let text = client
            .get(exporter.url("/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        scrapes.push((unix_now(), common::Metrics::parse(&text)));
    }
    traffic.abort();

    let test_file = dir.path().join("healthy.test.yml");
    std::fs::write(&test_file, healthy_test_file(&scrapes)).expect("test file");
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test_file)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "alerts fired for a healthy workload:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A standard normal draw (Box-Muller over a xorshift generator).
fn normal(state: &mut u64) -> f64 {
    let mut uniform = || {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        ((*state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let (u1, u2) = (uniform(), uniform());
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A generated usage record made healthy and LLM-like: latency lognormal with median 4 s and
/// p95 25 s (time to first token keeps its share of it), quota use between 10 % and 70 % that
/// only every other second of records reports, and a client key that changes every 5 seconds.
fn healthy(element: &str, n: u64, rng: &mut u64) -> String {
    let Ok(serde_json::Value::Object(mut r)) = serde_json::from_str(element) else {
        return element.to_owned();
    };
    let latency = (4000.0 * (1.8326 / 1.6449 * normal(rng)).exp()).clamp(300.0, 600_000.0);
    let field = |r: &serde_json::Map<String, serde_json::Value>, k: &str| {
        r.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0)
    };
    let old = field(&r, "latency_ms").max(1.0);
    let ttft = field(&r, "ttft_ms");
    r.insert("latency_ms".into(), serde_json::json!(latency as u64));
    if ttft > 0.0 {
        let share = (ttft / old).min(1.0);
        r.insert(
            "ttft_ms".into(),
            serde_json::json!(((latency * share) as u64).max(1)),
        );
    }
    let second = n / HEALTHY_RATE as u64;
    let used = 10 + (n * 7919) % 60;
    if let Some(serde_json::Value::Object(headers)) = r.get_mut("response_headers") {
        if second % 2 == 1 {
            headers.retain(|k, _| {
                !k.to_ascii_lowercase().contains("ratelimit") && !k.contains("Used-Percent")
            });
        }
        for (k, v) in headers.iter_mut() {
            if k.ends_with("Used-Percent") {
                *v = serde_json::json!([used.to_string()]);
            } else if k.ends_with("-utilization") {
                *v = serde_json::json!([format!("{:.2}", used as f64 / 100.0)]);
            } else if k == "anthropic-ratelimit-unified-status" {
                *v = serde_json::json!(["allowed"]);
            }
        }
    }
    r.insert(
        "api_key".into(),
        serde_json::json!(format!("sk-client-healthy-{}", second / 5)),
    );
    serde_json::Value::Object(r).to_string()
}

/// A promtool test over `scrapes` (real time, samples), 15 virtual seconds apart, that expects
/// no alert of the shipped rules to fire at any minute from the 1st to the 12th.
fn healthy_test_file(scrapes: &[(f64, common::Metrics)]) -> String {
    let target = [("job", "cpa-usage-exporter"), ("instance", "exporter:9317")];
    let mut series: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    for (i, (real, m)) in scrapes.iter().enumerate() {
        let virtual_now = i as f64 * VIRTUAL_STEP;
        let speed = VIRTUAL_STEP / REAL_STEP;
        let mut samples: Vec<(String, f64)> =
            m.0.iter()
                .map(|((name, labels), v)| {
                    let mut labels = labels.clone();
                    for (k, val) in target {
                        labels.insert(k.to_owned(), val.to_owned());
                    }
                    let shown: Vec<String> = labels
                        .iter()
                        .map(|(k, v)| {
                            format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
                        })
                        .collect();
                    // Unix times move to the virtual clock, at the same distance (sped up) from
                    // the moment of the scrape.
                    let is_time = name.ends_with("_timestamp_seconds")
                        || name == "process_start_time_seconds";
                    let v = if is_time && *v > 0.0 {
                        virtual_now + (v - real) * speed
                    } else {
                        *v
                    };
                    (format!("{name}{{{}}}", shown.join(",")), v)
                })
                .collect();
        samples.push((
            r#"up{instance="exporter:9317",job="cpa-usage-exporter"}"#.to_owned(),
            1.0,
        ));
        for (key, v) in samples {
            let values = series.entry(key).or_insert_with(|| vec![None; i]);
            values.resize(i, None);
            values.push(Some(v));
        }
    }
    for values in series.values_mut() {
        values.resize(scrapes.len(), None);
    }
    let input: Vec<serde_json::Value> = series
        .iter()
        .map(|(name, values)| {
            let text: Vec<String> = values
                .iter()
                .map(|v| match v {
                    None => "_".to_owned(),
                    Some(v) if v.is_nan() => "NaN".to_owned(),
                    Some(v) if v.is_infinite() => "Inf".to_owned(),
                    Some(v) => format!("{v}"),
                })
                .collect();
            serde_json::json!({ "series": name, "values": text.join(" ") })
        })
        .collect();
    let alerts: BTreeSet<String> = rules()
        .into_iter()
        .filter(|r| r.alert)
        .map(|r| r.name)
        .collect();
    let mut checks = Vec::new();
    for minute in 1..=12 {
        for alert in &alerts {
            checks.push(serde_json::json!({
                "eval_time": format!("{minute}m"),
                "alertname": alert,
                "exp_alerts": [],
            }));
        }
    }
    let rule_files: Vec<String> = rule_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    // The workload is what it should be, so the silence means something: the traffic guards
    // pass, failures are visible, and the p95 is LLM-like (above the old fixed 15 s).
    let sanity = [
        "count(cpa:provider_model:requests:rate5m * 300 >= 20) >= bool 5",
        "cpa:instance:request_failures:ratio_rate5m > bool 0.01",
        "max(cpa:provider_model_quantile:request_duration_seconds:histogram_quantile{quantile=\"0.95\"}) > bool 15",
        "max(cpa:provider_model_quantile:time_to_first_token_seconds:histogram_quantile{quantile=\"0.95\"}) > bool 3",
        "count(cpa_quota_used_ratio) > bool 0",
    ];
    let exprs: Vec<serde_json::Value> = sanity
        .iter()
        .map(|e| {
            let labels = if e.starts_with("cpa:instance") {
                "{instance=\"exporter:9317\",job=\"cpa-usage-exporter\"}"
            } else {
                "{}"
            };
            serde_json::json!({
                "expr": e,
                "eval_time": "10m",
                "exp_samples": [{ "labels": labels, "value": 1 }],
            })
        })
        .collect();
    let doc = serde_json::json!({
        "rule_files": rule_files,
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": input,
            "alert_rule_test": checks,
            "promql_expr_test": exprs,
        }],
    });
    serde_norway::to_string(&doc).expect("yaml")
}
