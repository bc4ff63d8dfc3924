//! The Grafana dashboards under `dashboards/`: the rules of grafana/dashboard-linter that make
//! them work both file-provisioned and imported, and that every metric they query exists in
//! the exporter's output (so renaming a metric breaks the build, not a dashboard).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::promql;
use serde_json::Value;

/// The dashboards that must exist, by uid.
const UIDS: [&str; 4] = [
    "cpa-usage-overview",
    "cpa-operations",
    "cpa-credentials",
    "cpa-exporter-health",
];

/// Labels, besides job and instance, that a dashboard variable filters on, per metric. A panel
/// reading one of these metrics on a dashboard that has the variable must apply it.
const FILTERED: [(&str, &[&str]); 24] = [
    ("cpa_credential_errors_total", &["provider", "credential"]),
    (
        "cpa_requests_total",
        &["provider", "model", "credential", "api_key"],
    ),
    (
        "cpa_request_failures_total",
        &["provider", "model", "credential", "api_key"],
    ),
    (
        "cpa_tokens_total",
        &["provider", "model", "credential", "api_key"],
    ),
    (
        "cpa_cost_usd_total",
        &["provider", "model", "credential", "api_key"],
    ),
    ("cpa_unpriced_requests_total", &["provider", "model"]),
    ("cpa_zero_token_requests_total", &["provider", "model"]),
    (
        "cpa_request_duration_seconds_bucket",
        &["provider", "model", "credential"],
    ),
    (
        "cpa_time_to_first_token_seconds_bucket",
        &["provider", "model", "credential"],
    ),
    ("cpa_credential_info", &["provider", "credential"]),
    ("cpa_credential_status", &["provider", "credential"]),
    ("cpa_credential_unavailable", &["provider", "credential"]),
    ("cpa_credential_disabled", &["provider", "credential"]),
    (
        "cpa_credential_next_retry_timestamp_seconds",
        &["provider", "credential"],
    ),
    ("cpa_quota_used_ratio", &["provider", "credential"]),
    ("cpa_quota_window_seconds", &["provider", "credential"]),
    (
        "cpa_quota_reset_timestamp_seconds",
        &["provider", "credential"],
    ),
    ("cpa_ratelimit_remaining", &["provider", "credential"]),
    ("cpa_ratelimit_limit", &["provider", "credential"]),
    (
        "cpa_quota_last_observed_timestamp_seconds",
        &["provider", "credential"],
    ),
    (
        "cpa_credential_subscription_end_timestamp_seconds",
        &["provider", "credential"],
    ),
    ("cpa_budget_usd", &["api_key"]),
    ("cpa_budget_spent_usd", &["api_key"]),
    ("cpa_budget_period_end_timestamp_seconds", &["api_key"]),
];

/// Metrics of the Prometheus node exporter (and the recording rules over them) carry the node
/// exporter's job and instance, filtered by the `node_job` and `node_instance` variables.
fn is_node_metric(name: &str) -> bool {
    name.starts_with("node_") || name.contains(":node_")
}

const FILTER_VARIABLES: [&str; 4] = ["provider", "model", "credential", "api_key"];

/// Grafana's ways of pointing at the `datasource` variable.
fn is_templated_datasource(ds: &Value) -> bool {
    match ds {
        Value::String(s) => s == "${datasource}" || s == "$datasource",
        Value::Object(o) => {
            matches!(
                o.get("uid").and_then(Value::as_str),
                Some("${datasource}" | "$datasource")
            ) && o.get("type").is_none_or(|t| t == "prometheus")
        }
        _ => false,
    }
}

fn is_counter_sample(name: &str) -> bool {
    ["_total", "_bucket", "_count", "_sum"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// What the checks expand Grafana's interval variables to: durations nobody writes by hand, so
/// a range in the parsed query tells which variable it came from.
const LINT_BUILTINS: [(&str, &str); 7] = [
    ("__rate_interval", "60001ms"),
    ("__range", "3600001ms"),
    ("__interval", "15001ms"),
    ("__range_s", "3600"),
    ("__range_ms", "3600000"),
    ("__interval_ms", "15000"),
    ("__rate_interval_ms", "60000"),
];

/// The interval variable a duration of a query expanded with [`LINT_BUILTINS`] came from.
fn interval_variable(d: &Duration) -> Option<&'static str> {
    match d.as_millis() {
        60_001 => Some("$__rate_interval"),
        3_600_001 => Some("$__range"),
        15_001 => Some("$__interval"),
        _ => None,
    }
}

/// The query as the checks parse it: interval variables as [`LINT_BUILTINS`], query variables
/// left as written (`job=~"$job"` keeps its `$job`), the others (constants, text boxes) by
/// their value.
fn lint_expand(expr: &str, d: &Value) -> String {
    let mut values = promql::variable_values(d);
    for v in promql::variables(d) {
        if let (Some("query"), Some(name)) = (v["type"].as_str(), v["name"].as_str()) {
            values.insert(name.to_owned(), format!("${name}"));
        }
    }
    promql::expand_with(expr, &values, &LINT_BUILTINS)
}

/// Checks one panel query of dashboard `d`; returns the problems found.
fn check_expr(expr: &str, d: &Value, vars: &BTreeSet<String>) -> Vec<String> {
    let mut errors = Vec::new();
    // As Grafana sends it: every variable by its value.
    if let Err(e) = promql::parse(&promql::expand(expr, &promql::variable_values(d))) {
        errors.push(format!("expanded query: {e}"));
        return errors;
    }
    let linted = lint_expand(expr, d);
    let (selectors, ranges) = match (promql::selectors(&linted), promql::ranges(&linted)) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => return vec![e],
    };
    if selectors.is_empty() {
        errors.push("reads no metric".to_owned());
    }
    for range in &ranges {
        if interval_variable(range).is_none() {
            errors.push(format!(
                "range `[{}]` is not $__rate_interval, $__range or $__interval",
                promql::duration(range)
            ));
        }
    }
    for s in &selectors {
        let has_value = |label: &str, value: &str| {
            s.matchers
                .iter()
                .any(|m| m.label == label && m.op == "=~" && m.value == value)
        };
        let has = |label: &str| has_value(label, &format!("${label}"));
        for m in &s.matchers {
            if let Some(var) = m.value.strip_prefix('$') {
                let is_name =
                    !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if is_name && !vars.contains(var) {
                    errors.push(format!("unknown variable `${var}`"));
                }
            }
        }
        if is_counter_sample(&s.name) {
            let in_rate = matches!(s.enclosing.as_deref(), Some("rate" | "increase" | "irate"));
            if !in_rate || s.range.is_none() {
                errors.push(format!(
                    "counter `{}` is not the direct argument of rate()/increase()/irate()",
                    s.name
                ));
            }
        }
        if let (Some("rate" | "irate"), Some(r)) = (s.enclosing.as_deref(), &s.range) {
            if interval_variable(r) == Some("$__interval") {
                errors.push("rate over `[$__interval]`: use $__rate_interval".to_owned());
            }
        }
        for label in ["job", "instance"] {
            let ok = if is_node_metric(&s.name) {
                has_value(label, &format!("$node_{label}"))
            } else {
                has(label)
            };
            if !ok {
                errors.push(format!(
                    "`{}` lacks the matcher {label}=~\"${}{label}\"",
                    s.name,
                    if is_node_metric(&s.name) { "node_" } else { "" }
                ));
            }
        }
        if let Some((_, labels)) = FILTERED.iter().find(|(m, _)| *m == s.name) {
            for label in labels.iter().filter(|l| vars.contains(**l)) {
                if !has(label) {
                    errors.push(format!(
                        "`{}` ignores the dashboard variable ${label} (add {label}=~\"${label}\")",
                        s.name
                    ));
                }
            }
        }
    }
    let mut rest = expr;
    while let Some(i) = rest.find("histogram_quantile(") {
        rest = &rest[i + "histogram_quantile(".len()..];
        let arg = rest
            .split_once(',')
            .map(|(_, a)| a.trim_start())
            .unwrap_or("");
        if !arg.starts_with("sum by (le") {
            errors.push("histogram_quantile over something other than `sum by (le, ...)`".into());
        }
    }
    errors
}

#[test]
fn dashboards_follow_the_provisioning_and_linter_rules() {
    let dashboards = promql::dashboards();
    let mut errors: Vec<String> = Vec::new();
    let mut uids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for (path, d) in &dashboards {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut err = |what: String| errors.push(format!("{file}: {what}"));
        let text = std::fs::read_to_string(path).unwrap();
        if d.get("__inputs").is_some() || text.contains("__inputs") {
            err("has __inputs (breaks file provisioning)".into());
        }
        if text.contains("${DS_") || text.contains("$DS_") {
            err("references a ${DS_...} import input".into());
        }
        if !d["id"].is_null() {
            err(format!("`id` must be null, is {}", d["id"]));
        }
        let uid = d["uid"].as_str().unwrap_or_default();
        if uid.is_empty() || uid.len() > 40 {
            err(format!("uid `{uid}` must be 1 to 40 characters"));
        }
        if !uids.insert(uid.to_owned()) {
            err(format!("uid `{uid}` is used twice"));
        }
        if !titles.insert(d["title"].as_str().unwrap_or_default().to_owned()) {
            err("title is used twice".into());
        }
        if d["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
            err("schemaVersion missing or below 36".into());
        }
        let tags: Vec<&str> = d["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !tags.contains(&"cpa") {
            err("lacks the tag `cpa`".into());
        }
        let linked = d["links"].as_array().into_iter().flatten().any(|l| {
            l["type"] == "dashboards"
                && l["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t == "cpa"))
        });
        if !linked {
            err("lacks a `dashboards` link on the tag `cpa` to the other dashboards".into());
        }

        // Variables.
        let vars = promql::variables(d);
        let datasources: Vec<&&Value> = vars.iter().filter(|v| v["type"] == "datasource").collect();
        match datasources.as_slice() {
            [ds] if ds["name"] == "datasource" && ds["query"] == "prometheus" => {}
            _ => err(
                "needs exactly one variable `datasource` of type datasource, query prometheus"
                    .into(),
            ),
        }
        let names: BTreeSet<String> = vars
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect();
        for v in &vars {
            let name = v["name"].as_str().unwrap_or_default();
            if v["type"] != "query" {
                continue;
            }
            if !is_templated_datasource(&v["datasource"]) {
                err(format!("variable `{name}` does not use ${{datasource}}"));
            }
            if v["refresh"] != 2 {
                err(format!(
                    "variable `{name}` must refresh on time range change (2)"
                ));
            }
            let query = promql::variable_query(v).unwrap_or_default();
            if promql::parse_label_values(query).is_none() {
                err(format!(
                    "variable `{name}`: `{query}` is not label_values(...)"
                ));
            }
            if v["multi"] != true || v["includeAll"] != true {
                err(format!(
                    "variable `{name}` must be multi-select with an All option"
                ));
            }
            let all = v["allValue"].as_str().unwrap_or_default();
            if !matches!(all, ".*" | ".+") {
                err(format!(
                    "variable `{name}`: allValue `{all}` is not a regex matching all"
                ));
            }
        }
        for required in ["job", "instance"] {
            if !vars
                .iter()
                .any(|v| v["name"] == required && v["type"] == "query")
            {
                err(format!("lacks the query variable `{required}`"));
            }
        }

        // Panels.
        let mut ids = BTreeSet::new();
        let mut used = BTreeSet::new();
        for p in promql::panels(d) {
            let title = p["title"].as_str().unwrap_or_default();
            if !p["id"].as_u64().is_some_and(|id| ids.insert(id)) {
                err(format!("panel `{title}`: id missing or repeated"));
            }
            if p["gridPos"].get("w").is_none() {
                err(format!("panel `{title}`: no gridPos"));
            }
            if p["type"] == "row" {
                continue;
            }
            let mut perr = |what: String| err(format!("panel `{title}`: {what}"));
            if title.trim().is_empty() {
                perr("no title".into());
            }
            if p["description"]
                .as_str()
                .is_none_or(|s| s.trim().is_empty())
            {
                perr("no description".into());
            }
            if p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                perr("no unit (fieldConfig.defaults.unit)".into());
            }
            if !is_templated_datasource(&p["datasource"]) {
                perr(format!(
                    "datasource {} is not ${{datasource}}",
                    p["datasource"]
                ));
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                perr("no queries".into());
            }
            if p["type"] == "heatmap" && targets.iter().any(|t| t["format"] != "heatmap") {
                perr("heatmap queries must use format heatmap".into());
            }
            for t in &targets {
                let ref_id = t["refId"].as_str().unwrap_or_default();
                if !is_templated_datasource(&t["datasource"]) {
                    perr(format!(
                        "query {ref_id}: datasource {} is not ${{datasource}}",
                        t["datasource"]
                    ));
                }
                let expr = t["expr"].as_str().unwrap_or_default();
                if expr.trim().is_empty() {
                    perr(format!("query {ref_id}: empty expr"));
                    continue;
                }
                for e in check_expr(expr, d, &names) {
                    perr(format!("query {ref_id}: {e}\n    {expr}"));
                }
                for s in promql::selectors(&lint_expand(expr, d)).unwrap_or_default() {
                    used.insert(s.name);
                }
            }
        }
        // A dashboard reading a metric with a filterable label has that variable.
        for (metric, labels) in FILTERED {
            if used.contains(metric) {
                for label in labels.iter().filter(|l| !names.contains(**l)) {
                    errors.push(format!(
                        "{file}: reads {metric} but has no `{label}` variable"
                    ));
                }
            }
        }
        for label in FILTER_VARIABLES.iter().filter(|l| names.contains(**l)) {
            let v = vars.iter().find(|v| v["name"] == *label).unwrap();
            if v["allValue"] != ".*" {
                errors.push(format!(
                    "{file}: `{label}` allValue must be `.*` (the label may be dropped)"
                ));
            }
        }
    }
    for uid in UIDS {
        if !uids.contains(uid) {
            errors.push(format!("no dashboard with uid `{uid}`"));
        }
    }
    assert!(
        errors.is_empty(),
        "{} problems:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn overview_has_the_cpa_manager_views() {
    let (_, d) = promql::dashboards()
        .into_iter()
        .find(|(_, d)| d["uid"] == "cpa-usage-overview")
        .expect("overview");
    let panels = promql::panels(&d);
    let types: Vec<&str> = panels.iter().filter_map(|p| p["type"].as_str()).collect();
    assert!(types.contains(&"heatmap"), "a latency heatmap");
    assert!(
        types.iter().filter(|t| **t == "table").count() >= 4,
        "top tables and the weekday grid"
    );
    let exprs: String = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        // The weekday x hour grid, shifted to the viewer's time zone.
        "day_of_week(vector(time() + 3600 * $tz_offset))",
        "hour(vector(time() + 3600 * $tz_offset))",
        // Period over period and the endpoint breakdown.
        "offset 1d",
        "offset 7d",
        "sum by (endpoint)",
        "cpa:api_key_period:budget_used:ratio",
        "sum by (le) (rate(cpa_request_duration_seconds_bucket",
        "cpa_time_to_first_token_seconds_bucket",
        "sum by (status_code)",
        "sum by (type)",
        "sum by (api_key)",
        "cpa_cost_usd_total",
    ] {
        assert!(exprs.contains(needle), "overview lacks `{needle}`");
    }
}

#[test]
fn provisioning_files_match_the_dashboards() {
    let root = promql::repo_root().join("dashboards/provisioning");
    let read = |sub: &str| -> Vec<serde_norway::Value> {
        let dir = root.join(sub);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                let text = std::fs::read_to_string(&p).unwrap();
                out.push(
                    serde_norway::from_str(&text)
                        .unwrap_or_else(|e| panic!("{}: {e}", p.display())),
                );
            }
        }
        assert!(!out.is_empty(), "no YAML in {}", dir.display());
        out
    };
    let datasources: Vec<serde_norway::Value> = read("datasources")
        .into_iter()
        .flat_map(|f| f["datasources"].as_sequence().cloned().unwrap_or_default())
        .collect();
    let prometheus: Vec<_> = datasources
        .iter()
        .filter(|d| d["type"].as_str() == Some("prometheus"))
        .collect();
    assert_eq!(prometheus.len(), 1, "one Prometheus data source");
    let ds = prometheus[0];
    assert!(
        ds["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "a fixed data source uid"
    );
    assert_eq!(
        ds["isDefault"].as_bool(),
        Some(true),
        "the default data source, so ${{datasource}} picks it"
    );
    assert!(
        ds["url"].as_str().is_some_and(|u| u.starts_with("http")),
        "a URL"
    );
    assert!(
        ds["jsonData"]["timeInterval"].as_str().is_some(),
        "timeInterval = scrape interval, for $__rate_interval"
    );

    let providers: Vec<serde_norway::Value> = read("dashboards")
        .into_iter()
        .flat_map(|f| f["providers"].as_sequence().cloned().unwrap_or_default())
        .collect();
    assert_eq!(providers.len(), 1, "one dashboard provider");
    let p = &providers[0];
    assert_eq!(p["type"].as_str(), Some("file"));
    assert!(
        p["options"]["path"]
            .as_str()
            .is_some_and(|s| s.starts_with('/')),
        "an absolute path the compose stack mounts dashboards/ on"
    );
}

/// Each selector or expression of the dashboards, expanded, with where it comes from.
fn all_expanded() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = promql::panel_queries()
        .into_iter()
        .map(|q| {
            (
                format!("{} / {} / {}", q.file, q.panel, q.ref_id),
                q.expanded,
            )
        })
        .collect();
    for v in promql::variable_queries() {
        if let Some(sel) = v.selector {
            out.push((format!("{} / variable {}", v.file, v.name), sel));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queried_metric_exists_in_the_exporter_output() {
    let exposed = common::demo_metric_names().await;
    let recorded = promql::recording_rule_names();
    let mut missing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut queried = BTreeSet::new();
    for (origin, expr) in all_expanded() {
        let names = promql::metric_names(&expr).unwrap_or_else(|e| panic!("{origin}: {e}"));
        for name in names {
            queried.insert(name.clone());
            let known = if name == "ALERTS" || name.starts_with("node_") {
                // node_*: the node exporter's, queried against a real one in tests/e2e.rs.
                true
            } else if name.contains(':') {
                // A recording rule: it must be defined in alerts/ once that exists.
                recorded.as_ref().is_none_or(|r| r.contains(&name))
            } else {
                exposed.contains(&name)
            };
            if !known {
                missing.entry(name).or_default().insert(origin.clone());
            }
        }
    }
    if recorded.is_none() {
        eprintln!("no alerts/ directory: recording-rule names used by dashboards are unchecked");
    }
    assert!(
        queried.len() > 30,
        "only {} metric names queried",
        queried.len()
    );
    let report: Vec<String> = missing
        .iter()
        .map(|(name, origins)| {
            let kind = if name.contains(':') {
                "recording rule not in alerts/"
            } else {
                "not in the exporter's output"
            };
            format!(
                "{name} ({kind}), used by:\n    {}",
                origins.iter().cloned().collect::<Vec<_>>().join("\n    ")
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "metrics the dashboards query but nothing provides:\n{}",
        report.join("\n")
    );
}

#[test]
fn expanded_queries_are_valid_promql() {
    // promtool parses every expression of a rule file: turn each query into a recording rule.
    let mut exprs = all_expanded();
    let mut seen = BTreeSet::new();
    exprs.retain(|(_, e)| seen.insert(e.clone()));
    let mut yaml = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (i, (origin, expr)) in exprs.iter().enumerate() {
        yaml.push_str(&format!(
            "      # {origin}\n      - record: dashboard_query_{i}\n        expr: |\n"
        ));
        for line in expr.lines() {
            yaml.push_str(&format!("          {line}\n"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboards.yml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    match Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "promtool rejects a dashboard query:\n{}{}\n{yaml}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("promtool is not installed; .ci/run installs it")
        }
        Err(_) => eprintln!("promtool not installed: skipping the PromQL syntax check"),
    }
}

#[test]
fn the_parser_finds_metric_names_only() {
    // Grafana's interval variables expanded first, as for every query.
    let names = |e: &str| {
        promql::metric_names(&promql::expand(e, &BTreeMap::new()))
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{x="rate(b_total[5m])", y=~"$y"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum(rate(a_total[1m])) / on (job) group_left (version) b_info offset 5m"),
        ["a_total", "b_info"]
    );
    assert_eq!(
        names("sum without (le) (x) > bool 1e-3 unless on() y or vector(0)"),
        ["x", "y"]
    );
    assert_eq!(
        names(r#"label_replace(count_values("hour", hour()), "hour", "0$1", "hour", "([0-9])")"#),
        Vec::<String>::new()
    );
    assert_eq!(names("max_over_time(sum(rate(a_total[$__rate_interval]))[$__range:$__interval]) - cpa:health_score"), ["a_total", "cpa:health_score"]);
    assert_eq!(names(r#"{__name__="up"}"#), ["up"]);
    assert_eq!(
        names("ALERTS{alertstate='firing'} and on() vector(time()) > 1"),
        ["ALERTS"]
    );
    let s = promql::selectors("increase(a_total[1h]) + (a_total)").unwrap();
    assert_eq!(s[0].enclosing.as_deref(), Some("increase"));
    assert_eq!(s[0].range, Some(Duration::from_secs(3600)));
    assert_eq!(s[1].enclosing.as_deref(), Some(""));
    assert_eq!(promql::selectors("a_total * 2").unwrap()[0].enclosing, None);
    assert_eq!(
        promql::ranges("max_over_time(rate(a[1m])[1h:15s]) + max_over_time(b[1d:])").unwrap(),
        [3600, 15, 60, 86_400].map(Duration::from_secs)
    );

    // A syntax error fails with the query and the parser's message.
    let e = promql::selectors("sum(rate(x[1m])").unwrap_err();
    assert!(e.contains("`sum(rate(x[1m])`"), "{e}");
    assert!(promql::metric_names("rate(x[$__rate_interval])").is_err());
    assert!(
        promql::metric_names("rate(x)").is_err(),
        "rate of an instant vector"
    );

    let vars = BTreeMap::from([
        ("provider".to_owned(), ".*".to_owned()),
        ("limit".to_owned(), "10".to_owned()),
    ]);
    assert_eq!(
        promql::expand(
            r#"rate(a{p=~"$provider",q=~"${provider:regex}",r=~"[[provider]]"}[$__rate_interval]) / $limit + "$1""#,
            &vars
        ),
        r#"rate(a{p=~".*",q=~".*",r=~".*"}[1m]) / 10 + "$1""#
    );
    assert_eq!(
        promql::expand("increase(a[$__range]) [$__range:$__interval]", &vars),
        "increase(a[1h]) [1h:15s]"
    );
    assert_eq!(
        promql::parse_label_values(r#"label_values(a{job=~"$job", b="c,d"}, provider)"#),
        Some((
            Some(r#"a{job=~"$job", b="c,d"}"#.to_owned()),
            "provider".to_owned()
        ))
    );
    assert_eq!(
        promql::parse_label_values("label_values(job)"),
        Some((None, "job".to_owned()))
    );
}

/// Families whose samples carry exemplars (OpenMetrics only).
const WITH_EXEMPLARS: [&str; 3] = [
    "cpa_request_duration_seconds_bucket",
    "cpa_time_to_first_token_seconds_bucket",
    "cpa_request_failures_total",
];

#[test]
fn latency_and_failure_graphs_show_exemplars() {
    let mut shown = 0;
    for (file, d) in promql::dashboards() {
        for p in promql::panels(&d) {
            let title = p["title"].as_str().unwrap_or("").to_lowercase();
            let graph = matches!(p["type"].as_str(), Some("timeseries" | "heatmap"));
            let about = ["latency", "ttft", "first token", "failure", "error", "429"]
                .iter()
                .any(|w| title.contains(w));
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or("");
                let queries = WITH_EXEMPLARS.iter().any(|m| expr.contains(m));
                let on = t["exemplar"] == true;
                // A dot on a latency or failure graph names the request behind it.
                if graph && about && queries {
                    assert!(
                        on,
                        "{}: panel `{title}` should show exemplars",
                        file.display()
                    );
                    shown += 1;
                }
                // Anywhere else there would be none to show.
                if on {
                    assert!(
                        queries && graph,
                        "{}: `{title}` has no exemplars to show",
                        file.display()
                    );
                }
            }
        }
    }
    assert!(shown >= 10, "only {shown} targets show exemplars");
}
