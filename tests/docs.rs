//! Examples that cannot rot: every YAML, JSON and shell block in README.md and docs/*.md is
//! loaded by the program it is meant for, found by its fence language, not by a list.
//!
//! | block | checked by |
//! |---|---|
//! | exporter configuration | the real exporter, `demo --config FILE`, until it has started |
//! | web configuration (`tls_server_config`, `basic_auth_users`, ...) | the real exporter, `demo --web.config.file FILE` |
//! | price table (`models:`) | the real exporter, `demo --prices-file FILE` |
//! | Prometheus configuration, or a list of scrape jobs | `promtool check config --syntax-only` |
//! | rule groups (`groups:`), or a list of rules | `promtool check rules`; every recorded series an expression reads (`a:b:c`) is recorded in alerts/ or the block |
//! | Alertmanager configuration (`route:`, `receivers:`) | `amtool check-config` |
//! | compose (`services:`) | YAML; every service named exists in compose.yaml or has an image; every `./` mount exists |
//! | Kubernetes (`apiVersion:` and `kind:`) | YAML; every object has a name |
//! | CPA configuration (`usage-statistics-enabled:` ...) | YAML; statistics on |
//! | JSON | parsed |
//! | shell (`sh`, `bash`, `shell`) | `bash -n`; every exporter invocation parses (the real binary with `--help` appended); every `CPA_*` variable is one the exporter reads; every compose profile and service exists; every repository path exists |
//!
//! A block that is only part of a file (`...` in it, a lone key) is marked on the line before
//! its fence with `<!-- fragment -->` (a reason may follow: `<!-- fragment: one rule -->`) and
//! skipped, by name, in the test output. Files a block refers to that exist only on a real
//! host (`/run/secrets/...`, `tls/exporter.crt`) are replaced by stand-ins of the right kind in
//! a temporary directory: the block itself is loaded as written.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_norway::{Mapping, Value};

const FRAGMENT: &str = "<!-- fragment";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fenced code block of a Markdown file.
#[derive(Debug, Clone)]
struct Block {
    file: String,
    line: usize,
    lang: String,
    body: String,
    fragment: bool,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// README.md and every docs/*.md, sorted.
fn markdown_files() -> Vec<String> {
    let mut out = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| {
            format!(
                "docs/{}",
                p.file_name().unwrap_or_default().to_string_lossy()
            )
        })
        .collect();
    docs.sort();
    out.extend(docs);
    out
}

fn blocks_of(file: &str, text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String, String, bool, String)> = None;
    let mut previous = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        match &mut open {
            None if t.starts_with("```") => {
                let lang = t[3..].split_whitespace().next().unwrap_or_default();
                let indent = line.len() - t.len();
                let fragment = previous.trim_start().starts_with(FRAGMENT);
                open = Some((
                    i + 1,
                    lang.to_ascii_lowercase(),
                    String::new(),
                    fragment,
                    " ".repeat(indent),
                ));
            }
            Some((start, lang, body, fragment, indent)) => {
                if t.starts_with("```") && t.trim() == "```" {
                    out.push(Block {
                        file: file.to_owned(),
                        line: *start,
                        lang: lang.clone(),
                        body: body.clone(),
                        fragment: *fragment,
                    });
                    open = None;
                } else {
                    body.push_str(line.strip_prefix(indent.as_str()).unwrap_or(line));
                    body.push('\n');
                }
            }
            None => {}
        }
        if !line.trim().is_empty() {
            previous = line.to_owned();
        }
    }
    assert!(open.is_none(), "{file}: a code block is never closed");
    out
}

fn all_blocks() -> Vec<Block> {
    markdown_files()
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(root().join(f)).expect("markdown");
            blocks_of(f, &text)
        })
        .collect()
}

/// The blocks of the given languages, fragments reported and left out.
fn blocks(langs: &[&str]) -> Vec<Block> {
    all_blocks()
        .into_iter()
        .filter(|b| langs.contains(&b.lang.as_str()))
        .filter(|b| {
            if b.fragment {
                eprintln!("{}: a fragment, skipped", b.at());
            }
            !b.fragment
        })
        .collect()
}

fn fail(block: &Block, what: impl std::fmt::Display) -> ! {
    panic!(
        "{}: {what}\n(if this block is only part of a file, put `{FRAGMENT} -->` on the line \
         before its fence)\n{}",
        block.at(),
        block.body
    )
}

// ---------------------------------------------------------------------------------------------
// YAML
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
enum Kind {
    Exporter,
    WebConfig,
    Prices,
    Prometheus,
    ScrapeJobs,
    Rules,
    RuleList,
    Alertmanager,
    Compose,
    Kubernetes,
    Cpa,
}

fn kind(doc: &Value) -> Kind {
    if let Some(seq) = doc.as_sequence() {
        if !seq.is_empty() && seq.iter().all(|j| j["job_name"].is_string()) {
            return Kind::ScrapeJobs;
        }
        if !seq.is_empty()
            && seq
                .iter()
                .all(|r| r["record"].is_string() || r["alert"].is_string())
        {
            return Kind::RuleList;
        }
    }
    let has = |k: &str| doc.get(k).is_some();
    if has("apiVersion") && has("kind") {
        Kind::Kubernetes
    } else if has("services") {
        Kind::Compose
    } else if has("groups") {
        Kind::Rules
    } else if [
        "scrape_configs",
        "rule_files",
        "global",
        "alerting",
        "remote_write",
    ]
    .iter()
    .any(|k| has(k))
    {
        Kind::Prometheus
    } else if has("route") || has("receivers") {
        Kind::Alertmanager
    } else if [
        "tls_server_config",
        "http_server_config",
        "basic_auth_users",
        "bearer_token_file",
    ]
    .iter()
    .any(|k| has(k))
    {
        Kind::WebConfig
    } else if has("models") {
        Kind::Prices
    } else if [
        "usage-statistics-enabled",
        "remote-management",
        "api-keys",
        "auth-dir",
    ]
    .iter()
    .any(|k| has(k))
    {
        Kind::Cpa
    } else {
        // Anything else claims to be the exporter's own file, which names unknown keys.
        Kind::Exporter
    }
}

fn documents(block: &Block) -> Vec<Value> {
    serde_norway::Deserializer::from_str(&block.body)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| fail(block, format!("not YAML: {e}"))))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn every_yaml_block_loads_in_the_program_it_is_for() {
    let blocks = blocks(&["yaml", "yml"]);
    assert!(blocks.len() >= 5, "found only {} YAML blocks", blocks.len());
    let mut kinds = BTreeSet::new();
    for block in &blocks {
        let docs = documents(block);
        let Some(first) = docs.first() else {
            fail(block, "empty");
        };
        let kind = kind(first);
        eprintln!("{}: {kind:?}", block.at());
        match kind {
            Kind::Exporter => run_exporter_with(block, first, "--config", "config.yml"),
            Kind::WebConfig => run_exporter_with(block, first, "--web.config.file", "web.yml"),
            Kind::Prices => run_exporter_with(block, first, "--prices-file", "prices.yml"),
            Kind::Prometheus => promtool_config(block, &block.body),
            Kind::ScrapeJobs => {
                let wrapped = Mapping::from_iter([("scrape_configs".into(), first.clone())]);
                promtool_config(block, &serde_norway::to_string(&wrapped).expect("YAML"));
            }
            Kind::Rules => rules(block, first.clone()),
            Kind::RuleList => {
                let group = Mapping::from_iter([
                    ("name".into(), "example".into()),
                    ("rules".into(), first.clone()),
                ]);
                let groups = Mapping::from_iter([(
                    "groups".into(),
                    Value::Sequence(vec![Value::Mapping(group)]),
                )]);
                rules(block, Value::Mapping(groups));
            }
            Kind::Alertmanager => tool(block, "amtool", &["check-config"], &block.body),
            Kind::Compose => compose(block, first),
            Kind::Kubernetes => {
                for doc in &docs {
                    if !doc["metadata"]["name"].is_string() {
                        fail(block, "a Kubernetes object without metadata.name");
                    }
                }
            }
            Kind::Cpa => {
                if first["usage-statistics-enabled"] != true {
                    fail(
                        block,
                        "a CPA configuration without usage-statistics-enabled: true",
                    );
                }
            }
        }
        kinds.insert(format!("{kind:?}"));
    }
    // The loaders above are really used: the docs have these kinds today.
    for k in ["Exporter", "WebConfig", "Prometheus"] {
        assert!(kinds.contains(k), "no {k} block found: {kinds:?}");
    }
}

/// Run `demo` with the block as the file of `flag`, until the exporter says it started.
fn run_exporter_with(block: &Block, doc: &Value, flag: &str, name: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let doc = with_stand_ins(doc.clone(), dir.path());
    let file = dir.path().join(name);
    let text = if doc == documents(block)[0] {
        block.body.clone()
    } else {
        serde_norway::to_string(&doc).expect("YAML")
    };
    std::fs::write(&file, text).expect("write");
    let log = dir.path().join("exporter.log");
    let mut child = Command::new(common::BIN)
        .arg("demo")
        .arg(flag)
        .arg(&file)
        .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
        .arg("--db")
        .arg(dir.path().join("state.db"))
        .env_clear()
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn the exporter");
    let deadline = Instant::now() + Duration::from_secs(20);
    let outcome = loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if said.contains(" started") {
            break Ok(());
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Err(format!("{flag}: the exporter exited ({status}):\n{said}"));
        }
        if Instant::now() > deadline {
            break Err(format!("{flag}: the exporter did not start:\n{said}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = outcome {
        fail(block, e);
    }
}

/// Keys whose value is a file the exporter reads, with stand-in content for a missing one.
fn stand_in(key: &str, dir: &Path) -> Option<String> {
    let (cert, key_pem) = certificate(dir);
    match key {
        "management-key-file" | "bearer_token_file" => Some("stand-in-secret\n".to_owned()),
        "prices-file" => Some("models:\n  stand-in: { input: 1, output: 2 }\n".to_owned()),
        "web-config-file" => Some("http_server_config: {}\n".to_owned()),
        "cert_file" | "client_ca_file" => Some(cert),
        "key_file" => Some(key_pem),
        _ => None,
    }
}

/// One self-signed certificate per directory, so a certificate and its key match.
fn certificate(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("stand-in.crt"), dir.join("stand-in.key"));
    if !cert.exists() {
        let ck =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        std::fs::write(&cert, ck.cert.pem()).expect("write");
        std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write");
    }
    (
        std::fs::read_to_string(cert).expect("cert"),
        std::fs::read_to_string(key).expect("key"),
    )
}

/// Point every file setting whose file does not exist here at a stand-in in `dir`.
fn with_stand_ins(mut doc: Value, dir: &Path) -> Value {
    fn walk(v: &mut Value, dir: &Path, n: &mut usize) {
        let Some(map) = v.as_mapping_mut() else {
            return;
        };
        for (k, v) in map.iter_mut() {
            let key = k.as_str().unwrap_or_default();
            if let (Some(path), Some(content)) = (v.as_str(), stand_in(key, dir)) {
                let resolved = dir.join(path);
                if !resolved.exists() && !Path::new(path).exists() {
                    *n += 1;
                    let file = dir.join(format!("stand-in-{n}"));
                    std::fs::write(&file, content).expect("stand-in");
                    *v = Value::String(file.to_string_lossy().into_owned());
                }
            } else {
                walk(v, dir, n);
            }
        }
    }
    let mut n = 0;
    walk(&mut doc, dir, &mut n);
    doc
}

fn promtool_config(block: &Block, text: &str) {
    tool(
        block,
        "promtool",
        &["check", "config", "--syntax-only"],
        text,
    );
}

/// Run `program args... FILE` on the text; it must succeed.
fn tool(block: &Block, program: &str, args: &[&str], text: &str) {
    if !common::have(program) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("example.yml");
    std::fs::write(&file, text).expect("write");
    let out = Command::new(program)
        .args(args)
        .arg(&file)
        .output()
        .expect("run");
    if !out.status.success() {
        fail(
            block,
            format!(
                "{program} {}:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
    }
}

/// promtool on the rule groups, and every recorded series they read recorded somewhere.
fn rules(block: &Block, groups: Value) {
    tool(
        block,
        "promtool",
        &["check", "rules"],
        &serde_norway::to_string(&groups).expect("YAML"),
    );
    let mut recorded = shipped_recording_rules();
    let mut read = BTreeSet::new();
    for group in groups["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            if let Some(name) = rule["record"].as_str() {
                recorded.insert(name.to_owned());
            }
            read.extend(recorded_names(rule["expr"].as_str().unwrap_or_default()));
        }
    }
    let missing: Vec<&String> = read.difference(&recorded).collect();
    if !missing.is_empty() {
        fail(block, format!("reads series no rule records: {missing:?}"));
    }
}

/// Names with colons (recording rules) in a PromQL expression.
fn recorded_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.contains(':') && !t.ends_with(':'))
        .filter(|t| t.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
        .map(str::to_owned)
        .collect()
}

fn shipped_recording_rules() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(root().join("alerts")).expect("alerts/") {
        let path = entry.expect("entry").path();
        if !path.to_string_lossy().ends_with(".rules.yml") {
            continue;
        }
        let doc: Value =
            serde_norway::from_str(&std::fs::read_to_string(&path).expect("rules")).expect("YAML");
        for group in doc["groups"].as_sequence().into_iter().flatten() {
            for rule in group["rules"].as_sequence().into_iter().flatten() {
                if let Some(name) = rule["record"].as_str() {
                    out.insert(name.to_owned());
                }
            }
        }
    }
    out
}

fn compose_services() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("compose.yaml")).expect("compose.yaml");
    let doc: Value = serde_norway::from_str(&text).expect("compose.yaml");
    doc["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect()
}

fn compose_profiles() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("compose.yaml")).expect("compose.yaml");
    let doc: Value = serde_norway::from_str(&text).expect("compose.yaml");
    doc["services"]
        .as_mapping()
        .expect("services")
        .values()
        .flat_map(|s| s["profiles"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect()
}

fn compose(block: &Block, doc: &Value) {
    let known = compose_services();
    let Some(services) = doc["services"].as_mapping() else {
        fail(block, "`services` is not a mapping");
    };
    for (name, s) in services {
        let name = name.as_str().unwrap_or_default();
        if !(known.contains(name) || s["image"].is_string() || s["build"].is_string()) {
            fail(
                block,
                format!("service `{name}`: not in compose.yaml, and no image"),
            );
        }
        for v in s["volumes"].as_sequence().into_iter().flatten() {
            let src = v
                .as_str()
                .unwrap_or_default()
                .split(':')
                .next()
                .unwrap_or("");
            if src.starts_with("./") && !root().join(src).exists() {
                fail(block, format!("`{src}` does not exist"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------

#[test]
fn every_json_block_parses() {
    for block in blocks(&["json"]) {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&block.body) {
            fail(&block, format!("not JSON: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shell
// ---------------------------------------------------------------------------------------------

/// The commands of a script: continuation lines joined, comments dropped, split at `&&`, `||`,
/// `;` and `|`, each as words.
fn commands(script: &str) -> Vec<Vec<String>> {
    let joined = script.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let line = match line.find(" #") {
            Some(i) => &line[..i],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        for part in line.split("&&").flat_map(|p| p.split("||")) {
            for cmd in part.split(';').flat_map(|p| p.split('|')) {
                let words: Vec<String> = cmd
                    .split_whitespace()
                    .map(|w| w.trim_matches(|c| c == '(' || c == ')').to_owned())
                    .filter(|w| !w.is_empty())
                    .collect();
                if !words.is_empty() {
                    out.push(words);
                }
            }
        }
    }
    out
}

/// The `[env: NAME` variables and the output of `--help`.
fn exporter_variables() -> BTreeSet<String> {
    let out = Command::new(common::BIN)
        .arg("--help")
        .env_clear()
        .output()
        .expect("--help");
    String::from_utf8_lossy(&out.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next().map(str::to_owned))
        .collect()
}

const REPO_PATHS: [&str; 8] = [
    "deploy/",
    "alerts/",
    "dashboards/",
    "docs/",
    ".ci/",
    ".env.example",
    "compose.yaml",
    "Dockerfile",
];

#[test]
fn every_shell_block_is_valid_and_names_real_flags_profiles_and_files() {
    let blocks = blocks(&["sh", "bash", "shell"]);
    assert!(
        blocks.len() >= 3,
        "found only {} shell blocks",
        blocks.len()
    );
    let variables = exporter_variables();
    let (services, profiles) = (compose_services(), compose_profiles());
    for block in &blocks {
        let out = Command::new("bash")
            .args(["-n", "-c", &block.body])
            .output()
            .expect("bash");
        if !out.status.success() {
            fail(block, String::from_utf8_lossy(&out.stderr));
        }
        for words in commands(&block.body) {
            check_command(block, &words, &variables, &services, &profiles);
        }
    }
}

fn check_command(
    block: &Block,
    words: &[String],
    variables: &BTreeSet<String>,
    services: &BTreeSet<String>,
    profiles: &BTreeSet<String>,
) {
    // Leading NAME=value assignments: the exporter's variables must be real.
    let mut rest = words;
    while let Some((w, tail)) = rest.split_first() {
        let Some((name, _)) = w.split_once('=') else {
            break;
        };
        if !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            break;
        }
        if name.starts_with("CPA_") && !variables.contains(name) {
            fail(
                block,
                format!("`{name}` is not a variable the exporter reads"),
            );
        }
        rest = tail;
    }
    for w in rest {
        let path = w.trim_matches(|c| c == '"' || c == '\'');
        if REPO_PATHS.iter().any(|p| path.starts_with(p))
            && !path.contains(['*', '$', '<'])
            && !root().join(path).exists()
        {
            fail(block, format!("`{path}` does not exist in the repository"));
        }
    }
    let Some((program, args)) = rest.split_first() else {
        return;
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if program.rsplit('/').next() == Some(env!("CARGO_PKG_NAME")) {
        exporter_args_parse(block, &args);
    } else if program == "cargo" && args.first() == Some(&"run") {
        if let Some(i) = args.iter().position(|a| *a == "--") {
            exporter_args_parse(block, &args[i + 1..]);
        }
    } else if program == "docker" && args.first() == Some(&"compose") {
        for pair in args.windows(2) {
            if pair[0] == "--profile" && !profiles.contains(pair[1]) {
                fail(block, format!("compose has no profile `{}`", pair[1]));
            }
        }
        // `docker compose [options] run|stop|start|logs|restart [options] SERVICE`
        if let Some(i) = args
            .iter()
            .position(|a| ["run", "stop", "start", "logs", "restart"].contains(a))
        {
            if let Some(service) = args[i + 1..].iter().find(|a| !a.starts_with('-')) {
                if !services.contains(*service) {
                    fail(block, format!("compose has no service `{service}`"));
                }
            }
        }
    }
}

/// The exporter accepts these arguments: its parser, with `--help` appended, exits 0 only when
/// every subcommand and flag before it is known.
fn exporter_args_parse(block: &Block, args: &[&str]) {
    let args: Vec<&str> = args
        .iter()
        .take_while(|a| !a.starts_with('>') && !a.starts_with('<') && **a != "&")
        .copied()
        .collect();
    let out = Command::new(common::BIN)
        .args(&args)
        .arg("--help")
        .env_clear()
        .output()
        .expect("exporter");
    if !out.status.success() {
        fail(
            block,
            format!(
                "`cpa-usage-exporter {}` does not parse:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The checks themselves
// ---------------------------------------------------------------------------------------------

#[test]
fn blocks_are_found_by_fence_and_fragments_are_marked_on_the_line_before() {
    let text =
        "intro\n\n<!-- fragment: one key -->\n```yaml\nexpr: x\n```\n\n  ```sh\n  ls\n  ```\n";
    let b = blocks_of("x.md", text);
    assert_eq!(b.len(), 2);
    assert!(b[0].fragment && b[0].lang == "yaml" && b[0].body == "expr: x\n");
    assert!(!b[1].fragment && b[1].lang == "sh" && b[1].body == "ls\n");
    assert_eq!(
        commands("A=1 cpa-usage-exporter check \\\n  --db x  # comment\nls && cat y | wc"),
        vec![
            vec!["A=1", "cpa-usage-exporter", "check", "--db", "x"],
            vec!["ls"],
            vec!["cat", "y"],
            vec!["wc"],
        ]
    );
}

#[test]
fn a_broken_example_is_caught() {
    let block = |body: &str| Block {
        file: "x.md".into(),
        line: 1,
        lang: "yaml".into(),
        body: body.into(),
        fragment: false,
    };
    // The mis-indented file of issue 15 does not parse.
    let bad = block("labels:\n  drop: [endpoint]\n    api-key-aliases:\n    a: b\n");
    assert!(std::panic::catch_unwind(|| documents(&bad)).is_err());
    // An unknown setting is refused by the exporter itself.
    let unknown = block("batchsize: 10\n");
    let doc = documents(&unknown)[0].clone();
    assert_eq!(kind(&doc), Kind::Exporter);
    let caught = std::panic::catch_unwind(|| {
        run_exporter_with(&unknown, &doc, "--config", "config.yml");
    });
    assert!(caught.is_err());
    // A flag that does not exist.
    let sh = Block {
        lang: "sh".into(),
        ..block("cpa-usage-exporter --no-such-flag\n")
    };
    let caught = std::panic::catch_unwind(|| exporter_args_parse(&sh, &["--no-such-flag"]));
    assert!(caught.is_err());
}
