//! PromQL helpers shared by the dashboard, rule and end-to-end tests: load the Grafana
//! dashboards, expand their template variables the way Grafana would, and list the metric
//! names a query reads from its syntax tree (`promql-parser`), so a query that does not parse
//! fails the test that reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use promql_parser::label::MatchOp;
use promql_parser::parser::{self as ast, Expr};
use serde_json::Value;

/// What Grafana's built-in interval variables expand to in these tests.
pub const RATE_INTERVAL: &str = "1m";
pub const RANGE: &str = "1h";
pub const INTERVAL: &str = "15s";

/// The value a multi-select variable with "All" selected expands to (its `allValue`), and what
/// `$job`/`$instance` expand to.
pub const ALL: &str = ".*";

/// The repository root (where `dashboards/` and `alerts/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every dashboard under `dashboards/` (the top level only), sorted by file name.
pub fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = repo_root().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read dashboard");
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()));
            (p, json)
        })
        .collect()
}

/// Every panel of a dashboard, the panels nested in (collapsed) rows included.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The template variables of a dashboard.
pub fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .map(|l| l.iter().collect())
        .unwrap_or_default()
}

/// The query string of a query variable (`query` may be a string or `{"query": ...}`).
pub fn variable_query(var: &Value) -> Option<&str> {
    match &var["query"] {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("query").and_then(Value::as_str),
        _ => var["definition"].as_str(),
    }
}

/// What each variable of a dashboard expands to: query variables (multi-select with "All", and
/// `job`/`instance`) to [`ALL`], constants, text boxes and custom variables to their current
/// value, the data source variable to `prometheus`.
pub fn variable_values(dashboard: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for v in variables(dashboard) {
        let Some(name) = v["name"].as_str() else {
            continue;
        };
        let value = match v["type"].as_str() {
            Some("query") => ALL.to_owned(),
            Some("datasource") => "prometheus".to_owned(),
            _ => match &v["current"]["value"] {
                Value::String(s) => s.clone(),
                Value::Array(a) => a
                    .first()
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                _ => variable_query(v).unwrap_or_default().to_owned(),
            },
        };
        out.insert(name.to_owned(), value);
    }
    out
}

/// Grafana's built-in interval variables (without the `$`) and what they expand to here.
pub const BUILTINS: [(&str, &str); 7] = [
    ("__rate_interval", RATE_INTERVAL),
    ("__range", RANGE),
    ("__interval", INTERVAL),
    ("__range_s", "3600"),
    ("__range_ms", "3600000"),
    ("__interval_ms", "15000"),
    ("__rate_interval_ms", "60000"),
];

/// Replace Grafana variables in `expr`: `$__rate_interval`, `$__range`, `$__interval` (and their
/// `_s`/`_ms` forms) by fixed values, and `$x`, `${x}`, `${x:format}`, `[[x]]` by `vars[x]`.
/// A `$name` that is neither built in nor in `vars` is left as it is, as Grafana does (so a
/// `$1` in a `label_replace` replacement survives).
pub fn expand(expr: &str, vars: &BTreeMap<String, String>) -> String {
    expand_with(expr, vars, &BUILTINS)
}

/// [`expand`] with other values for the built-in variables.
pub fn expand_with(
    expr: &str,
    vars: &BTreeMap<String, String>,
    builtins: &[(&str, &str)],
) -> String {
    let lookup = |name: &str| -> Option<String> {
        builtins
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| (*v).to_owned())
            .or_else(|| vars.get(name).cloned())
    };
    let b = expr.as_bytes();
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &expr[i..];
        if let Some(inner) = rest.strip_prefix("${") {
            if let Some(end) = inner.find('}') {
                let name = inner[..end].split(':').next().unwrap_or_default();
                if let Some(v) = lookup(name) {
                    out.push_str(&v);
                    i += 2 + end + 1;
                    continue;
                }
            }
        } else if let Some(inner) = rest.strip_prefix("[[") {
            if let Some(end) = inner.find("]]") {
                let name = inner[..end].split(':').next().unwrap_or_default();
                if let Some(v) = lookup(name) {
                    out.push_str(&v);
                    i += 2 + end + 2;
                    continue;
                }
            }
        } else if let Some(inner) = rest.strip_prefix('$') {
            let len = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            if let Some(v) = lookup(&inner[..len]) {
                out.push_str(&v);
                i += 1 + len;
                continue;
            }
        }
        let c = rest.chars().next().expect("char");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// One query of a dashboard panel, as written and with its variables expanded.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub file: String,
    pub dashboard: String,
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
    pub expanded: String,
    /// Grafana runs it as an instant query (tables, stats over the range).
    pub instant: bool,
}

/// Every panel query of every dashboard.
pub fn panel_queries() -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for (path, d) in dashboards() {
        let vars = variable_values(&d);
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let Some(expr) = t["expr"].as_str() else {
                    continue;
                };
                out.push(PanelQuery {
                    file: file_name(&path),
                    dashboard: d["uid"].as_str().unwrap_or_default().to_owned(),
                    panel: p["title"].as_str().unwrap_or_default().to_owned(),
                    ref_id: t["refId"].as_str().unwrap_or_default().to_owned(),
                    expr: expr.to_owned(),
                    expanded: expand(expr, &vars),
                    instant: t["instant"].as_bool() == Some(true),
                });
            }
        }
    }
    out
}

/// A `label_values(...)` variable query: the series selector (if any) and the label.
#[derive(Debug, Clone)]
pub struct VariableQuery {
    pub file: String,
    pub dashboard: String,
    pub name: String,
    pub query: String,
    /// The selector with variables expanded, e.g. `cpa_requests_total{job=~".*"}`.
    pub selector: Option<String>,
    pub label: String,
}

/// Parse Grafana's `label_values(label)` / `label_values(selector, label)`.
pub fn parse_label_values(query: &str) -> Option<(Option<String>, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?
        .trim();
    match inner.rfind(',') {
        // A comma inside the selector's braces is not the separator: the label is last.
        Some(i) if !inner[i..].contains('}') && !inner[i..].contains('"') => Some((
            Some(inner[..i].trim().to_owned()),
            inner[i + 1..].trim().to_owned(),
        )),
        _ => Some((None, inner.to_owned())),
    }
}

/// Every query variable of every dashboard that uses `label_values`.
pub fn variable_queries() -> Vec<VariableQuery> {
    let mut out = Vec::new();
    for (path, d) in dashboards() {
        let vars = variable_values(&d);
        for v in variables(&d) {
            if v["type"] != "query" {
                continue;
            }
            let query = variable_query(v).unwrap_or_default().to_owned();
            let Some((selector, label)) = parse_label_values(&query) else {
                continue;
            };
            out.push(VariableQuery {
                file: file_name(&path),
                dashboard: d["uid"].as_str().unwrap_or_default().to_owned(),
                name: v["name"].as_str().unwrap_or_default().to_owned(),
                query,
                selector: selector.map(|s| expand(&s, &vars)),
                label,
            });
        }
    }
    out
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Parse a PromQL expression whose Grafana variables are expanded. The error names the query
/// and carries the parser's message.
pub fn parse(expr: &str) -> Result<Expr, String> {
    ast::parse(expr).map_err(|e| format!("`{expr}` is not valid PromQL: {e}"))
}

/// One label matcher of a selector: `label op "value"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matcher {
    pub label: String,
    /// `=`, `!=`, `=~` or `!~`.
    pub op: String,
    pub value: String,
}

/// A metric read by a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    pub name: String,
    /// The label matchers other than `__name__`, the alternatives of `{a="x" or b="y"}` included.
    pub matchers: Vec<Matcher>,
    /// The range if the selector is a range vector (`name{..}[range]`).
    pub range: Option<Duration>,
    /// The function or aggregation whose parentheses directly enclose it (`""` for plain
    /// parentheses, `None` at the top level): operators in between do not count.
    pub enclosing: Option<String>,
}

/// Every metric selector of a PromQL expression (variables expanded), in the order written.
pub fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let tree = parse(expr)?;
    let mut out = Vec::new();
    collect(&tree, None, &mut out).map_err(|e| format!("`{expr}`: {e}"))?;
    Ok(out)
}

fn collect(e: &Expr, enclosing: Option<&str>, out: &mut Vec<Selector>) -> Result<(), String> {
    match e {
        Expr::VectorSelector(vs) => out.push(selector(vs, None, enclosing)?),
        Expr::MatrixSelector(ms) => out.push(selector(&ms.vs, Some(ms.range), enclosing)?),
        Expr::Call(c) => {
            for a in &c.args.args {
                collect(a, Some(c.func.name), out)?;
            }
        }
        Expr::Aggregate(a) => {
            let op = a.op.to_string();
            if let Some(p) = &a.param {
                collect(p, Some(&op), out)?;
            }
            collect(&a.expr, Some(&op), out)?;
        }
        Expr::Paren(p) => collect(&p.expr, Some(""), out)?,
        Expr::Binary(b) => {
            collect(&b.lhs, enclosing, out)?;
            collect(&b.rhs, enclosing, out)?;
        }
        Expr::Unary(u) => collect(&u.expr, enclosing, out)?,
        Expr::Subquery(s) => collect(&s.expr, enclosing, out)?,
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
    Ok(())
}

fn selector(
    vs: &ast::VectorSelector,
    range: Option<Duration>,
    enclosing: Option<&str>,
) -> Result<Selector, String> {
    let all = vs
        .matchers
        .matchers
        .iter()
        .chain(vs.matchers.or_matchers.iter().flatten());
    let mut name = vs.name.clone();
    let mut matchers = Vec::new();
    for m in all {
        if m.name == "__name__" {
            match &m.op {
                MatchOp::Equal => name = Some(m.value.clone()),
                op => {
                    return Err(format!(
                        "`__name__{op}\"{}\"`: which metrics is unknown",
                        m.value
                    ))
                }
            }
        } else {
            matchers.push(Matcher {
                label: m.name.clone(),
                op: m.op.to_string(),
                value: m.value.clone(),
            });
        }
    }
    Ok(Selector {
        name: name.ok_or("a selector without a metric name")?,
        matchers,
        range,
        enclosing: enclosing.map(str::to_owned),
    })
}

/// The metric names a PromQL expression (variables expanded) reads: recording rules' names
/// included, function names, labels, strings and keywords not.
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    Ok(selectors(expr)?.into_iter().map(|s| s.name).collect())
}

/// Every duration written between brackets: a range vector's `[5m]`, and a subquery's range
/// and step (`[1h:1m]`; a subquery without a step gives its range only).
pub fn ranges(expr: &str) -> Result<Vec<Duration>, String> {
    fn walk(e: &Expr, out: &mut Vec<Duration>) {
        match e {
            Expr::MatrixSelector(ms) => out.push(ms.range),
            Expr::Subquery(s) => {
                out.push(s.range);
                out.extend(s.step);
                walk(&s.expr, out);
            }
            Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, out)),
            Expr::Aggregate(a) => {
                if let Some(p) = &a.param {
                    walk(p, out);
                }
                walk(&a.expr, out);
            }
            Expr::Paren(p) => walk(&p.expr, out),
            Expr::Binary(b) => {
                walk(&b.lhs, out);
                walk(&b.rhs, out);
            }
            Expr::Unary(u) => walk(&u.expr, out),
            Expr::VectorSelector(_)
            | Expr::NumberLiteral(_)
            | Expr::StringLiteral(_)
            | Expr::Extension(_) => {}
        }
    }
    let mut out = Vec::new();
    walk(&parse(expr)?, &mut out);
    Ok(out)
}

/// A duration as PromQL writes it (`1m`, `1h30m`).
pub fn duration(d: &Duration) -> String {
    promql_parser::util::display_duration(d)
}

/// The recording-rule names (`record:`) of every rule file under `alerts/`, or `None` when
/// there is no `alerts/` directory.
pub fn recording_rule_names() -> Option<BTreeSet<String>> {
    let dir = repo_root().join("alerts");
    let entries = std::fs::read_dir(&dir).ok()?;
    fn walk(v: &serde_norway::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_norway::Value::Mapping(m) => {
                for (k, v) in m {
                    if k.as_str() == Some("record") {
                        if let Some(name) = v.as_str() {
                            out.insert(name.to_owned());
                        }
                    } else {
                        walk(v, out);
                    }
                }
            }
            serde_norway::Value::Sequence(s) => s.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if !p.extension().is_some_and(|x| x == "yml" || x == "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).expect("read rule file");
        if let Ok(v) = serde_norway::from_str::<serde_norway::Value>(&text) {
            walk(&v, &mut out);
        }
    }
    Some(out)
}
