//! The deployment files, checked statically, because no container engine or cluster runs in CI:
//! `compose.yaml` with `.env.example`, `deploy/prometheus/prometheus.yml` and `deploy/cpa/`, the
//! `Dockerfile` with `.dockerignore`, and `deploy/kubernetes/`. The running stack itself is
//! exercised by `tests/e2e.rs` with real Prometheus and Alertmanager processes.
//!
//! Two Kubernetes files are generated: `deploy/kubernetes/prometheus-rule.yaml` from
//! `alerts/*.rules.yml` and `deploy/kubernetes/grafana-dashboards.yaml` from
//! `dashboards/*.json`. The tests below regenerate them in memory and fail when the files in the
//! repository differ; `CPA_REGENERATE=1 cargo test --test stack` writes them instead.

mod common;

use common::have;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_norway::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_norway::from_str(&text(path)).unwrap_or_else(|e| panic!("{path}: not YAML: {e}"))
}

/// Every document of a multi-document YAML file.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = text(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| str_of(x).to_owned()).collect())
        .unwrap_or_default()
}

/// Files in `dir` (relative to the repository root) whose names end with `suffix`, sorted.
fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------------
// compose.yaml
// ---------------------------------------------------------------------------------------------

/// Compose's `${NAME:-default}` interpolation with an empty environment: the default, or `None`
/// for a variable without one (`${NAME}`, `${NAME:?error}`).
fn interpolate(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')? + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map(|(_, d)| d)?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// Names of the variables a text interpolates (`${NAME...}`).
fn variables(s: &str) -> BTreeSet<String> {
    s.split("${")
        .skip(1)
        .filter_map(|part| {
            let end = part.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            Some(part[..end].to_owned())
        })
        .collect()
}

struct Compose {
    services: BTreeMap<String, Value>,
}

impl Compose {
    fn load() -> Compose {
        let doc = yaml("compose.yaml");
        let services = doc["services"]
            .as_mapping()
            .expect("compose.yaml has services")
            .iter()
            .map(|(k, v)| (str_of(k).to_owned(), v.clone()))
            .collect();
        Compose { services }
    }

    fn service(&self, name: &str) -> &Value {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("compose.yaml has no service `{name}`"))
    }

    /// The services `docker compose --profile <profile> up` starts: those without profiles
    /// and those of the profile.
    fn active(&self, profile: &str) -> Vec<&str> {
        self.services
            .iter()
            .filter(|(_, s)| {
                let profiles = strings(&s["profiles"]);
                profiles.is_empty() || profiles.iter().any(|p| p == profile)
            })
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Every profile named by a service.
    fn profiles(&self) -> BTreeSet<String> {
        self.services
            .values()
            .flat_map(|s| strings(&s["profiles"]))
            .collect()
    }

    /// The names a service answers to on the compose network: its name and its aliases.
    fn hostnames(&self, service: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::from([service.to_owned()]);
        if let Some(networks) = self.service(service)["networks"].as_mapping() {
            for (_, net) in networks {
                out.extend(strings(&net["aliases"]));
            }
        }
        out
    }

    /// The container ports a service publishes or exposes.
    fn container_ports(&self, service: &str) -> BTreeSet<u16> {
        let s = self.service(service);
        let mut out = BTreeSet::new();
        for p in strings(&s["ports"]).iter().chain(&strings(&s["expose"])) {
            let container = split_colons(p).pop().unwrap_or_default();
            let container = container.split('/').next().unwrap_or_default();
            out.insert(
                container
                    .parse()
                    .unwrap_or_else(|_| panic!("{service}: port `{p}`")),
            );
        }
        out
    }

    /// The one active service of `profile` that answers to `host`.
    fn resolve(&self, profile: &str, host: &str) -> &str {
        let matches: Vec<&str> = self
            .active(profile)
            .into_iter()
            .filter(|s| self.hostnames(s).contains(host))
            .collect();
        assert_eq!(
            matches.len(),
            1,
            "with --profile {profile}, `{host}` must name exactly one service, not {matches:?}"
        );
        matches[0]
    }

    /// Bind mounts as (service, host path as written, container path).
    fn bind_mounts(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for (name, s) in &self.services {
            for v in strings(&s["volumes"]) {
                let parts = split_colons(&v);
                let (Some(src), Some(dst)) = (parts.first(), parts.get(1)) else {
                    panic!("{name}: volume `{v}` has no target");
                };
                // Named volumes have no path; a bind mount starts with `.`, `/` or `${`.
                if src.starts_with('.') || src.starts_with('/') || src.starts_with("${") {
                    out.push((name.clone(), src.clone(), dst.clone()));
                }
            }
        }
        out
    }

    /// The host path under which a container path of `service` is bind-mounted.
    fn host_path(&self, service: &str, container_path: &str) -> Option<PathBuf> {
        self.bind_mounts()
            .into_iter()
            .filter(|(s, _, _)| s == service)
            .find_map(|(_, src, dst)| {
                let rest = container_path.strip_prefix(dst.as_str())?;
                if !(rest.is_empty() || rest.starts_with('/')) {
                    return None;
                }
                let src = interpolate(&src)?;
                Some(root().join(src).join(rest.trim_start_matches('/')))
            })
    }
}

/// Split a compose `a:b:c` string at the colons outside `${...}`.
fn split_colons(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut depth = 0;
    let mut prev = ' ';
    for c in s.chars() {
        match c {
            '{' if prev == '$' => depth += 1,
            '}' if depth > 0 => depth -= 1,
            ':' if depth == 0 => {
                out.push(String::new());
                prev = c;
                continue;
            }
            _ => {}
        }
        out.last_mut().expect("a part").push(c);
        prev = c;
    }
    out
}

/// `64m`, `1g`, `512Mi`... in MiB.
fn mebibytes(limit: &str) -> f64 {
    let limit = limit.trim().to_ascii_lowercase();
    let digits = limit
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(limit.len());
    let n: f64 = limit[..digits].parse().expect("a number");
    match limit[digits..].trim_end_matches(['b', 'i']) {
        "" => n / 1_048_576.0,
        "k" => n / 1024.0,
        "m" => n,
        "g" => n * 1024.0,
        other => panic!("unknown unit `{other}` in `{limit}`"),
    }
}

/// host:port from a target or URL (`exporter:9317`, `http://prometheus:9090`).
fn host_port(target: &str) -> (String, u16) {
    let t = target.split("://").last().unwrap_or_default();
    let t = t.split('/').next().unwrap_or_default();
    let (host, port) = t
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("`{target}` has no port"));
    (host.to_owned(), port.parse().expect("port"))
}

/// Every `job="..."` the alert rules name.
fn rule_jobs() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for f in files("alerts", ".rules.yml") {
        let t = std::fs::read_to_string(&f).expect("rules");
        for part in t.split("job=\"").skip(1) {
            out.insert(part.split('"').next().unwrap_or_default().to_owned());
        }
    }
    out
}

#[test]
fn compose_is_valid_yaml_with_the_whole_stack() {
    let c = Compose::load();
    for name in [
        "cpa",
        "exporter",
        "exporter-existing",
        "exporter-demo",
        "prometheus",
        "alertmanager",
        "grafana",
    ] {
        let s = c.service(name);
        assert!(
            s["image"].is_string() || s["build"].is_string(),
            "{name}: neither image nor build"
        );
    }
    assert_eq!(
        c.profiles(),
        BTreeSet::from(["cpa".to_owned(), EXISTING_CPA.to_owned(), "demo".to_owned()])
    );
}

#[test]
fn every_file_compose_mounts_exists() {
    let c = Compose::load();
    let mounts = c.bind_mounts();
    assert!(mounts.len() >= 8, "{mounts:?}");
    for (service, src, dst) in mounts {
        let path = interpolate(&src)
            .unwrap_or_else(|| panic!("{service}: `{src}` needs a default (`${{VAR:-path}}`)"));
        assert!(
            root().join(&path).exists(),
            "{service}: `{path}` (mounted on {dst}) does not exist"
        );
    }
    for (name, s) in &c.services {
        if let Some(context) = s["build"].as_str() {
            assert!(
                root().join(context).join("Dockerfile").is_file(),
                "{name}: no Dockerfile in build context `{context}`"
            );
        }
    }
}

#[test]
fn prometheus_targets_are_compose_services_on_their_ports() {
    let c = Compose::load();
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let mut targets = Vec::new();
    for job in prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
    {
        for sc in job["static_configs"].as_sequence().into_iter().flatten() {
            for t in strings(&sc["targets"]) {
                targets.push((str_of(&job["job_name"]).to_owned(), t));
            }
        }
    }
    for am in prom["alerting"]["alertmanagers"]
        .as_sequence()
        .expect("alertmanagers")
    {
        for sc in am["static_configs"].as_sequence().into_iter().flatten() {
            for t in strings(&sc["targets"]) {
                targets.push(("alerting".to_owned(), t));
            }
        }
    }
    let datasource = yaml("dashboards/provisioning/datasources/prometheus.yaml");
    let grafana_url = str_of(&datasource["datasources"][0]["url"]).to_owned();
    targets.push(("grafana data source".to_owned(), grafana_url));

    for profile in c.profiles() {
        for (job, target) in &targets {
            let (host, port) = host_port(target);
            // Prometheus scrapes itself on localhost.
            let service = if host == "localhost" {
                "prometheus"
            } else {
                c.resolve(&profile, &host)
            };
            assert!(
                c.container_ports(service).contains(&port),
                "{job}: target {target} is service `{service}`, which does not publish port {port}"
            );
        }
    }
    // The exporter job reaches the exporter in both profiles.
    let exporter_job = targets
        .iter()
        .find(|(job, _)| job == "cpa-usage-exporter")
        .expect("a cpa-usage-exporter job");
    let (host, _) = host_port(&exporter_job.1);
    assert_eq!(c.resolve("cpa", &host), "exporter");
    assert_eq!(c.resolve(EXISTING_CPA, &host), "exporter-existing");
    assert_eq!(c.resolve("demo", &host), "exporter-demo");
}

#[test]
fn the_scrape_job_is_the_one_the_alert_rules_expect() {
    let jobs = rule_jobs();
    assert_eq!(
        jobs,
        BTreeSet::from(["cpa-usage-exporter".to_owned()]),
        "the rules name these jobs"
    );
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let names: BTreeSet<String> = prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .map(|j| str_of(&j["job_name"]).to_owned())
        .collect();
    assert!(jobs.is_subset(&names), "{jobs:?} not in {names:?}");
}

#[test]
fn prometheus_loads_every_rule_file_through_the_compose_mount() {
    let c = Compose::load();
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let mut loaded = BTreeSet::new();
    for pattern in strings(&prom["rule_files"]) {
        let (dir, glob) = pattern.rsplit_once('/').expect("a path");
        let host_dir = c
            .host_path("prometheus", dir)
            .unwrap_or_else(|| panic!("{dir} is not mounted into prometheus"));
        let (prefix, suffix) = glob.split_once('*').unwrap_or((glob, ""));
        for f in std::fs::read_dir(&host_dir).expect("rules dir") {
            let name = file_name(&f.expect("entry").path());
            if name.starts_with(prefix) && name.ends_with(suffix) {
                loaded.insert(name);
            }
        }
    }
    let shipped: BTreeSet<String> = files("alerts", ".rules.yml")
        .iter()
        .map(|p| file_name(p))
        .collect();
    assert_eq!(loaded, shipped);
    assert_eq!(
        c.host_path("alertmanager", "/etc/alertmanager/alertmanager.yml"),
        Some(root().join("./alerts/alertmanager.yml"))
    );
}

#[test]
fn the_scrape_interval_is_grafanas_time_interval() {
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let job = prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .find(|j| j["job_name"] == "cpa-usage-exporter")
        .expect("exporter job");
    let interval = job["scrape_interval"]
        .as_str()
        .unwrap_or_else(|| str_of(&prom["global"]["scrape_interval"]));
    let datasource = yaml("dashboards/provisioning/datasources/prometheus.yaml");
    assert_eq!(
        interval,
        str_of(&datasource["datasources"][0]["jsonData"]["timeInterval"]),
        "Grafana derives $__rate_interval from timeInterval"
    );
}

#[test]
fn promtool_accepts_the_prometheus_configuration() {
    if !have("promtool") {
        return;
    }
    let out = Command::new("promtool")
        .args([
            "check",
            "config",
            "--syntax-only",
            "deploy/prometheus/prometheus.yml",
        ])
        .current_dir(root())
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn memory_limits_fit_a_one_gigabyte_host() {
    let c = Compose::load();
    for (name, s) in &c.services {
        assert!(s["mem_limit"].is_string(), "{name} has no mem_limit");
    }
    for name in ["exporter", "exporter-existing", "exporter-demo"] {
        assert_eq!(mebibytes(str_of(&c.service(name)["mem_limit"])), 64.0);
    }
    let cpa = mebibytes(str_of(&c.service("cpa")["mem_limit"]));
    for profile in c.profiles() {
        let active = c.active(&profile);
        let mut total: f64 = active
            .iter()
            .map(|s| mebibytes(str_of(&c.service(s)["mem_limit"])))
            .sum();
        // Where CPA runs outside the stack it still runs beside it, on the same host: count
        // it with the limit this file gives it.
        if profile == EXISTING_CPA {
            assert!(!active.contains(&"cpa"));
            total += cpa;
        }
        // Leave at least 128 MiB of 1 GiB to the kernel, Docker and the page cache.
        assert!(total <= 896.0, "--profile {profile}: {total} MiB of limits");
    }
}

/// The profile that adds monitoring to a CPA that already runs.
const EXISTING_CPA: &str = "existing-cpa";

#[test]
fn the_existing_cpa_profile_monitors_the_cpa_named_in_the_env_file() {
    let c = Compose::load();
    let active = c.active(EXISTING_CPA);
    for absent in ["cpa", "exporter", "exporter-demo"] {
        assert!(!active.contains(&absent), "{absent} in {active:?}");
    }
    for present in ["exporter-existing", "prometheus", "alertmanager", "grafana"] {
        assert!(active.contains(&present), "{present} not in {active:?}");
    }
    let s = c.service("exporter-existing");
    // CPA's address and key come from .env, with a default that reaches this host.
    let url = str_of(&s["environment"]["CPA_URL"]);
    assert_eq!(variables(url), BTreeSet::from(["CPA_URL".to_owned()]));
    assert_eq!(
        interpolate(url).as_deref(),
        Some("http://host.docker.internal:8317")
    );
    assert!(strings(&s["extra_hosts"]).contains(&"host.docker.internal:host-gateway".to_owned()));
    assert_eq!(
        str_of(&s["environment"]["CPA_MANAGEMENT_KEY"]),
        "${CPA_MANAGEMENT_KEY:-}"
    );
    let example = text(".env.example");
    assert!(
        example.contains("\nCPA_URL=http://host.docker.internal:8317\n"),
        ".env.example must name CPA_URL with the same default"
    );
    // The same image, its own state: another CPA's counters never mix in.
    assert_eq!(s["build"], c.service("exporter")["build"]);
    assert_eq!(s["image"], c.service("exporter")["image"]);
    let state = |name: &str| -> BTreeSet<String> {
        strings(&c.service(name)["volumes"])
            .iter()
            .map(|v| v.split(':').next().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(state("exporter-existing").is_disjoint(&state("exporter")));
    assert!(state("exporter-existing").is_disjoint(&state("exporter-demo")));
}

#[test]
fn every_variable_compose_gives_the_exporter_is_one_it_reads() {
    let help = Command::new(common::BIN)
        .arg("--help")
        .env_clear()
        .output()
        .expect("--help");
    let help = String::from_utf8_lossy(&help.stdout);
    let c = Compose::load();
    for name in ["exporter", "exporter-existing", "exporter-demo"] {
        let env = c.service(name)["environment"].as_mapping().cloned();
        for (k, _) in env.iter().flatten() {
            let k = str_of(k);
            assert!(
                help.contains(&format!("[env: {k}")),
                "{name}: the exporter does not read {k}"
            );
        }
    }
}

#[test]
fn the_exporter_image_is_the_release_of_this_version() {
    let c = Compose::load();
    let want = format!(
        "ghcr.io/cpa-usage-exporter/cpa-usage-exporter:{}",
        env!("CARGO_PKG_VERSION")
    );
    for name in ["exporter", "exporter-existing", "exporter-demo"] {
        let s = c.service(name);
        assert_eq!(str_of(&s["image"]), want, "{name}");
        // Where the release cannot be pulled, compose builds the same image from source.
        assert_eq!(str_of(&s["build"]), ".", "{name}");
    }
    assert!(
        text("deploy/kubernetes/cpa.yaml").contains(&format!("image: {want}\n")),
        "deploy/kubernetes/cpa.yaml runs another exporter image than {want}"
    );
}

#[test]
fn the_demo_profile_runs_the_exporter_in_demo_mode_without_cpa() {
    let c = Compose::load();
    let demo = c.active("demo");
    assert!(!demo.contains(&"cpa"), "{demo:?}");
    assert!(!demo.contains(&"exporter"), "{demo:?}");
    let s = c.service("exporter-demo");
    assert_eq!(
        strings(&s["command"]).first().map(String::as_str),
        Some("demo")
    );
    assert_eq!(s["build"], c.service("exporter")["build"]);
    assert!(s["environment"]["CPA_MANAGEMENT_KEY"].is_null());
    // Every other service of the stack runs in both profiles.
    for other in ["prometheus", "alertmanager", "grafana"] {
        assert!(demo.contains(&other) && c.active("cpa").contains(&other));
    }
}

#[test]
fn cpa_and_the_exporter_share_the_key_from_the_env_file_and_nothing_else() {
    let c = Compose::load();
    let cpa = c.service("cpa");
    let exporter = c.service("exporter");
    assert_eq!(
        str_of(&cpa["environment"]["MANAGEMENT_PASSWORD"]),
        "${CPA_MANAGEMENT_KEY:-}"
    );
    assert_eq!(
        str_of(&exporter["environment"]["CPA_MANAGEMENT_KEY"]),
        "${CPA_MANAGEMENT_KEY:-}"
    );
    let (host, port) = host_port(str_of(&exporter["environment"]["CPA_URL"]));
    assert_eq!(c.resolve("cpa", &host), "cpa");
    assert!(c.container_ports("cpa").contains(&port));
    // No shared volumes, no shared namespaces.
    let vols = |s: &Value| -> BTreeSet<String> {
        strings(&s["volumes"])
            .iter()
            .map(|v| v.split(':').next().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(vols(cpa).is_disjoint(&vols(exporter)));
    assert!(exporter["network_mode"].is_null() && exporter["pid"].is_null());

    // CPA's mounted configuration turns usage statistics on and lets the exporter in.
    let config_src = c
        .bind_mounts()
        .into_iter()
        .find(|(s, _, dst)| s == "cpa" && dst == "/CLIProxyAPI/config.yaml")
        .map(|(_, src, _)| interpolate(&src).expect("default"))
        .expect("CPA's config is mounted");
    let config: Value = serde_norway::from_str(&text(&config_src)).expect("CPA's config is YAML");
    assert_eq!(config["usage-statistics-enabled"], true);
    assert_eq!(config["remote-management"]["allow-remote"], true);
    assert_eq!(config["remote-management"]["secret-key"], "");
    assert_eq!(config["port"].as_u64(), Some(u64::from(port)));
}

#[test]
fn images_are_pinned_and_ports_stay_on_the_configured_address() {
    let c = Compose::load();
    for (name, s) in &c.services {
        if let Some(image) = s["image"].as_str() {
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
            assert!(
                !tag.is_empty() && tag != "latest" && !tag.contains('/'),
                "{name}: `{image}` is not pinned"
            );
        }
        for p in strings(&s["ports"]) {
            assert!(
                p.starts_with("${BIND_ADDRESS:-127.0.0.1}:"),
                "{name}: port `{p}` does not bind to BIND_ADDRESS"
            );
        }
    }
}

#[test]
fn env_example_names_every_variable_compose_uses() {
    let used = variables(&text("compose.yaml"));
    let example = text(".env.example");
    let named: BTreeSet<String> = example
        .lines()
        .map(|l| l.trim_start_matches('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| !k.is_empty() && !k.contains(' '))
        .collect();
    let missing: Vec<&String> = used.difference(&named).collect();
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");
    assert!(used.contains("CPA_MANAGEMENT_KEY"));
}

// ---------------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------------

/// Dockerfile instructions (continuation lines joined, comments dropped) as (KEYWORD, rest).
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        current.push_str(t.trim_end_matches('\\'));
        current.push(' ');
        if !t.ends_with('\\') {
            let (k, rest) = current
                .trim()
                .split_once(' ')
                .unwrap_or((current.trim(), ""));
            out.push((k.to_ascii_uppercase(), rest.trim().to_owned()));
            current.clear();
        }
    }
    out
}

#[test]
fn the_image_is_multi_stage_non_root_with_a_volume_and_a_healthcheck() {
    let bin = env!("CARGO_PKG_NAME");
    let all = dockerfile();
    let stages: Vec<usize> = (0..all.len()).filter(|&i| all[i].0 == "FROM").collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    assert!(all[stages[0]].1.contains(" AS builder"));
    let runtime = &all[*stages.last().unwrap()..];
    let get = |k: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(kw, _)| kw == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let user = get("USER");
    assert_eq!(user.len(), 1, "one USER in the runtime stage");
    let uid = user[0].split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER {} must be a numeric non-root uid",
        user[0]
    );
    assert_eq!(get("EXPOSE"), ["9317"]);
    assert_eq!(get("VOLUME"), [r#"["/var/lib/cpa-usage-exporter"]"#]);
    let healthcheck = get("HEALTHCHECK").join(" ");
    assert!(
        healthcheck.contains(&format!(r#"CMD ["/usr/local/bin/{bin}", "healthcheck"]"#)),
        "{healthcheck}"
    );
    assert_eq!(get("ENTRYPOINT"), [format!(r#"["/usr/local/bin/{bin}"]"#)]);
    let build = all
        .iter()
        .find(|(k, v)| k == "RUN" && v.contains("cargo build"))
        .expect("a cargo build");
    assert!(build.1.contains("--release") && build.1.contains("--locked"));
    assert!(build.1.contains(&format!("--bin {bin}")));
}

#[test]
fn dockerignore_lets_in_exactly_what_the_build_copies() {
    let ignore = text(".dockerignore");
    let lines: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines.first(), Some(&"*"), "everything is excluded first");
    let allowed: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let mut copied = BTreeSet::new();
    for (k, v) in dockerfile() {
        if k == "COPY" && !v.contains("--from") {
            let parts: Vec<&str> = v.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                copied.insert(src.trim_end_matches('/').to_owned());
            }
        }
    }
    let copied: BTreeSet<&str> = copied.iter().map(String::as_str).collect();
    assert_eq!(copied, allowed);
    for p in &copied {
        assert!(root().join(p).exists(), "{p}");
    }
}

/// `1.88` -> (1, 88, 0).
fn version(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

#[test]
fn the_builder_rust_is_new_enough_for_the_locked_dependencies() {
    let arg = dockerfile()
        .into_iter()
        .find_map(|(k, v)| {
            (k == "ARG")
                .then(|| v.strip_prefix("RUST_VERSION=").map(str::to_owned))
                .flatten()
        })
        .expect("ARG RUST_VERSION=...");
    // The packages built for this host: the ones whose sources cargo has already fetched.
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc names its host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let needed = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| {
            p["rust_version"].as_str().map(|v| {
                (
                    version(v),
                    p["name"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
        .max()
        .expect("some rust-version");
    assert!(
        version(&arg) >= needed.0,
        "the Dockerfile builds with Rust {arg}, but {} needs {:?}",
        needed.1,
        needed.0
    );
}

#[test]
fn the_healthcheck_subcommand_reports_whether_the_exporter_answers() {
    let healthcheck = |port: u16| {
        Command::new(common::BIN)
            .arg("healthcheck")
            .env_clear()
            .env("CPA_EXPORTER_LISTEN", format!("0.0.0.0:{port}"))
            .output()
            .expect("run healthcheck")
    };
    let closed = common::free_port();
    let out = healthcheck(closed);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));

    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let mut demo = Command::new(common::BIN)
        .arg("demo")
        .env_clear()
        .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CPA_EXPORTER_DB", dir.path().join("demo.db"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn demo");
    let deadline = Instant::now() + Duration::from_secs(20);
    let healthy = loop {
        if healthcheck(port).status.success() {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = demo.kill();
    let _ = demo.wait();
    assert!(
        healthy,
        "healthcheck never succeeded against a running exporter"
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

const RULE_FILE: &str = "deploy/kubernetes/prometheus-rule.yaml";
const DASHBOARD_FILE: &str = "deploy/kubernetes/grafana-dashboards.yaml";
const REGENERATE: &str = "CPA_REGENERATE";

fn generated_header(from: &str) -> String {
    format!(
        "# GENERATED from {from} by tests/stack.rs: do not edit. Regenerate with\n\
         #   {REGENERATE}=1 cargo test --test stack\n"
    )
}

/// The PrometheusRule: the `groups` of every `alerts/*.rules.yml`, copied as text (comments
/// and block scalars kept) under `spec.groups`.
fn prometheus_rule() -> String {
    let mut out = generated_header("alerts/*.rules.yml");
    out.push_str(
        "apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n\
         \x20 name: cpa-usage-exporter\n\
         \x20 labels:\n\
         \x20   app.kubernetes.io/name: cpa-usage-exporter\n\
         \x20   # kube-prometheus-stack selects rules by its Helm release; kube-prometheus by these two.\n\
         \x20   release: kube-prometheus-stack\n\
         \x20   prometheus: k8s\n\
         \x20   role: alert-rules\n\
         spec:\n\
         \x20 groups:\n",
    );
    for f in files("alerts", ".rules.yml") {
        let t = std::fs::read_to_string(&f).expect("rules");
        let (_, body) = t
            .split_once("\ngroups:\n")
            .unwrap_or_else(|| panic!("{}: no top-level `groups:`", f.display()));
        out.push_str(&format!("    # alerts/{}\n", file_name(&f)));
        for line in body.lines() {
            if !line.is_empty() {
                out.push_str("  ");
                out.push_str(line);
            }
            out.push('\n');
        }
    }
    out
}

/// One ConfigMap per dashboard, labelled for the Grafana sidecar.
fn dashboard_configmaps() -> String {
    let mut out = generated_header("dashboards/*.json");
    for f in files("dashboards", ".json") {
        let json = std::fs::read_to_string(&f).expect("dashboard");
        let uid: serde_json::Value = serde_json::from_str(&json).expect("dashboard JSON");
        let uid = uid["uid"].as_str().expect("uid");
        assert!(!json.contains('\t'), "{}: tabs", f.display());
        let chomp = if json.ends_with('\n') { "|" } else { "|-" };
        out.push_str(&format!(
            "---\n\
             apiVersion: v1\n\
             kind: ConfigMap\n\
             metadata:\n\
             \x20 name: grafana-dashboard-{uid}\n\
             \x20 labels:\n\
             \x20   app.kubernetes.io/name: cpa-usage-exporter\n\
             \x20   grafana_dashboard: \"1\"\n\
             \x20 annotations:\n\
             \x20   # The folder, where the sidecar has folderAnnotation: grafana_folder.\n\
             \x20   grafana_folder: CPA\n\
             data:\n\
             \x20 {}: {chomp}\n",
            file_name(&f)
        ));
        for line in json.lines() {
            if !line.is_empty() {
                out.push_str("    ");
                out.push_str(line);
            }
            out.push('\n');
        }
    }
    out
}

/// Compare a generated file with the repository's copy, or write it under `CPA_REGENERATE`.
fn check_generated(path: &str, generated: &str) {
    let full = root().join(path);
    if std::env::var_os(REGENERATE).is_some() {
        std::fs::write(&full, generated).unwrap_or_else(|e| panic!("{path}: {e}"));
        eprintln!("wrote {path}");
        return;
    }
    let current = std::fs::read_to_string(&full).unwrap_or_default();
    assert!(
        current == generated,
        "{path} is out of date with its sources; run `{REGENERATE}=1 cargo test --test stack`"
    );
}

#[test]
fn the_prometheus_rule_carries_exactly_the_shipped_rules() {
    let generated = prometheus_rule();
    check_generated(RULE_FILE, &generated);
    let rule: Value = serde_norway::from_str(&generated).expect("generated YAML");
    let mut groups = Vec::new();
    for f in files("alerts", ".rules.yml") {
        let v: Value = serde_norway::from_str(&std::fs::read_to_string(&f).expect("rules"))
            .expect("rules YAML");
        groups.extend(v["groups"].as_sequence().expect("groups").iter().cloned());
    }
    assert_eq!(rule["spec"]["groups"].as_sequence(), Some(&groups));
    assert_eq!(rule["kind"], "PrometheusRule");
}

#[test]
fn the_dashboard_configmaps_carry_exactly_the_shipped_dashboards() {
    let generated = dashboard_configmaps();
    check_generated(DASHBOARD_FILE, &generated);
    let maps: Vec<Value> = serde_norway::Deserializer::from_str(&generated)
        .map(|d| Value::deserialize(d).expect("generated YAML"))
        .filter(|v| !v.is_null())
        .collect();
    let dashboards = files("dashboards", ".json");
    assert_eq!(maps.len(), dashboards.len());
    for (map, f) in maps.iter().zip(&dashboards) {
        assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
        let data = map["data"].as_mapping().expect("data");
        assert_eq!(data.len(), 1);
        let (key, value) = data.iter().next().expect("one entry");
        assert_eq!(str_of(key), file_name(f));
        let embedded: serde_json::Value = serde_json::from_str(str_of(value)).expect("JSON");
        let shipped: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(f).expect("dashboard")).expect("JSON");
        assert_eq!(embedded, shipped, "{}", file_name(f));
    }
}

/// Every Kubernetes object the kustomization applies, plus the Secret example.
fn kube_objects() -> Vec<Value> {
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let mut out = Vec::new();
    for r in strings(&kustomization["resources"]) {
        out.extend(yaml_documents(&format!("deploy/kubernetes/{r}")));
    }
    out
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &labels[str_of(k)] == v))
}

#[test]
fn kubernetes_runs_the_exporter_as_a_sidecar_on_localhost() {
    let objects = kube_objects();
    let deploy = find(&objects, "Deployment", "cpa");
    let pod = &deploy["spec"]["template"];
    let containers = pod["spec"]["containers"].as_sequence().expect("containers");
    let by_name = |n: &str| {
        containers
            .iter()
            .find(|c| c["name"] == n)
            .unwrap_or_else(|| panic!("no container {n}"))
    };
    let (cpa, exporter) = (by_name("cpa"), by_name("exporter"));
    let env = |c: &Value, name: &str| -> String {
        c["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .map(|e| str_of(&e["value"]).to_owned())
            .unwrap_or_default()
    };
    // The exporter reaches CPA over the pod's loopback, on CPA's container port.
    let (host, port) = host_port(&env(exporter, "CPA_URL"));
    assert_eq!(host, "127.0.0.1");
    assert_eq!(
        cpa["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(port))
    );
    // The key comes from a file, projected alone from the Secret.
    let key_file = env(exporter, "CPA_MANAGEMENT_KEY_FILE");
    let mount = exporter["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| key_file.starts_with(str_of(&m["mountPath"])))
        .expect("the key file is mounted");
    let volume = pod["spec"]["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the key volume");
    let items = volume["secret"]["items"].as_sequence().expect("items");
    assert_eq!(items.len(), 1);
    assert!(key_file.ends_with(str_of(&items[0]["path"])));
    // Limits, non-root, and no readiness probe that could take CPA out of its Service.
    assert_eq!(
        mebibytes(str_of(&exporter["resources"]["limits"]["memory"])),
        64.0
    );
    assert_eq!(exporter["securityContext"]["runAsNonRoot"], true);
    assert_eq!(exporter["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(exporter["readinessProbe"].is_null());
    assert_eq!(exporter["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(deploy["spec"]["strategy"]["type"], "Recreate");

    // The Service the ServiceMonitor scrapes: named after the rules' job, on the metrics port.
    let jobs = rule_jobs();
    let job = jobs.iter().next().expect("a job");
    let service = find(&objects, "Service", job);
    assert!(labels_match(
        &service["spec"]["selector"],
        &pod["metadata"]["labels"]
    ));
    let target = str_of(&service["spec"]["ports"][0]["targetPort"]);
    let metrics = exporter["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == target)
        .expect("the Service's targetPort names an exporter port");
    assert_eq!(metrics["containerPort"].as_u64(), Some(9317));
    let monitor = objects
        .iter()
        .find(|o| o["kind"] == "ServiceMonitor")
        .expect("a ServiceMonitor");
    assert!(labels_match(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert!(
        monitor["spec"]["jobLabel"].is_null(),
        "the job must stay the Service's name"
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], target);

    // The Secret the Deployment reads, as the example shows it: CPA local-only, statistics on.
    let example = yaml_documents("deploy/kubernetes/cpa-secret.example.yaml");
    let secret = find(&example, "Secret", "cpa");
    for v in pod["spec"]["volumes"].as_sequence().expect("volumes") {
        if let Some(name) = v["secret"]["secretName"].as_str() {
            assert_eq!(name, "cpa");
            for item in v["secret"]["items"].as_sequence().into_iter().flatten() {
                assert!(
                    !secret["stringData"][str_of(&item["key"])].is_null(),
                    "the example Secret lacks {:?}",
                    item["key"]
                );
            }
        }
    }
    let config: Value =
        serde_norway::from_str(str_of(&secret["stringData"]["config.yaml"])).expect("config");
    assert_eq!(config["usage-statistics-enabled"], true);
    assert_eq!(config["remote-management"]["allow-remote"], false);
    assert_eq!(config["port"].as_u64(), Some(u64::from(port)));
    // The same CPA as compose.
    assert_eq!(cpa["image"], Compose::load().service("cpa")["image"]);
}

#[test]
fn kubernetes_ships_rules_and_dashboards_to_the_operator_and_the_sidecar() {
    let objects = kube_objects();
    assert_eq!(
        objects
            .iter()
            .filter(|o| o["kind"] == "PrometheusRule")
            .count(),
        1
    );
    let maps: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap" && o["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(maps.len(), files("dashboards", ".json").len());
    for o in &objects {
        let name = str_of(&o["metadata"]["name"]);
        assert!(
            !name.is_empty()
                && name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "`{name}` is not a DNS-1123 name"
        );
    }
}
