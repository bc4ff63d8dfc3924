//! The real CLIProxyAPI (v7.2.140) in tests: an OpenAI-compatible upstream stub run inside the
//! test, the real CPA binary started against it, a client whose requests are the truth, and a
//! raw RESP subscriber standing for the other collectors (cpa-usage-keeper and friends).
//!
//! The truth comes from the test's side only: what the client asked for and got, and what the
//! stub saw and answered. CPA's records are never used to compute it (only to replay them into
//! the fake CPA), and neither is the exporter.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpa_usage_exporter::labels::api_key_label;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{free_port, Metrics};

/// Where the real CPA binary is; unset: the real-CPA tests skip (fail under `CI`).
pub const BIN_ENV: &str = "CPA_REAL_BIN";
pub const MANAGEMENT_KEY: &str = "realcpa-test-mgmt-key";
pub const CLIENT_KEYS: [&str; 2] = ["sk-realcpa-client-one", "sk-realcpa-client-two"];
pub const UPSTREAM_KEYS: [&str; 2] = ["sk-upstream-a", "sk-upstream-b"];
/// CPA names an openai-compatibility entry's provider `openai-compatible-<name>`.
pub const UPSTREAM_NAME: &str = "fakeup";
pub const PROVIDER: &str = "openai-compatible-fakeup";
pub const MODEL: &str = "fake-ok";
pub const ENDPOINT: &str = "POST /v1/chat/completions";
/// How long CPA may take to answer `GET /` after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Nothing may leave the machine: CPA's version check goes to this closed port.
const DEAD_PROXY: &str = "http://127.0.0.1:9";

/// The real CPA binary from [`BIN_ENV`]; `None` (with a note) when it is not given, a failure
/// when `CI` is set, so CI cannot pass without running these tests.
pub fn real_cpa_bin() -> Option<PathBuf> {
    let missing = match std::env::var_os(BIN_ENV) {
        Some(p) if Path::new(&p).is_file() => return Some(PathBuf::from(p)),
        Some(p) => format!("{BIN_ENV}={} is not a file", Path::new(&p).display()),
        None => format!("{BIN_ENV} is not set"),
    };
    let message = format!("real CPA tests need the CLIProxyAPI binary: {missing}");
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("skipping: {message}");
    None
}

// ---------------------------------------------------------------------------------------------
// The upstream stub
// ---------------------------------------------------------------------------------------------

/// Tokens one successful upstream answer reports, as OpenAI's `usage` spells them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    /// Part of `prompt` (`prompt_tokens_details.cached_tokens`).
    pub cached: u64,
    /// Part of `completion` (`completion_tokens_details.reasoning_tokens`).
    pub reasoning: u64,
}

impl Usage {
    fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": { "cached_tokens": self.cached },
            "completion_tokens_details": { "reasoning_tokens": self.reasoning },
        })
    }

    /// The exporter's non-overlapping token types and their counts (zeros left out).
    pub fn by_type(&self) -> Vec<(&'static str, u64)> {
        [
            ("input", self.prompt - self.cached),
            ("cache_read", self.cached),
            ("output", self.completion - self.reasoning),
            ("reasoning", self.reasoning),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }

    /// The request text that tells the stub which usage to answer (and tags the request).
    fn prompt_text(&self, tag: &str) -> String {
        format!(
            "tag={tag} prompt={} completion={} cached={} reasoning={}",
            self.prompt, self.completion, self.cached, self.reasoning
        )
    }

    fn from_prompt_text(text: &str) -> Option<(String, Usage)> {
        let mut tag = None;
        let mut usage = Usage::default();
        for word in text.split_whitespace() {
            let (k, v) = word.split_once('=')?;
            match k {
                "tag" => tag = Some(v.to_owned()),
                "prompt" => usage.prompt = v.parse().ok()?,
                "completion" => usage.completion = v.parse().ok()?,
                "cached" => usage.cached = v.parse().ok()?,
                "reasoning" => usage.reasoning = v.parse().ok()?,
                _ => return None,
            }
        }
        Some((tag?, usage))
    }
}

/// How the stub answers one upstream key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFault {
    /// Every request gets this status.
    Always(u16),
    /// The next `n` requests get this status, then the key works again.
    Next(u16, usize),
}

/// One request the stub received (one upstream attempt of CPA).
#[derive(Clone, Debug)]
pub struct UpstreamAttempt {
    pub tag: String,
    pub upstream_key: String,
    pub status: u16,
    pub stream: bool,
    pub usage: Usage,
}

#[derive(Default)]
struct StubState {
    faults: HashMap<String, UpstreamFault>,
    attempts: Vec<UpstreamAttempt>,
}

impl StubState {
    /// The status for the next request with `key`, consuming a `Next` fault.
    fn status_for(&mut self, key: &str) -> u16 {
        match self.faults.get_mut(key) {
            Some(UpstreamFault::Always(s)) => *s,
            Some(UpstreamFault::Next(s, n)) if *n > 0 => {
                *n -= 1;
                *s
            }
            _ => 200,
        }
    }
}

/// An OpenAI-compatible upstream on a loopback port: `POST /v1/chat/completions` (JSON, or SSE
/// with `"stream": true` whose last chunk carries `usage`) and `GET /v1/models`.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<Mutex<StubState>>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        let addr = listener.local_addr().expect("stub addr");
        let state = Arc::new(Mutex::new(StubState::default()));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(Arc::clone(&shared), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, state, task }
    }

    /// The base URL CPA's `openai-compatibility` entry points at.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set_fault(&self, upstream_key: &str, fault: Option<UpstreamFault>) {
        let mut st = self.state.lock().expect("stub state");
        match fault {
            Some(f) => st.faults.insert(upstream_key.to_owned(), f),
            None => st.faults.remove(upstream_key),
        };
    }

    /// Every chat request received so far, in arrival order.
    pub fn attempts(&self) -> Vec<UpstreamAttempt> {
        self.state.lock().expect("stub state").attempts.clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type StubResponse = Response<Full<Bytes>>;

fn reply(status: u16, content_type: &str, body: String) -> StubResponse {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

async fn answer(
    state: Arc<Mutex<StubState>>,
    req: Request<Incoming>,
) -> Result<StubResponse, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let key = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok(match (method, path.as_str()) {
        (Method::GET, "/v1/models") => reply(
            200,
            "application/json",
            json!({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "stub"}]})
                .to_string(),
        ),
        (Method::POST, "/v1/chat/completions") => chat(&state, &key, &body),
        _ => reply(404, "application/json", r#"{"error":"not found"}"#.to_owned()),
    })
}

fn chat(state: &Mutex<StubState>, key: &str, body: &[u8]) -> StubResponse {
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    let stream = request["stream"].as_bool().unwrap_or(false);
    let text = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let Some((tag, usage)) = Usage::from_prompt_text(text) else {
        return reply(
            400,
            "application/json",
            r#"{"error":"untagged"}"#.to_owned(),
        );
    };
    let status = {
        let mut st = state.lock().expect("stub state");
        let status = st.status_for(key);
        st.attempts.push(UpstreamAttempt {
            tag,
            upstream_key: key.to_owned(),
            status,
            stream,
            usage: if status == 200 {
                usage
            } else {
                Usage::default()
            },
        });
        status
    };
    if status != 200 {
        let error =
            json!({"error": {"message": format!("stub says {status}"), "type": "stub_error"}});
        return reply(status, "application/json", error.to_string());
    }
    let id = "chatcmpl-stub";
    if !stream {
        let body = json!({
            "id": id, "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": usage.json(),
        });
        return reply(200, "application/json", body.to_string());
    }
    let chunks = [
        json!({"id": id, "object": "chat.completion.chunk", "created": 1, "model": MODEL,
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": null}]}),
        json!({"id": id, "object": "chat.completion.chunk", "created": 1, "model": MODEL,
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage.json()}),
    ];
    let mut sse: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    sse.push_str("data: [DONE]\n\n");
    reply(200, "text/event-stream", sse)
}

// ---------------------------------------------------------------------------------------------
// The real CPA
// ---------------------------------------------------------------------------------------------

/// The parts of CPA's config a test chooses.
#[derive(Clone, Debug)]
pub struct CpaConfig {
    /// Upstream keys of the one openai-compatibility entry, in order.
    pub upstream_keys: Vec<&'static str>,
    pub request_retry: u32,
    pub max_retry_credentials: u32,
}

impl Default for CpaConfig {
    fn default() -> Self {
        CpaConfig {
            upstream_keys: vec![UPSTREAM_KEYS[0]],
            request_retry: 0,
            max_retry_credentials: 0,
        }
    }
}

impl CpaConfig {
    /// Two upstream keys and CPA's retries across them.
    pub fn failover() -> CpaConfig {
        CpaConfig {
            upstream_keys: UPSTREAM_KEYS.to_vec(),
            request_retry: 2,
            max_retry_credentials: 2,
        }
    }

    fn yaml(&self, port: u16, auth_dir: &Path, upstream: &Upstream) -> String {
        let keys: Vec<String> = self
            .upstream_keys
            .iter()
            .map(|k| format!("{{ api-key: \"{k}\" }}"))
            .collect();
        format!(
            r#"host: "127.0.0.1"
port: {port}
remote-management: {{ allow-remote: false, secret-key: "{MANAGEMENT_KEY}", disable-control-panel: true }}
auth-dir: "{auth_dir}"
api-keys: ["{c0}", "{c1}"]
usage-statistics-enabled: true
redis-usage-queue-retention-seconds: 3600
request-retry: {retry}
max-retry-credentials: {max_cred}
disable-cooling: true
openai-compatibility:
  - name: "{UPSTREAM_NAME}"
    base-url: "{base}"
    api-key-entries: [{keys}]
    models: [{{ name: "{MODEL}", alias: "{MODEL}" }}]
"#,
            auth_dir = auth_dir.display(),
            c0 = CLIENT_KEYS[0],
            c1 = CLIENT_KEYS[1],
            retry = self.request_retry,
            max_cred = self.max_retry_credentials,
            base = upstream.base_url(),
            keys = keys.join(", "),
        )
    }
}

/// A running real CPA on a free loopback port, with its config, home and log in a temporary
/// directory (CPA rewrites its config file: it never sees a file of the repository). Killed on
/// drop.
pub struct RealCpa {
    child: Child,
    pub port: u16,
    log: PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl RealCpa {
    pub async fn start(bin: &Path, upstream: &Upstream, cfg: &CpaConfig) -> RealCpa {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth_dir = dir.path().join("auths");
        std::fs::create_dir_all(&auth_dir).expect("auth dir");
        let port = free_port();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, cfg.yaml(port, &auth_dir, upstream)).expect("config");
        let log = dir.path().join("cpa.log");
        let out = std::fs::File::create(&log).expect("cpa log");
        let err = out.try_clone().expect("cpa log");
        let child = Command::new(bin)
            .arg("-config")
            .arg(&config)
            .arg("-local-model")
            .current_dir(dir.path())
            .env_clear()
            .env("HOME", dir.path())
            .env("HTTP_PROXY", DEAD_PROXY)
            .env("HTTPS_PROXY", DEAD_PROXY)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn the real CPA");
        let cpa = RealCpa {
            child,
            port,
            log,
            http: client(),
            _dir: dir,
        };
        cpa.wait_ready().await;
        cpa
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(r) = self.http.get(self.url()).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the real CPA did not answer GET /; log:\n{}",
            self.log_text()
        );
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn management(&self, path: &str) -> Value {
        self.http
            .get(format!("{}/v0/management/{path}", self.url()))
            .bearer_auth(MANAGEMENT_KEY)
            .send()
            .await
            .expect("management call")
            .text()
            .await
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .expect("management JSON")
    }

    /// Upstream key -> CPA's `auth_index` for it (the exporter's `credential` label), from
    /// CPA's own config listing.
    pub async fn auth_indexes(&self) -> BTreeMap<String, String> {
        let listing = self.management("openai-compatibility").await;
        let entries = listing["openai-compatibility"][0]["api-key-entries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        entries
            .iter()
            .filter_map(|e| {
                Some((
                    e["api-key"].as_str()?.to_owned(),
                    e["auth-index"].as_str()?.to_owned(),
                ))
            })
            .collect()
    }

    /// CPA's own count per upstream key: (successful, failed) attempts
    /// (`GET /v0/management/api-key-usage`), an independent count to compare with.
    pub async fn api_key_usage(&self) -> BTreeMap<String, (u64, u64)> {
        let usage = self.management("api-key-usage").await;
        let mut out = BTreeMap::new();
        for (route, counts) in usage[UPSTREAM_NAME].as_object().into_iter().flatten() {
            let key = route.rsplit('|').next().unwrap_or_default().to_owned();
            let n = |k: &str| counts[k].as_u64().unwrap_or(0);
            out.insert(key, (n("success"), n("failed")));
        }
        out
    }

    /// A client of CPA's API (cheap to clone, owns what it needs, so it can go in a task).
    pub fn client(&self) -> ChatClient {
        ChatClient {
            http: self.http.clone(),
            url: self.url(),
        }
    }
}

/// A client of CPA's OpenAI-compatible API.
#[derive(Clone)]
pub struct ChatClient {
    http: reqwest::Client,
    url: String,
}

impl ChatClient {
    /// One chat request; returns the HTTP status the client got.
    pub async fn chat(&self, chat: &Chat, tag: &str) -> u16 {
        let body = json!({
            "model": MODEL,
            "stream": chat.stream,
            "messages": [{"role": "user", "content": chat.usage.prompt_text(tag)}],
        });
        let resp = self
            .http
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(CLIENT_KEYS[chat.client])
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("chat request");
        let status = resp.status().as_u16();
        // Read to the end: a streamed attempt is finished (and published) only then.
        let _ = resp.bytes().await;
        status
    }
}

impl Drop for RealCpa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that never goes through a proxy from the environment.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

// ---------------------------------------------------------------------------------------------
// Client traffic and its truth
// ---------------------------------------------------------------------------------------------

/// One client request: which client key, streamed or not, and the usage the stub answers.
#[derive(Clone, Copy, Debug)]
pub struct Chat {
    pub client: usize,
    pub stream: bool,
    pub usage: Usage,
}

/// `n` requests over both client keys, streamed and not, with varied token counts (all four
/// token types present).
pub fn plan(n: usize, seed: u64) -> Vec<Chat> {
    (0..n as u64)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000;
            let prompt = 20 + x % 50;
            let completion = 5 + x % 17;
            Chat {
                client: (i % 2) as usize,
                stream: (i / 2) % 2 == 1,
                usage: Usage {
                    prompt,
                    completion,
                    cached: (x % 3) * 4,
                    reasoning: x % 4,
                },
            }
        })
        .collect()
}

/// A request the client sent and the status it got.
#[derive(Clone, Debug)]
pub struct Sent {
    pub tag: String,
    pub client: usize,
    pub status: u16,
}

/// The client side of a test run: every request sent, with a tag unique across the run.
#[derive(Default)]
pub struct Traffic {
    pub sent: Vec<Sent>,
}

impl Traffic {
    /// Send `chats` with up to `parallel` requests in flight.
    pub async fn send(&mut self, client: &ChatClient, chats: &[Chat], parallel: usize) {
        for batch in chats.chunks(parallel.max(1)) {
            let mut tasks = tokio::task::JoinSet::new();
            for (i, chat) in batch.iter().copied().enumerate() {
                let tag = format!("r{}", self.sent.len() + i);
                let client = client.clone();
                tasks.spawn(async move {
                    let status = client.chat(&chat, &tag).await;
                    Sent {
                        tag,
                        client: chat.client,
                        status,
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                self.sent.push(done.expect("chat task"));
            }
        }
    }

    /// Send `chats` one at a time, `gap` apart (traffic that goes on while something happens).
    pub async fn send_paced(&mut self, client: &ChatClient, chats: &[Chat], gap: Duration) {
        for chat in chats {
            let tag = format!("r{}", self.sent.len());
            let status = client.chat(chat, &tag).await;
            self.sent.push(Sent {
                tag,
                client: chat.client,
                status,
            });
            tokio::time::sleep(gap).await;
        }
    }

    /// The truth: the client's requests joined with the stub's attempts by tag.
    pub fn truth(&self, upstream: &Upstream, auth_index: &BTreeMap<String, String>) -> Truth {
        let mut t = Truth::default();
        let mut by_tag: BTreeMap<&str, Vec<UpstreamAttempt>> = BTreeMap::new();
        let attempts = upstream.attempts();
        for a in &attempts {
            by_tag.entry(a.tag.as_str()).or_default().push(a.clone());
        }
        for s in &self.sent {
            let key = api_key_label(CLIENT_KEYS[s.client]);
            *t.requests.entry(key.clone()).or_default() += 1;
            if s.status != 200 {
                *t.client_failures
                    .entry((key.clone(), s.status.to_string()))
                    .or_default() += 1;
            }
            let tries = by_tag.remove(s.tag.as_str()).unwrap_or_default();
            let succeeded = tries.iter().any(|a| a.status == 200);
            for a in &tries {
                let credential = auth_index
                    .get(&a.upstream_key)
                    .cloned()
                    .unwrap_or_else(|| format!("unknown:{}", a.upstream_key));
                let status = outcome(a.status);
                *t.attempts.entry((key.clone(), status.clone())).or_default() += 1;
                *t.by_credential
                    .entry((credential.clone(), status.clone()))
                    .or_default() += 1;
                if a.status != 200 && succeeded {
                    *t.failovers.entry((credential, status)).or_default() += 1;
                }
                for (ty, n) in a.usage.by_type() {
                    *t.tokens.entry((key.clone(), ty.to_owned())).or_default() += n;
                }
            }
        }
        assert!(
            by_tag.is_empty(),
            "the stub saw attempts of requests the client never sent: {by_tag:?}"
        );
        t
    }
}

/// The status label of an attempt: `ok` for a success, else the HTTP status.
fn outcome(status: u16) -> String {
    if status == 200 {
        "ok".to_owned()
    } else {
        status.to_string()
    }
}

/// Counts a run must produce, keyed by label values (api_key in its display form, credential
/// as CPA's auth_index). Zeros are left out on both sides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Truth {
    /// Client requests by api_key.
    pub requests: BTreeMap<String, u64>,
    /// Client requests that failed, by api_key and the status the client got.
    pub client_failures: BTreeMap<(String, String), u64>,
    /// Upstream attempts by api_key and status (`ok` or the code).
    pub attempts: BTreeMap<(String, String), u64>,
    /// Upstream attempts by credential and status.
    pub by_credential: BTreeMap<(String, String), u64>,
    /// Tokens by api_key and type.
    pub tokens: BTreeMap<(String, String), u64>,
    /// Failed attempts of requests that then succeeded, by credential and status.
    pub failovers: BTreeMap<(String, String), u64>,
}

impl Truth {
    pub fn total_attempts(&self) -> u64 {
        self.attempts.values().sum()
    }

    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }

    /// The same counts read from a scrape.
    pub fn observed(m: &Metrics) -> Truth {
        let mut t = Truth::default();
        let label = |l: &BTreeMap<String, String>, k: &str| l.get(k).cloned().unwrap_or_default();
        let add = |map: &mut BTreeMap<(String, String), u64>, k: (String, String), v: f64| {
            if v > 0.0 {
                *map.entry(k).or_default() += v as u64;
            }
        };
        for (l, v) in m.series("cpa_requests_total") {
            add(&mut t.attempts, (label(&l, "api_key"), "ok".into()), v);
            add(
                &mut t.by_credential,
                (label(&l, "credential"), "ok".into()),
                v,
            );
        }
        for (l, v) in m.series("cpa_request_failures_total") {
            let code = label(&l, "status_code");
            add(&mut t.attempts, (label(&l, "api_key"), code.clone()), v);
            add(&mut t.by_credential, (label(&l, "credential"), code), v);
            // Attempts were counted as `ok` above: take the failures back out.
            for (map, k) in [
                (&mut t.attempts, label(&l, "api_key")),
                (&mut t.by_credential, label(&l, "credential")),
            ] {
                let ok = map.entry((k.clone(), "ok".into())).or_default();
                *ok = ok.saturating_sub(v as u64);
                if *ok == 0 {
                    map.remove(&(k, "ok".into()));
                }
            }
        }
        for (l, v) in m.series("cpa_tokens_total") {
            add(&mut t.tokens, (label(&l, "api_key"), label(&l, "type")), v);
        }
        for (l, v) in m.series("cpa_inbound_request_failures_total") {
            let k = (label(&l, "api_key"), label(&l, "status_code"));
            add(&mut t.client_failures, k, v);
        }
        for (l, v) in m.series("cpa_failover_attempts_total") {
            let k = (label(&l, "credential"), label(&l, "status_code"));
            add(&mut t.failovers, k, v);
        }
        for (l, v) in m.series("cpa_inbound_requests_total") {
            if v > 0.0 {
                *t.requests.entry(label(&l, "api_key")).or_default() += v as u64;
            }
        }
        t
    }
}

/// Every attempt series carries the route the test configured, nothing else.
pub fn assert_routes(m: &Metrics) {
    for (l, _) in m.series("cpa_requests_total") {
        let get = |k: &str| l.get(k).map(String::as_str).unwrap_or_default();
        assert_eq!(
            (
                get("provider"),
                get("model"),
                get("requested_model"),
                get("endpoint")
            ),
            (PROVIDER, MODEL, MODEL, ENDPOINT),
            "unexpected route {l:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Another collector: a raw RESP subscriber
// ---------------------------------------------------------------------------------------------

/// A RESP2 reply, as much of it as CPA sends.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Reads one reply; `None` when the connection ended or spoke nonsense.
pub async fn read_reply<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1)?;
    Some(match kind {
        "+" => Reply::Simple(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Int(rest.parse().ok()?),
        "$" => {
            let n: i64 = rest.parse().ok()?;
            if n < 0 {
                return Some(Reply::Bulk(None));
            }
            let mut buf = vec![0; n as usize + 2];
            r.read_exact(&mut buf).await.ok()?;
            buf.truncate(n as usize);
            Reply::Bulk(Some(buf))
        }
        "*" => {
            let n: i64 = rest.parse().ok()?;
            if n < 0 {
                return Some(Reply::Array(None));
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(Box::pin(read_reply(r)).await?);
            }
            Reply::Array(Some(items))
        }
        _ => return None,
    })
}

/// A command as a RESP array of bulk strings.
pub fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// Another collector subscribed to one of CPA's channels (`usage` or `errors`), keeping every
/// message it gets, as cpa-usage-keeper does. Unsubscribed (connection closed) on drop.
pub struct Collector {
    messages: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Collector {
    /// Connects, authenticates and subscribes; returns once CPA confirmed the subscription.
    pub async fn subscribe(cpa: &RealCpa, channel: &str) -> Collector {
        let stream = TcpStream::connect(("127.0.0.1", cpa.port))
            .await
            .expect("connect RESP");
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        wr.write_all(&command(&["AUTH", MANAGEMENT_KEY]))
            .await
            .expect("AUTH");
        assert_eq!(
            read_reply(&mut rd).await,
            Some(Reply::Simple("OK".into())),
            "AUTH"
        );
        wr.write_all(&command(&["SUBSCRIBE", channel]))
            .await
            .expect("SUBSCRIBE");
        let confirmed = read_reply(&mut rd).await;
        let want = Reply::Array(Some(vec![
            Reply::Bulk(Some(b"subscribe".to_vec())),
            Reply::Bulk(Some(channel.as_bytes().to_vec())),
            Reply::Int(1),
        ]));
        assert_eq!(confirmed, Some(want), "SUBSCRIBE {channel}");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&messages);
        let task = tokio::spawn(async move {
            let _wr = wr; // closing the write half would end the subscription
            while let Some(reply) = read_reply(&mut rd).await {
                if let Reply::Array(Some(items)) = reply {
                    if let [Reply::Bulk(Some(kind)), _, Reply::Bulk(Some(payload))] = &items[..] {
                        if kind == b"message" {
                            let text = String::from_utf8_lossy(payload).into_owned();
                            kept.lock().expect("messages").push(text);
                        }
                    }
                }
            }
        });
        Collector { messages, task }
    }

    /// Every message payload received, in order (control payloads included).
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().expect("messages").clone()
    }

    /// The usage records received: messages with a `timestamp` (control payloads have none).
    pub fn records(&self) -> Vec<String> {
        self.messages()
            .into_iter()
            .filter(|m| {
                serde_json::from_str::<Value>(m)
                    .map(|v| v.get("timestamp").is_some())
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Waits until `n` usage records arrived.
    pub async fn wait_records(&self, n: usize, timeout: Duration) -> bool {
        super::eventually(timeout, async || self.records().len() >= n).await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
