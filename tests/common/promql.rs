//! PromQL helpers shared by the dashboard, rule and end-to-end tests: load the Grafana
//! dashboards, expand their template variables the way Grafana would, and list the metric
//! names a query reads, with a small tokenizer (strings, label matchers, ranges, function
//! names and keywords are not metric names).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

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

/// Replace Grafana variables in `expr`: `$__rate_interval`, `$__range`, `$__interval` (and their
/// `_s`/`_ms` forms) by fixed values, and `$x`, `${x}`, `${x:format}`, `[[x]]` by `vars[x]`.
/// A `$name` that is neither built in nor in `vars` is left as it is, as Grafana does (so a
/// `$1` in a `label_replace` replacement survives).
pub fn expand(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let builtin = |name: &str| -> Option<&'static str> {
        Some(match name {
            "__rate_interval" => RATE_INTERVAL,
            "__range" => RANGE,
            "__interval" => INTERVAL,
            "__range_s" => "3600",
            "__range_ms" => "3600000",
            "__interval_ms" => "15000",
            "__rate_interval_ms" => "60000",
            _ => return None,
        })
    };
    let lookup = |name: &str| -> Option<String> {
        builtin(name)
            .map(str::to_owned)
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
// Tokenizer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    Ident(String),
    Number(String),
    Str(String),
    /// The inside of `{...}`: label matchers.
    Matchers(String),
    /// The inside of `[...]`: a range or a subquery `range:step`.
    Range(String),
    /// A Grafana variable outside strings and brackets: `$x`, `${x}`, `[[x]]`.
    Var(String),
    LParen,
    RParen,
    Comma,
    Op(String),
}

const KEYWORDS: [&str; 11] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
];

const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Split a PromQL expression into tokens.
pub fn tokenize(expr: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |i: usize, what: &str| format!("{what} at offset {i} in `{expr}`");
    // Reads a quoted string starting at `start` (the quote); returns the index after it.
    let read_string = |start: usize| -> Result<(String, usize), String> {
        let quote = chars[start];
        let mut j = start + 1;
        let mut s = String::new();
        while j < chars.len() {
            let c = chars[j];
            if c == '\\' && quote != '`' {
                if let Some(&n) = chars.get(j + 1) {
                    s.push(n);
                }
                j += 2;
                continue;
            }
            if c == quote {
                return Ok((s, j + 1));
            }
            s.push(c);
            j += 1;
        }
        Err(err(start, "unterminated string"))
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '"' | '\'' | '`' => {
                let (s, next) = read_string(i)?;
                out.push(Token::Str(s));
                i = next;
            }
            '{' => {
                let mut j = i + 1;
                let mut inner = String::new();
                loop {
                    match chars.get(j) {
                        None => return Err(err(i, "unclosed `{`")),
                        Some('}') => break,
                        Some('"' | '\'' | '`') => {
                            let (_, next) = read_string(j)?;
                            inner.extend(&chars[j..next]);
                            j = next;
                        }
                        Some(&ch) => {
                            inner.push(ch);
                            j += 1;
                        }
                    }
                }
                out.push(Token::Matchers(inner));
                i = j + 1;
            }
            '[' if chars.get(i + 1) == Some(&'[') => {
                let rest: String = chars[i + 2..].iter().collect();
                let end = rest.find("]]").ok_or_else(|| err(i, "unclosed `[[`"))?;
                out.push(Token::Var(rest[..end].to_owned()));
                i += 2 + rest[..end].chars().count() + 2;
            }
            '[' => {
                let rest: String = chars[i + 1..].iter().collect();
                let end = rest.find(']').ok_or_else(|| err(i, "unclosed `[`"))?;
                out.push(Token::Range(rest[..end].trim().to_owned()));
                i += 1 + rest[..end].chars().count() + 1;
            }
            '$' => {
                if chars.get(i + 1) == Some(&'{') {
                    let rest: String = chars[i + 2..].iter().collect();
                    let end = rest.find('}').ok_or_else(|| err(i, "unclosed `${`"))?;
                    out.push(Token::Var(rest[..end].to_owned()));
                    i += 2 + rest[..end].chars().count() + 1;
                } else {
                    let mut j = i + 1;
                    while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                        j += 1;
                    }
                    if j == i + 1 {
                        return Err(err(i, "lone `$`"));
                    }
                    out.push(Token::Var(chars[i + 1..j].iter().collect()));
                    i = j;
                }
            }
            '(' => {
                out.push(Token::LParen);
                i += 1;
            }
            ')' => {
                out.push(Token::RParen);
                i += 1;
            }
            ',' => {
                out.push(Token::Comma);
                i += 1;
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit())) =>
            {
                // Numbers, hex, exponents (`1e-3`) and durations (`1h30m`).
                let mut j = i;
                while j < chars.len() {
                    let ch = chars[j];
                    let exponent_sign = (ch == '+' || ch == '-')
                        && matches!(chars[j - 1], 'e' | 'E')
                        && chars[i..j - 1]
                            .iter()
                            .all(|c| c.is_ascii_digit() || *c == '.');
                    if ch.is_ascii_alphanumeric() || ch == '.' || exponent_sign {
                        j += 1;
                    } else {
                        break;
                    }
                }
                out.push(Token::Number(chars[i..j].iter().collect()));
                i = j;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut j = i;
                while j < chars.len()
                    && (chars[j].is_ascii_alphanumeric() || chars[j] == '_' || chars[j] == ':')
                {
                    j += 1;
                }
                out.push(Token::Ident(chars[i..j].iter().collect()));
                i = j;
            }
            '+' | '-' | '*' | '/' | '%' | '^' | '=' | '!' | '<' | '>' | '~' | '@' => {
                let mut j = i;
                while j < chars.len() && "+-*/%^=!<>~@".contains(chars[j]) {
                    // `a>-1`: an operator followed by a sign is two tokens.
                    if j > i && (chars[j] == '-' || chars[j] == '+') {
                        break;
                    }
                    j += 1;
                }
                out.push(Token::Op(chars[i..j].iter().collect()));
                i = j;
            }
            other => return Err(err(i, &format!("unexpected `{other}`"))),
        }
    }
    Ok(out)
}

/// A metric read by a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    pub name: String,
    /// The label matchers, as written (without the braces).
    pub matchers: String,
    /// The range if the selector is a range vector (`name{..}[range]`).
    pub range: Option<String>,
    /// The function or aggregation whose parentheses directly enclose it (`""` for plain
    /// parentheses, `None` at the top level).
    pub enclosing: Option<String>,
}

/// Every metric selector in a PromQL expression.
pub fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let tokens = tokenize(expr)?;
    let mut out = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut pending: Option<String> = None;
    let mut i = 0;
    let next_is_paren = |k: usize| tokens.get(k) == Some(&Token::LParen);
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(s) => {
                let lower = s.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    // A label list follows (optional for group_left/group_right).
                    i += 1;
                    if next_is_paren(i) {
                        let mut depth = 0;
                        while i < tokens.len() {
                            match tokens[i] {
                                Token::LParen => depth += 1,
                                Token::RParen => {
                                    depth -= 1;
                                    if depth == 0 {
                                        break;
                                    }
                                }
                                _ => {}
                            }
                            i += 1;
                        }
                        i += 1;
                    }
                    continue;
                }
                if lower == "offset" {
                    i += 1;
                    if matches!(tokens.get(i), Some(Token::Op(o)) if o == "-") {
                        i += 1;
                    }
                    i += 1; // the duration
                    continue;
                }
                if KEYWORDS.contains(&lower.as_str())
                    || lower == "atan2"
                    || lower == "inf"
                    || lower == "nan"
                {
                    i += 1;
                    continue;
                }
                let by_follows = matches!(tokens.get(i + 1), Some(Token::Ident(k))
                    if k.eq_ignore_ascii_case("by") || k.eq_ignore_ascii_case("without"));
                if next_is_paren(i + 1) || (AGGREGATIONS.contains(&lower.as_str()) && by_follows) {
                    pending = Some(s.clone());
                    i += 1;
                    continue;
                }
                // A metric name, maybe with matchers and a range.
                let mut sel = Selector {
                    name: s.clone(),
                    matchers: String::new(),
                    range: None,
                    enclosing: stack.last().cloned(),
                };
                i += 1;
                if let Some(Token::Matchers(m)) = tokens.get(i) {
                    sel.matchers = m.clone();
                    i += 1;
                }
                if let Some(Token::Range(r)) = tokens.get(i) {
                    sel.range = Some(r.clone());
                    i += 1;
                }
                out.push(sel);
                continue;
            }
            Token::Matchers(m) => {
                // `{__name__="x"}` without a name in front.
                let name = m
                    .split(',')
                    .find_map(|p| {
                        let (k, v) = p.split_once('=')?;
                        (k.trim() == "__name__").then(|| v.trim().trim_matches('"').to_owned())
                    })
                    .ok_or_else(|| format!("selector without a metric name in `{expr}`"))?;
                out.push(Selector {
                    name,
                    matchers: m.clone(),
                    range: match tokens.get(i + 1) {
                        Some(Token::Range(r)) => Some(r.clone()),
                        _ => None,
                    },
                    enclosing: stack.last().cloned(),
                });
            }
            Token::LParen => stack.push(pending.take().unwrap_or_default()),
            Token::RParen => {
                stack
                    .pop()
                    .ok_or_else(|| format!("unbalanced `)` in `{expr}`"))?;
            }
            _ => {}
        }
        i += 1;
    }
    if !stack.is_empty() {
        return Err(format!("unbalanced `(` in `{expr}`"));
    }
    Ok(out)
}

/// The metric names a PromQL expression reads.
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    Ok(selectors(expr)?.into_iter().map(|s| s.name).collect())
}

/// Every range written in the expression: `[5m]`, and both parts of a subquery `[1h:1m]`.
pub fn ranges(expr: &str) -> Result<Vec<String>, String> {
    Ok(tokenize(expr)?
        .into_iter()
        .filter_map(|t| match t {
            Token::Range(r) => Some(r),
            _ => None,
        })
        .collect())
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
