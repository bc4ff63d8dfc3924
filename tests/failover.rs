//! Failover chains against the fake CPA, with exact totals: inbound requests, client-visible
//! failures and absorbed failover attempts at /metrics equal what the test computes from the
//! chains it built, across a restart of the exporter in the middle of chains, with codex image
//! tool records (same request_id and start, another model) and request_ids reused far apart.
//! The event log of the same run is checked line by line against the records pushed, and swept
//! for the secrets planted in them.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use cpa_usage_exporter::labels::api_key_label;
use fake_cpa::workload::rfc3339_nano;
use fake_cpa::{FakeCpa, SimConfig};

const KEY: &str = "failover-test-key";
const CLIENTS: [&str; 3] = ["sk-fo-alpha", "sk-fo-beta", "sk-fo-gamma"];
const MODELS: [&str; 2] = ["gpt-5", "claude-sonnet"];
const CREDENTIALS: [&str; 3] = ["c0c0c0c0", "c1c1c1c1", "c2c2c2c2"];
const STATUSES: [u16; 3] = [429, 503, 401];

/// A tiny deterministic generator (the test's own, so the truth does not come from the code
/// under test).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One upstream attempt as CPA would write it.
#[derive(Clone)]
struct Attempt {
    start: f64,
    latency: f64,
    client: usize,
    request_id: String,
    requested_model: &'static str,
    model: String,
    credential: &'static str,
    status: Option<u16>,
    /// Whether an earlier attempt of its request failed (the event log's `failover`).
    failover: bool,
}

/// Secrets and personal data planted in every record: none may reach the event log.
const PLANTED: [&str; 6] = [
    "alice@example.com",
    "203.0.113.77",
    "planted-agent/9.9",
    "upstream said no",
    "sk-upstream-plaintext",
    "planted-header-secret",
];

impl Attempt {
    fn json(&self) -> String {
        let (failed, code) = match self.status {
            Some(s) => (true, s),
            None => (false, 200),
        };
        format!(
            r#"{{"timestamp":"{}","latency_ms":{},"provider":"codex","model":"{}","alias":"{}",
                "auth_index":"{}","api_key":"{}","request_id":"{}","failed":{failed},
                "fail":{{"status_code":{code},"body":"upstream said no"}},"endpoint":"POST /v1/responses",
                "source":"alice@example.com","client_ip":"203.0.113.77","x_forwarded_for":"sk-upstream-plaintext",
                "user_agent":"planted-agent/9.9","response_headers":{{"X-Secret":["planted-header-secret"]}},
                "tokens":{{"input_tokens":10,"output_tokens":5,"total_tokens":15}}}}"#,
            rfc3339_nano(self.start),
            (self.latency * 1000.0) as u64,
            self.model,
            self.requested_model,
            self.credential,
            CLIENTS[self.client],
            self.request_id,
        )
    }
}

/// What the exporter must report, computed from the chains as built.
#[derive(Default, Debug, PartialEq)]
struct Truth {
    attempts: u64,
    requests: BTreeMap<(String, String), u64>,
    failures: BTreeMap<(String, String, String), u64>,
    failovers: BTreeMap<(String, String, String, String), u64>,
}

impl Truth {
    /// One inbound request made of `attempts` (in order), plus `extra` tool records.
    fn request(&mut self, attempts: &[Attempt], extra: usize) {
        self.attempts += (attempts.len() + extra) as u64;
        let first = &attempts[0];
        let key = (
            first.requested_model.to_owned(),
            api_key_label(CLIENTS[first.client]),
        );
        *self.requests.entry(key.clone()).or_default() += 1;
        let last = attempts.last().expect("a request has attempts");
        match last.status {
            Some(s) => {
                *self
                    .failures
                    .entry((key.0, key.1, s.to_string()))
                    .or_default() += 1
            }
            None => {
                for a in &attempts[..attempts.len() - 1] {
                    let s = a.status.expect("only the last attempt succeeds");
                    let k = (
                        "codex".to_owned(),
                        a.model.clone(),
                        a.credential.to_owned(),
                        s.to_string(),
                    );
                    *self.failovers.entry(k).or_default() += 1;
                }
            }
        }
    }

    fn observed(m: &Metrics) -> Truth {
        let label = |l: &BTreeMap<String, String>, k: &str| l.get(k).cloned().unwrap_or_default();
        let mut t = Truth {
            attempts: m.sum("cpa_requests_total", &[]) as u64,
            ..Truth::default()
        };
        for (l, v) in m.series("cpa_inbound_requests_total") {
            if v > 0.0 {
                t.requests.insert(
                    (label(&l, "requested_model"), label(&l, "api_key")),
                    v as u64,
                );
            }
        }
        for (l, v) in m.series("cpa_inbound_request_failures_total") {
            if v > 0.0 {
                let k = (
                    label(&l, "requested_model"),
                    label(&l, "api_key"),
                    label(&l, "status_code"),
                );
                t.failures.insert(k, v as u64);
            }
        }
        for (l, v) in m.series("cpa_failover_attempts_total") {
            if v > 0.0 {
                let k = (
                    label(&l, "provider"),
                    label(&l, "model"),
                    label(&l, "credential"),
                    label(&l, "status_code"),
                );
                t.failovers.insert(k, v as u64);
            }
        }
        t
    }
}

/// A request of 1-3 attempts starting at `start`: up to two failures, then a success or, when
/// `all_failed`, one more failure. Gaps and latencies stay well within the window.
fn chain(rng: &mut Rng, start: f64, all_failed: bool, id: Option<String>) -> Vec<Attempt> {
    let request_id = id.unwrap_or_else(|| hex8(rng));
    let client = rng.below(3) as usize;
    let requested_model = MODELS[rng.below(2) as usize];
    let failures = rng.below(3) as usize + usize::from(all_failed);
    let mut at = start;
    let mut out = Vec::new();
    for i in 0..=failures {
        let last = i == failures;
        let latency = 0.05 + rng.below(1500) as f64 / 1000.0;
        out.push(Attempt {
            start: at,
            latency,
            client,
            request_id: request_id.clone(),
            requested_model,
            model: format!("{requested_model}-v{}", rng.below(2)),
            credential: CREDENTIALS[rng.below(3) as usize],
            status: (!last || all_failed).then(|| STATUSES[rng.below(3) as usize]),
            failover: i > 0,
        });
        at += latency + rng.below(500) as f64 / 1000.0;
    }
    out
}

/// Interleave chains the way the queue does (each chain in order, chains mixed).
fn interleave(rng: &mut Rng, chains: &[Vec<Attempt>]) -> Vec<Attempt> {
    let mut next = vec![0usize; chains.len()];
    let mut out = Vec::new();
    while out.len() < chains.iter().map(Vec::len).sum() {
        let i = rng.below(chains.len() as u64) as usize;
        if let Some(a) = chains[i].get(next[i]) {
            out.push(a.clone());
            next[i] += 1;
        }
    }
    out
}

fn hex8(rng: &mut Rng) -> String {
    format!("{:08x}", rng.next() as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_totals_are_exact_across_a_restart_in_the_middle_of_chains() {
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.into(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_f00d_1234_5678);
    let mut truth = Truth::default();
    // Records from an hour ago: the window is measured between record times for a successor
    // and on the wall clock for a request left failed.
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        - 3600.0;

    // Phase 1: whole chains, plus the first halves of chains cut by the restart.
    let mut whole = Vec::new();
    for i in 0..40 {
        let c = chain(&mut rng, base + i as f64 * 3.0, i % 4 == 0, None);
        truth.request(&c, 0);
        whole.push(c);
    }
    // A codex image tool record after a successful request: same request_id and start.
    let mut with_tool = chain(&mut rng, base + 200.0, false, None);
    with_tool.truncate(1);
    let mut tool = with_tool[0].clone();
    tool.model = "gpt-image-1".into();
    tool.latency = 0.3;
    truth.request(&with_tool, 1);
    // One request_id used by two requests of one client, far apart in time: the first fails,
    // the second succeeds.
    let shared_id = hex8(&mut rng);
    let mut early = chain(&mut rng, base + 300.0, true, Some(shared_id.clone()));
    let mut late = chain(&mut rng, base + 1300.0, false, Some(shared_id));
    for a in late.iter_mut() {
        a.client = early[0].client;
    }
    early.truncate(1);
    truth.request(&early, 0);
    truth.request(&late, 0);
    // Chains whose failed first attempts are drained before the restart and whose later
    // attempts after it (their successor joins them; the all-failed ones end as failures).
    let mut cut = Vec::new();
    for i in 0..12 {
        let mut c = chain(&mut rng, base + 400.0 + i as f64 * 3.0, i % 3 == 0, None);
        while c.len() < 2 {
            c = chain(&mut rng, base + 400.0 + i as f64 * 3.0, i % 3 == 0, None);
        }
        truth.request(&c, 0);
        cut.push(c);
    }
    let mut phase1 = interleave(&mut rng, &whole);
    phase1.push(with_tool[0].clone());
    phase1.push(early[0].clone());
    phase1.extend(cut.iter().map(|c| c[0].clone()));
    let mut phase2 = vec![tool];
    phase2.extend(late.iter().cloned());
    let rest: Vec<Vec<Attempt>> = cut.iter().map(|c| c[1..].to_vec()).collect();
    phase2.extend(interleave(&mut rng, &rest));

    assert!(
        truth.failures.len() > 2 && truth.failovers.len() > 2,
        "{truth:?}"
    );
    for a in &phase1 {
        cpa.push_raw(&a.json());
    }
    // A long window before the restart: nothing open may expire while the exporter runs.
    let events = dir.path().join("events.log");
    // Popping: phase 2 is pushed right after a SIGKILL, which a subscription would lose (CPA
    // publishes to the dead connection until it notices it closed; tests/subscribe.rs).
    let before = Setup::in_dir(&cpa, KEY, &dir, "before")
        .with_env("CPA_TRANSPORT", "resp")
        .with_env("CPA_EXPORTER_EVENT_LOG", events.display().to_string())
        .with_env("CPA_EXPORTER_FAILOVER_WINDOW", "1h")
        .with_env("CPA_EXPORTER_BATCH_SIZE", "16");
    let exporter = Exporter::spawn(&before);
    let m = drained(&exporter, &cpa, phase1.len() as f64).await;
    assert_eq!(m.sum("cpa_requests_total", &[]), phase1.len() as f64);
    let open = m.get("cpa_exporter_open_requests").unwrap_or_default();
    assert!(open >= cut.len() as f64, "{open} open requests");
    // The lines follow the commit on the writer thread: let them land before the kill (a kill
    // may lose the last lines, never add one).
    let written = eventually(Duration::from_secs(20), async || {
        read_lines(&events).len() == phase1.len()
    })
    .await;
    assert!(written, "{} lines", read_lines(&events).len());
    exporter.sigkill();

    for a in &phase2 {
        cpa.push_raw(&a.json());
    }
    let after = Setup::in_dir(&cpa, KEY, &dir, "after")
        .with_env("CPA_TRANSPORT", "resp")
        .with_env("CPA_EXPORTER_EVENT_LOG", events.display().to_string())
        .with_env("CPA_EXPORTER_FAILOVER_WINDOW", "3s")
        .with_env("CPA_EXPORTER_BATCH_SIZE", "16");
    let exporter = Exporter::spawn(&after);
    let settled = eventually(Duration::from_secs(60), async || {
        let m = exporter.scrape().await;
        m.get("cpa_exporter_open_requests") == Some(0.0)
            && Truth::observed(&m).requests == truth.requests
    })
    .await;
    let m = exporter.scrape().await;
    assert!(settled, "not settled; log:\n{}", exporter.log_text());
    assert_eq!(Truth::observed(&m), truth);
    let forced = m.sum("cpa_exporter_requests_forced_closed_total", &[]);
    assert_eq!(forced, 0.0, "nothing is closed early");
    // Neither the request_ids nor the client keys reach /metrics.
    let text = exporter.scrape_text().await;
    for a in phase1.iter().chain(&phase2) {
        assert!(!text.contains(&a.request_id), "{} leaks", a.request_id);
    }
    for k in CLIENTS {
        assert!(!text.contains(k));
    }

    // The event log: one line per attempt pushed, each with the record's fields.
    let pushed: Vec<&Attempt> = phase1.iter().chain(&phase2).collect();
    let complete = eventually(Duration::from_secs(20), async || {
        read_lines(&events).len() == pushed.len()
    })
    .await;
    let lines = read_lines(&events);
    assert!(
        complete,
        "{} lines for {} records",
        lines.len(),
        pushed.len()
    );
    check_lines(&lines, &pushed);
    assert_eq!(
        m.get("cpa_exporter_event_log_lines_total"),
        Some(phase2.len() as f64),
        "the restarted exporter wrote phase 2"
    );
    let raw = std::fs::read_to_string(&events).unwrap();
    for secret in PLANTED.iter().chain(&CLIENTS) {
        assert!(!raw.contains(secret), "{secret} in the event log");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&events).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the event log is private");
    }
}

fn read_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Every line matches exactly one pushed attempt (same id, model, credential, status and start
/// to the millisecond), field by field.
fn check_lines(lines: &[serde_json::Value], pushed: &[&Attempt]) {
    let mut unmatched: Vec<&Attempt> = pushed.to_vec();
    for line in lines {
        let time = line["time"].as_str().expect("time");
        let t = parse_time(time);
        let status = line["status_code"].as_u64().expect("status_code");
        let at = unmatched
            .iter()
            .position(|a| {
                line["request_id"] == a.request_id.as_str()
                    && line["model"] == a.model.as_str()
                    && line["credential"] == a.credential
                    && status == u64::from(a.status.unwrap_or(200))
                    && (t - a.start).abs() < 0.0015
            })
            .unwrap_or_else(|| panic!("no pushed record for {line}"));
        let a = unmatched.swap_remove(at);
        let expect = serde_json::json!({
            "provider": "codex",
            "requested_model": a.requested_model,
            "api_key": api_key_label(CLIENTS[a.client]),
            "endpoint": "POST /v1/responses",
            "failed": a.status.is_some(),
            "ttft_seconds": null,
            "tokens": {"input": 10, "cache_read": 0, "cache_write": 0, "output": 5,
                       "reasoning": 0, "unclassified": 0},
            "failover": a.failover,
        });
        for (k, v) in expect.as_object().unwrap() {
            assert_eq!(&line[k], v, "{k} of {line}");
        }
        let latency = line["latency_seconds"].as_f64().expect("latency_seconds");
        assert!(
            (latency - (a.latency * 1000.0).floor() / 1000.0).abs() < 1e-9,
            "{line}"
        );
        assert!(line["cost_usd"].is_null() || line["cost_usd"].is_number());
    }
    assert!(
        unmatched.is_empty(),
        "{} records without a line",
        unmatched.len()
    );
}

/// `2026-08-22T14:39:03.512Z` as Unix seconds.
fn parse_time(t: &str) -> f64 {
    cpa_usage_exporter::time::parse_rfc3339(t).unwrap_or_else(|| panic!("bad time {t}"))
}
