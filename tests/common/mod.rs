//! Test harness: the real exporter binary against the fake CPA, scraped over HTTP.
#![allow(dead_code)]

pub mod promql;
pub mod realcpa;
pub mod stress;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cpa_usage_exporter::labels::api_key_label;
use fake_cpa::{Expect, FakeCpa, Workload, WorkloadMix};

pub const BIN: &str = env!("CARGO_BIN_EXE_cpa-usage-exporter");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running exporter process with its own listen port and log file.
pub struct Exporter {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

pub struct Setup<'a> {
    pub cpa_url: String,
    pub key: &'a str,
    pub db: &'a Path,
    pub log: PathBuf,
    pub extra: Vec<(&'a str, String)>,
}

impl<'a> Setup<'a> {
    /// The usual setup: the fake CPA's URL, the database and the log inside `dir`.
    pub fn in_dir(
        cpa: &FakeCpa,
        key: &'a str,
        dir: &'a tempfile::TempDir,
        name: &str,
    ) -> Setup<'a> {
        Setup {
            cpa_url: cpa.url(),
            key,
            // Lives as long as the test process; tests restart the exporter on the same file.
            db: Box::leak(dir.path().join("state.db").into_boxed_path()),
            log: dir.path().join(format!("{name}.log")),
            extra: Vec::new(),
        }
    }

    pub fn with_env(mut self, name: &'a str, value: impl Into<String>) -> Setup<'a> {
        self.extra.push((name, value.into()));
        self
    }
}

/// A workload rich in the awkward cases: duplicates, string elements, control payloads and
/// invalid elements, on top of the default mix.
pub fn edge_case_mix() -> WorkloadMix {
    WorkloadMix {
        duplicate_event_id: 0.03,
        string_wrapped: 0.08,
        control: 0.02,
        invalid: 0.03,
        ..WorkloadMix::default()
    }
}

/// Wait until the fake CPA's queue is empty and the exporter accounted for `elements`.
pub async fn drained(exporter: &Exporter, cpa: &FakeCpa, elements: f64) -> Metrics {
    let ok = eventually(Duration::from_secs(30), async || {
        cpa.stats().queued == 0 && accounted(&exporter.scrape().await) >= elements
    })
    .await;
    assert!(ok, "not drained; log:\n{}", exporter.log_text());
    exporter.scrape().await
}

/// Whether `tool` can run. Missing: a failure under CI, a skip (with a note) elsewhere.
pub fn have(tool: &str) -> bool {
    match Command::new(tool).arg("--version").output() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{tool} is required under CI but cannot run: {e}"
            );
            eprintln!("skipping: {tool} is not installed ({e})");
            false
        }
    }
}

impl Exporter {
    pub fn spawn(setup: &Setup<'_>) -> Exporter {
        Exporter::spawn_via(setup, Command::new(BIN))
    }

    /// Spawn through `cmd` (the binary itself, or a wrapper that `exec`s it), with the setup's
    /// environment and a log file.
    pub fn spawn_via(setup: &Setup<'_>, mut cmd: Command) -> Exporter {
        let port = free_port();
        let log = std::fs::File::create(&setup.log).expect("log file");
        cmd.env_clear()
            .env("CPA_URL", &setup.cpa_url)
            .env("CPA_MANAGEMENT_KEY", setup.key)
            .env("CPA_EXPORTER_DB", setup.db)
            .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{port}"))
            .env("CPA_EXPORTER_POLL_INTERVAL", "200ms")
            // Tests read exact counts right after a drain; the ones about the hold set it.
            .env("CPA_EXPORTER_NEW_SERIES_HOLD", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &setup.extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn exporter");
        let exporter = Exporter {
            child,
            port,
            log: setup.log.clone(),
        };
        exporter.wait_listening();
        exporter
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("exporter did not listen; log:\n{}", self.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `/metrics` as text 0.0.4.
    pub async fn scrape_text(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body")
    }

    pub async fn scrape(&self) -> Metrics {
        Metrics::parse(&self.scrape_text().await)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Send a signal (`-STOP`, `-CONT`, `-TERM`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub fn sigkill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for the process to exit on its own.
    pub fn wait_exit(mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("exporter did not exit; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Samples of one scrape, keyed by name and sorted labels.
#[derive(Debug, Default, Clone)]
pub struct Metrics(pub BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Metrics {
    /// Parse Prometheus text 0.0.4 (enough of it for this exporter's output).
    pub fn parse(text: &str) -> Metrics {
        let mut out = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("value"),
            };
            out.insert((name.to_owned(), labels), value);
        }
        Metrics(out)
    }

    /// Sum of every sample of `name` whose labels include all of `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(&(name.to_owned(), BTreeMap::new())).copied()
    }

    /// All label sets of `name` with their values (label maps minus `le`).
    pub fn series(&self, name: &str) -> BTreeMap<BTreeMap<String, String>, f64> {
        self.0
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, l), v)| (l.clone(), *v))
            .collect()
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end..];
    }
    out
}

/// What the exporter must report for a workload, computed from the generator's own choices.
#[derive(Debug, Default, PartialEq)]
pub struct Expected {
    pub requests: BTreeMap<Vec<String>, f64>,
    pub failures: BTreeMap<Vec<String>, f64>,
    pub tokens: BTreeMap<Vec<String>, f64>,
    pub outcomes: BTreeMap<String, f64>,
    pub invalid: BTreeMap<String, f64>,
    pub latency_count: f64,
    pub ttft_count: f64,
}

pub const REQUEST_LABELS: [&str; 6] = [
    "provider",
    "model",
    "requested_model",
    "credential",
    "api_key",
    "endpoint",
];
pub const TOKEN_LABELS: [&str; 5] = ["provider", "model", "credential", "api_key", "type"];
pub const TYPES: [&str; 6] = [
    "input",
    "cache_read",
    "cache_write",
    "output",
    "reasoning",
    "unclassified",
];

impl Expected {
    pub fn add(&mut self, expect: &Expect) {
        let bump =
            |m: &mut BTreeMap<String, f64>, k: &str| *m.entry(k.to_owned()).or_default() += 1.0;
        match expect {
            Expect::Usage(t) => {
                bump(&mut self.outcomes, "ingested");
                let api_key = t
                    .api_key
                    .as_deref()
                    .filter(|k| !k.is_empty())
                    .map_or("none".to_owned(), api_key_label);
                let base = vec![
                    t.provider.clone(),
                    t.model.clone(),
                    t.requested_model.clone(),
                    t.credential.clone(),
                    api_key.clone(),
                    t.endpoint.clone(),
                ];
                *self.requests.entry(base.clone()).or_default() += 1.0;
                if t.failed {
                    let mut f = base.clone();
                    f.push(t.status_code.to_string());
                    *self.failures.entry(f).or_default() += 1.0;
                }
                for (ty, n) in TYPES.iter().zip(t.tokens) {
                    if n > 0 {
                        let k = vec![
                            t.provider.clone(),
                            t.model.clone(),
                            t.credential.clone(),
                            api_key.clone(),
                            ty.to_string(),
                        ];
                        *self.tokens.entry(k).or_default() += n as f64;
                    }
                }
                if t.latency_ms.is_some() {
                    self.latency_count += 1.0;
                }
                if t.ttft_ms > 0 {
                    self.ttft_count += 1.0;
                }
            }
            Expect::Duplicate(_) => bump(&mut self.outcomes, "duplicate"),
            Expect::Control => bump(&mut self.outcomes, "control"),
            Expect::Invalid(reason) => {
                bump(&mut self.outcomes, "invalid");
                bump(&mut self.invalid, reason);
            }
        }
    }

    /// The same shape, read from a scrape.
    pub fn observed(m: &Metrics) -> Expected {
        let keyed = |name: &str, labels: &[&str]| -> BTreeMap<Vec<String>, f64> {
            m.series(name)
                .into_iter()
                .map(|(l, v)| {
                    (
                        labels
                            .iter()
                            .map(|k| l.get(*k).cloned().unwrap_or_default())
                            .collect(),
                        v,
                    )
                })
                .collect()
        };
        let mut failure_labels = REQUEST_LABELS.to_vec();
        failure_labels.push("status_code");
        let single = |name: &str, label: &str| -> BTreeMap<String, f64> {
            m.series(name)
                .into_iter()
                .map(|(l, v)| (l[label].clone(), v))
                .filter(|(_, v)| *v > 0.0)
                .collect()
        };
        Expected {
            requests: keyed("cpa_requests_total", &REQUEST_LABELS),
            failures: keyed("cpa_request_failures_total", &failure_labels),
            tokens: keyed("cpa_tokens_total", &TOKEN_LABELS),
            outcomes: single("cpa_exporter_records_total", "outcome"),
            invalid: single("cpa_exporter_invalid_records_total", "reason"),
            latency_count: m.sum("cpa_request_duration_seconds_count", &[]),
            ttft_count: m.sum("cpa_time_to_first_token_seconds_count", &[]),
        }
    }
}

/// Push `n` generated elements into the fake CPA; returns what the exporter must report.
pub fn push_workload(cpa: &FakeCpa, seed: u64, mix: WorkloadMix, n: usize) -> Expected {
    let mut workload = Workload::new(seed, mix);
    let mut expected = Expected::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    for _ in 0..n {
        let g = workload.next(now);
        cpa.push_raw(&g.element_json);
        expected.add(&g.expect);
    }
    expected
}

/// [`push_workload`], all records queued at once: the exporter's next pop takes a full batch.
pub fn push_workload_at_once(cpa: &FakeCpa, seed: u64, mix: WorkloadMix, n: usize) -> Expected {
    let mut workload = Workload::new(seed, mix);
    let mut expected = Expected::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut elements = Vec::with_capacity(n);
    for _ in 0..n {
        let g = workload.next(now);
        expected.add(&g.expect);
        elements.push(g.element_json);
    }
    cpa.push_raw_all(elements.iter().map(String::as_str));
    expected
}

/// Poll `check` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Elements the exporter accounted for (every outcome).
pub fn accounted(m: &Metrics) -> f64 {
    m.sum("cpa_exporter_records_total", &[])
}

/// Every sample name the exporter can expose, read from a running `demo`: the names of samples
/// present, plus the names implied by `# TYPE` lines (a family with no series yet, and a
/// histogram's `_bucket`/`_sum`/`_count`). Dashboards and rules must only use these.
pub async fn demo_metric_names() -> std::collections::BTreeSet<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["demo", "--rate", "300"])
        .env_clear()
        .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CPA_EXPORTER_DB", dir.path().join("demo.db"))
        .env("CPA_EXPORTER_POLL_INTERVAL", "200ms")
        .env("CPA_EXPORTER_CREDENTIALS_INTERVAL", "5s")
        .env("CPA_EXPORTER_NEW_SERIES_HOLD", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut text = String::new();
    let ready = eventually(Duration::from_secs(30), async || {
        text = match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return false,
        };
        let m = Metrics::parse(&text);
        // The credentials and settings gauges arrive with the poller's first round.
        m.sum("cpa_request_failures_total", &[]) > 0.0
            && m.sum("cpa_time_to_first_token_seconds_count", &[]) > 0.0
            && text.contains("# TYPE cpa_credential_status")
            && text.contains("# TYPE cpa_info")
            && text.contains("# TYPE cpa_usage_statistics_enabled")
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "demo produced no failures and TTFT within 30 s");
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(ty)) = (parts.next(), parts.next()) else {
                continue;
            };
            if ty == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            } else {
                names.insert(name.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}
