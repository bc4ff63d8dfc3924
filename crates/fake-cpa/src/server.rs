//! A fake CPA management server that reproduces the HTTP behaviour described in
//! `shared/cpa/API.md` (usage queue, settings, auth middleware with bans, gin's 404s), so the
//! exporter can be exercised end to end without a real CPA binary.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::api_keys::{usage_json, SimApiKey};
use super::credentials::{attempt_of, compact_listing_json, listing_json, SimCredential};
use super::error_events;
use super::pubsub::{raw_payload, Channel, REFRESH};
use super::workload::{rfc3339_nano, CLIENT_API_KEYS};

// CPA's RESP side of the same port; a child module so it shares the queue, the ban and the stats.
#[path = "resp.rs"]
mod resp;

/// Failed logins from one IP before it is banned (CPA's `maxFailures`).
const MAX_FAILURES: u32 = 5;
/// How long a ban lasts (CPA's `banDuration`).
const BAN_DURATION: Duration = Duration::from_secs(30 * 60);
const COMMIT: &str = "4e7b1c9";
const BUILD_DATE: &str = "2026-08-22T10:04:11Z";
const JSON_TYPE: &str = "application/json; charset=utf-8";

type Resp = Response<Full<Bytes>>;

/// Which management route families the simulated CPA exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    /// CPA v6.10.8 .. v7.x: only `/v0/management/...`.
    V0,
    /// CPA v8 with the deprecated v0 routes removed.
    V8,
    /// CPA v8 with the deprecated v0 routes still present.
    Both,
}

impl Routes {
    fn v0(self) -> bool {
        matches!(self, Routes::V0 | Routes::Both)
    }
    fn v8(self) -> bool {
        matches!(self, Routes::V8 | Routes::Both)
    }
}

/// Runtime configuration of the fake CPA (the subset of CPA's config that matters here).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Management secret; empty disables management (every management route: 404, empty body).
    pub management_key: String,
    pub routes: Routes,
    /// Queue retention; applied in whole seconds: 0 means 60 s, capped at 3600 s.
    pub retention: Duration,
    /// When false, pushes are dropped and the settings routes report `false`.
    pub usage_statistics_enabled: bool,
    /// Treat loopback clients as remote (to exercise `remote management disabled`).
    pub clients_are_remote: bool,
    /// `remote-management.allow-remote`.
    pub allow_remote: bool,
    /// Value of the `X-CPA-VERSION` header.
    pub version: String,
    /// The credentials listing (v0 `auth-files`, v8 `credentials`).
    pub credentials: Vec<SimCredential>,
    /// Whether the API port also speaks RESP (false: as v7.1.17, whose port answers RESP bytes
    /// like a malformed HTTP request, with a 400).
    pub resp_enabled: bool,
    /// The config API keys and their counts (`api-key-usage`).
    pub api_keys: Vec<SimApiKey>,
    /// List credentials with the fields the exporter reads only (no `recent_requests`, no
    /// bookkeeping): about 140 bytes an entry, so 100 000 fit under the exporter's 16 MiB
    /// management body limit (the listing of issue 22: 100 000 entries in 13 MB).
    pub compact_listing: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            management_key: "sim-management-key".to_owned(),
            routes: Routes::Both,
            retention: Duration::from_secs(60),
            usage_statistics_enabled: true,
            clients_are_remote: false,
            allow_remote: false,
            version: "v8.0.3".to_owned(),
            credentials: Vec::new(),
            resp_enabled: true,
            api_keys: Vec::new(),
            compact_listing: false,
        }
    }
}

/// A failure injected into queue pops (after authentication).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Reply with this status and a JSON error body; nothing is popped.
    Status(u16),
    /// Pop as usual, then wait this long before answering (a client timing out loses the records,
    /// exactly as with real CPA).
    Delay(Duration),
    /// Close the connection without any response; nothing is popped.
    ResetConnection,
}

/// Snapshot of what the fake CPA has seen, for assertions.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    /// Elements currently queued (after expiring old ones).
    pub queued: usize,
    /// Records CPA emitted: queued, or published while usage subscribers were connected.
    pub pushed: u64,
    /// Elements handed out in 200 responses.
    pub popped: u64,
    pub expired: u64,
    /// Authenticated successful pops (any count, empty ones included).
    pub queue_requests: u64,
    /// Failed logins counted toward the ban (missing or wrong key).
    pub auth_failures: u64,
    pub auth_failure_times: Vec<Instant>,
    /// Requests refused because the client IP was banned.
    pub banned_requests: u64,
    /// Management requests that passed the key check (each one a bcrypt compare in CPA).
    pub authorized_requests: u64,
    /// RESP connections accepted (HTTP ones are not counted).
    pub resp_connections: u64,
    /// Successful RESP `AUTH`s: one bcrypt compare each, once per connection.
    pub resp_auths: u64,
    /// Authenticated RESP pops (`LPOP`/`RPOP usage`, empty ones included): no bcrypt compare.
    /// `queue_requests` counts HTTP pops only.
    pub resp_pops: u64,
    /// `SUBSCRIBE usage` connections subscribed now.
    pub usage_subscribers: usize,
    /// `SUBSCRIBE errors` connections subscribed now.
    pub error_subscribers: usize,
    /// Records published to usage subscribers instead of being queued (once each, however many
    /// subscribers; included in `pushed`).
    pub published: u64,
    /// Copies of records accepted into usage subscribers' buffers (2 subscribers: 2 a record).
    pub delivered: u64,
    /// Record copies written to usage subscribers' sockets (every delivered copy is written,
    /// unless its connection ends first: then it counts in `discarded`).
    pub written: u64,
    /// Record copies still buffered when their usage subscription ended (client gone, fake
    /// stopped): lost, as in CPA.
    pub discarded: u64,
    /// Usage subscribers dropped because their 256-message buffer was full. Each missed the
    /// record that found it full (and only that one: it is no longer subscribed afterwards).
    pub subscribers_dropped: u64,
    /// Records that reached nobody: published while subscribers existed, all of them full (so
    /// all dropped). Like CPA v7.2.140, the fake does not queue them either: gone. Every pushed
    /// record is either queued (then popped, expired or cleared) or published; a published one
    /// is delivered to at least one subscriber or counted here.
    pub lost: u64,
    /// `{"refresh":true}` payloads published to usage subscribers.
    pub refreshes: u64,
    /// Events published on `errors` (failed records and `push_error_raw`), subscribers or not.
    pub error_events: u64,
    /// Copies of events accepted into errors subscribers' buffers.
    pub error_delivered: u64,
    /// Event copies written to errors subscribers' sockets.
    pub error_written: u64,
    /// Errors subscribers dropped because their buffer was full.
    pub error_subscribers_dropped: u64,
}

/// CPA's in-memory FIFO: items expire lazily, `retention` after they were queued.
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<(Instant, String)>,
}

impl Queue {
    /// Drops items older than `retention`; returns how many were dropped.
    fn expire(&mut self, now: Instant, retention: Duration) -> u64 {
        let before = self.items.len();
        while let Some((queued_at, _)) = self.items.front() {
            if now.saturating_duration_since(*queued_at) <= retention {
                break;
            }
            self.items.pop_front();
        }
        (before - self.items.len()) as u64
    }

    fn pop(&mut self, count: usize) -> Vec<String> {
        let n = count.min(self.items.len());
        self.items.drain(..n).map(|(_, item)| item).collect()
    }
}

/// CPA's per-IP failed-login bookkeeping.
#[derive(Debug, Default)]
struct Attempts {
    failures: u32,
    banned_until: Option<Instant>,
}

#[derive(Debug)]
struct State {
    cfg: SimConfig,
    queue: Queue,
    fault: Option<Fault>,
    attempts: HashMap<IpAddr, Attempts>,
    stats: SimStats,
    /// RESP `SUBSCRIBE usage` subscribers.
    usage: Channel,
    /// RESP `SUBSCRIBE errors` subscribers.
    errors: Channel,
}

impl State {
    fn new(cfg: SimConfig) -> State {
        State {
            cfg,
            queue: Queue::default(),
            fault: None,
            attempts: HashMap::new(),
            stats: SimStats::default(),
            usage: Channel::default(),
            errors: Channel::default(),
        }
    }

    /// CPA's `Enqueue`: to the subscribers while there are any (even if every one of them turns
    /// out full and is dropped), else to the queue.
    fn enqueue(&mut self, now: Instant, element_text: String) {
        self.stats.pushed += 1;
        if self.usage.is_empty() {
            self.queue.items.push_back((now, element_text));
            return;
        }
        let sent = self
            .usage
            .publish(raw_payload(&element_text).as_bytes(), true);
        self.stats.published += 1;
        self.stats.delivered += sent.delivered as u64;
        self.stats.subscribers_dropped += sent.dropped as u64;
        if sent.delivered == 0 {
            self.stats.lost += 1;
        }
    }

    /// CPA's `EnqueueError`: to errors subscribers, never queued.
    fn publish_error(&mut self, event: &str) {
        let sent = self.errors.publish(event.as_bytes(), true);
        self.stats.error_events += 1;
        self.stats.error_delivered += sent.delivered as u64;
        self.stats.error_subscribers_dropped += sent.dropped as u64;
    }

    /// The errors event for a failed record, with the state of its credential.
    fn error_event_for(&self, element_json: &str) -> Option<String> {
        let record = record_of(element_json)?;
        let index = record
            .get("auth_index")
            .and_then(Value::as_str)
            .unwrap_or("");
        let listed = self
            .cfg
            .credentials
            .iter()
            .find(|c| !index.is_empty() && c.auth_index == index);
        error_events::from_record(&record, listed, &now_rfc3339())
    }

    /// CPA's rule on `redis-usage-queue-retention-seconds`: <= 0 means 60, capped at 3600.
    fn retention(&self) -> Duration {
        match self.cfg.retention.as_secs() {
            0 => Duration::from_secs(60),
            secs => Duration::from_secs(secs.min(3600)),
        }
    }

    fn expire(&mut self, now: Instant) {
        let retention = self.retention();
        self.stats.expired += self.queue.expire(now, retention);
    }

    fn record_failure(&mut self, ip: IpAddr, now: Instant) {
        self.stats.auth_failures += 1;
        self.stats.auth_failure_times.push(now);
        let attempts = self.attempts.entry(ip).or_default();
        attempts.failures += 1;
        if attempts.failures >= MAX_FAILURES {
            attempts.failures = 0;
            attempts.banned_until = Some(now + BAN_DURATION);
        }
    }
}

struct Shared {
    state: Mutex<State>,
}

/// Handle to a running fake CPA. Cheap to clone; the server stops on [`FakeCpa::shutdown`] or
/// when the last handle is dropped.
#[derive(Clone)]
pub struct FakeCpa {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
}

impl FakeCpa {
    /// Starts on an ephemeral loopback port.
    pub async fn start(cfg: SimConfig) -> io::Result<FakeCpa> {
        Self::start_on(cfg, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts on `addr`, serving from a spawned tokio task.
    pub async fn start_on(cfg: SimConfig, addr: SocketAddr) -> io::Result<FakeCpa> {
        let listener = TcpListener::bind(addr).await?;
        let mut local = listener.local_addr()?;
        if local.ip().is_unspecified() {
            local.set_ip(match local.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let state = State::new(cfg);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
        });
        let (tx, rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), rx));
        Ok(FakeCpa {
            inner: Arc::new(Inner {
                shared,
                addr: local,
                shutdown: tx,
            }),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Enqueues one element, given as the JSON text it must have inside the response array.
    /// Text that is not valid JSON is queued as a JSON string, as CPA does with such payloads.
    /// While any usage subscriber is connected it is published to them instead (never both); a
    /// failed record is also an event on `errors`.
    pub fn push_raw(&self, element_json: &str) {
        self.push_raw_all([element_json]);
    }

    /// Enqueues elements as [`FakeCpa::push_raw`] does, all at once: a pop sees none or all of
    /// them, as when CPA's requests finish between two pops.
    pub fn push_raw_all<'e>(&self, elements: impl IntoIterator<Item = &'e str>) {
        let texts: Vec<(&str, String)> = elements
            .into_iter()
            .map(|element_json| {
                let text = if serde_json::from_str::<serde::de::IgnoredAny>(element_json).is_ok() {
                    element_json.to_owned()
                } else {
                    Value::String(element_json.to_owned()).to_string()
                };
                (element_json, text)
            })
            .collect();
        let now = Instant::now();
        let mut st = self.inner.shared.lock();
        st.expire(now);
        for (element_json, text) in texts {
            // CPA counts every attempt on its credential, whether or not it publishes usage.
            if !st.cfg.credentials.is_empty() {
                if let Some((index, failed)) = attempt_of(element_json) {
                    let mut listed = st.cfg.credentials.iter_mut();
                    if let Some(c) = listed.find(|c| c.auth_index == index) {
                        let counter = if failed {
                            &mut c.failed
                        } else {
                            &mut c.success
                        };
                        *counter += 1;
                    }
                }
            }
            // CPA's queue and channels work only with a management secret.
            if st.cfg.management_key.is_empty() {
                continue;
            }
            // A failed attempt is an errors event whether or not usage statistics are on.
            if let Some(event) = st.error_event_for(element_json) {
                st.publish_error(&event);
            }
            if st.cfg.usage_statistics_enabled {
                st.enqueue(now, text);
            }
        }
    }

    /// Enqueues a record object.
    pub fn push(&self, record: &Value) {
        self.push_raw(&record.to_string());
    }

    /// Publishes a hand-made event on `errors` as is (never queued; dropped without a
    /// management secret, as CPA's `EnqueueError`).
    pub fn push_error_raw(&self, event_json: &str) {
        let mut st = self.inner.shared.lock();
        if !st.cfg.management_key.is_empty() {
            st.publish_error(event_json);
        }
    }

    /// Publishes `{"refresh":true}` to usage subscribers (CPA's `NotifyUsageRefresh`, sent when
    /// credentials change); nothing when none is subscribed.
    pub fn refresh(&self) {
        let mut st = self.inner.shared.lock();
        if st.usage.is_empty() {
            return;
        }
        st.usage.publish(REFRESH.as_bytes(), false);
        st.stats.refreshes += 1;
    }

    pub fn stats(&self) -> SimStats {
        let mut st = self.inner.shared.lock();
        st.expire(Instant::now());
        let mut stats = st.stats.clone();
        stats.queued = st.queue.items.len();
        stats.usage_subscribers = st.usage.len();
        stats.error_subscribers = st.errors.len();
        stats
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.inner.shared.lock().fault = fault;
    }

    /// Changes the management secret; an empty key disables management, clears the queue and
    /// ends every subscription (each connection writes out what it had buffered, then closes).
    pub fn set_management_key(&self, key: &str) {
        let mut st = self.inner.shared.lock();
        st.cfg.management_key = key.to_owned();
        if key.is_empty() {
            st.queue.items.clear();
            st.usage.close_all();
            st.errors.close_all();
        }
    }

    /// Replaces the credentials listing (a status change, a removal, new counters). Credentials
    /// changed: usage subscribers get `{"refresh":true}`, as from CPA.
    /// Replaces the listing; as CPA, a change (and only a change) is announced to usage
    /// subscribers with `{"refresh":true}`.
    pub fn set_credentials(&self, credentials: Vec<SimCredential>) {
        let changed = {
            let mut st = self.inner.shared.lock();
            let changed = st.cfg.credentials != credentials;
            st.cfg.credentials = credentials;
            changed
        };
        if changed {
            self.refresh();
        }
    }

    /// The credentials listing, with the counters the pushed records have bumped.
    pub fn credentials(&self) -> Vec<SimCredential> {
        self.inner.shared.lock().cfg.credentials.clone()
    }

    /// Replaces the config API keys and their counts.
    pub fn set_api_keys(&self, keys: Vec<SimApiKey>) {
        self.inner.shared.lock().cfg.api_keys = keys;
    }

    /// Toggles `usage-statistics-enabled` at runtime (as an admin would).
    pub fn set_usage_statistics_enabled(&self, enabled: bool) {
        self.inner.shared.lock().cfg.usage_statistics_enabled = enabled;
    }

    /// Stops accepting connections and drops the open ones (CPA went away).
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(serve_conn(
                    stream,
                    peer.ip(),
                    Arc::clone(&shared),
                    stop.clone(),
                ));
            }
            // Transient accept errors (e.g. EMFILE): back off briefly instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn serve_conn(
    stream: TcpStream,
    ip: IpAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    // CPA's port mux: the first byte decides RESP or HTTP.
    match resp::sniff(&stream, &shared).await {
        resp::Sniff::Resp => return resp::serve(stream, ip, shared, stop).await,
        resp::Sniff::Closed => return,
        resp::Sniff::Http => {}
    }
    let svc = service_fn(move |req| Arc::clone(&shared).handle(req, ip));
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = conn => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

/// A management endpoint (behind CPA's management middleware).
#[derive(Debug)]
enum Mgmt {
    Queue,
    Config { v8: bool },
    StatsEnabled,
    ConfigPath(Vec<String>),
    Credentials,
    ApiKeyUsage,
}

#[derive(Debug)]
enum Route {
    Health,
    Mgmt(Mgmt),
    NotFound,
}

/// gin matches method and path exactly; anything else is its default 404 (no 405s).
fn route(method: &Method, path: &str, routes: Routes) -> Route {
    if method != Method::GET {
        return Route::NotFound;
    }
    let mgmt = match path {
        "/healthz" => return Route::Health,
        "/v0/management/usage-queue" if routes.v0() => Mgmt::Queue,
        "/v0/management/config" if routes.v0() => Mgmt::Config { v8: false },
        "/v0/management/usage-statistics-enabled" if routes.v0() => Mgmt::StatsEnabled,
        "/v8/management/observability/usage/queue" if routes.v8() => Mgmt::Queue,
        "/v8/management/config" if routes.v8() => Mgmt::Config { v8: true },
        "/v0/management/auth-files" if routes.v0() => Mgmt::Credentials,
        "/v8/management/credentials" if routes.v8() => Mgmt::Credentials,
        "/v0/management/api-key-usage" if routes.v0() => Mgmt::ApiKeyUsage,
        "/v8/management/observability/usage/api-keys" if routes.v8() => Mgmt::ApiKeyUsage,
        _ if routes.v8() => match path.strip_prefix("/v8/management/config/") {
            Some(rest) => Mgmt::ConfigPath(
                rest.split('/')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            None => return Route::NotFound,
        },
        _ => return Route::NotFound,
    };
    Route::Mgmt(mgmt)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, ip: IpAddr) -> io::Result<Resp> {
        let routes = self.lock().cfg.routes;
        match route(req.method(), req.uri().path(), routes) {
            Route::Health => Ok(json_resp(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())),
            Route::NotFound => Ok(respond(
                StatusCode::NOT_FOUND,
                Some("text/plain"),
                "404 page not found",
            )),
            Route::Mgmt(mgmt) => {
                let mut resp = match self.refusal(req.headers(), ip) {
                    Some(refused) => refused,
                    None => self.serve(mgmt, req.uri().query()).await?,
                };
                let version = self.lock().cfg.version.clone();
                add_version_headers(&mut resp, &version);
                Ok(resp)
            }
        }
    }

    /// CPA's management middleware, in CPA's order: disabled, banned, remote, key. Returns the
    /// refusal, or `None` when the request may proceed.
    fn refusal(&self, headers: &HeaderMap, ip: IpAddr) -> Option<Resp> {
        let now = Instant::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.cfg.management_key.is_empty() {
            return Some(respond(StatusCode::NOT_FOUND, None, ""));
        }
        let attempts = st.attempts.entry(ip).or_default();
        if let Some(until) = attempts.banned_until {
            if now < until {
                st.stats.banned_requests += 1;
                let msg = format!(
                    "IP banned due to too many failed attempts. Try again in {}",
                    go_duration(until - now)
                );
                return Some(error_json(StatusCode::FORBIDDEN, &msg));
            }
            *attempts = Attempts::default();
        }
        let remote = st.cfg.clients_are_remote || !ip.to_canonical().is_loopback();
        if remote && !st.cfg.allow_remote {
            return Some(error_json(
                StatusCode::FORBIDDEN,
                "remote management disabled",
            ));
        }
        let msg = match provided_key(headers) {
            Some(key) if key == st.cfg.management_key => {
                st.attempts.remove(&ip);
                st.stats.authorized_requests += 1;
                return None;
            }
            Some(_) => "invalid management key",
            None => "missing management key",
        };
        st.record_failure(ip, now);
        Some(error_json(StatusCode::UNAUTHORIZED, msg))
    }

    async fn serve(&self, mgmt: Mgmt, query: Option<&str>) -> io::Result<Resp> {
        let cfg = self.lock().cfg.clone();
        let body = match mgmt {
            Mgmt::Queue => return self.serve_queue(query).await,
            Mgmt::Config { v8 } => config_json(&cfg, v8),
            Mgmt::Credentials if cfg.compact_listing => compact_listing_json(&cfg.credentials),
            Mgmt::Credentials => listing_json(&cfg.credentials),
            Mgmt::ApiKeyUsage => usage_json(&cfg.api_keys),
            Mgmt::StatsEnabled => {
                json!({ "usage-statistics-enabled": cfg.usage_statistics_enabled })
            }
            Mgmt::ConfigPath(segments) => {
                let full = config_json(&cfg, true);
                match segments
                    .iter()
                    .try_fold(&full, |v, seg| v.get(seg.as_str()))
                {
                    Some(found) => found.clone(),
                    None => {
                        return Ok(error_json(StatusCode::NOT_FOUND, "config path not found"));
                    }
                }
            }
        };
        Ok(json_resp(StatusCode::OK, body.to_string()))
    }

    async fn serve_queue(&self, query: Option<&str>) -> io::Result<Resp> {
        let fault = self.lock().fault.clone();
        let delay = match fault {
            Some(Fault::Status(code)) => {
                let status =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return Ok(error_json(status, &format!("simulated fault: HTTP {code}")));
            }
            Some(Fault::ResetConnection) => {
                // An Err from the service makes hyper drop the connection without a response.
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "simulated reset",
                ));
            }
            Some(Fault::Delay(d)) => Some(d),
            None => None,
        };
        let Some(count) = parse_count(query) else {
            return Ok(error_json(
                StatusCode::BAD_REQUEST,
                "count must be a positive integer",
            ));
        };
        let items = {
            let mut st = self.lock();
            st.expire(Instant::now());
            let items = st.queue.pop(count);
            st.stats.popped += items.len() as u64;
            st.stats.queue_requests += 1;
            items
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        Ok(json_resp(StatusCode::OK, format!("[{}]", items.join(","))))
    }
}

/// The runtime config as CPA's config endpoints render it (YAML key names). Like real CPA it
/// includes the client API keys in plaintext, so tests can check the exporter never leaks them.
fn config_json(cfg: &SimConfig, v8: bool) -> Value {
    let usage = json!({
        "usage-statistics-enabled": cfg.usage_statistics_enabled,
        "redis-usage-queue-retention-seconds": cfg.retention.as_secs(),
    });
    let mut config = json!({
        "host": "",
        "port": 8317,
        "debug": false,
        "logging-to-file": false,
        "proxy-url": "",
        "request-retry": 3,
        "auth-dir": "~/.cli-proxy-api",
        "ws-auth": false,
        "api-keys": CLIENT_API_KEYS,
        "quota-exceeded": { "switch-project": true, "switch-preview-model": true },
        "remote-management": { "allow-remote": cfg.allow_remote, "disable-control-panel": false },
    });
    if let (Value::Object(map), Value::Object(usage)) = (&mut config, usage) {
        if v8 {
            map.insert("observability".to_owned(), json!({ "usage": usage }));
        } else {
            map.extend(usage);
        }
    }
    config
}

/// Key from `Authorization: Bearer <key>` (any scheme case; a non-bearer value is taken whole)
/// or, failing that, `X-Management-Key`. `None` when no non-empty key was sent.
fn provided_key(headers: &HeaderMap) -> Option<String> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .filter(|v| !v.is_empty())
    };
    let from_auth = text(AUTHORIZATION.as_str()).and_then(|auth| match auth.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => {
            Some(key.to_owned()).filter(|k| !k.is_empty())
        }
        _ => Some(auth),
    });
    from_auth.or_else(|| text("x-management-key"))
}

/// `count`: absent or empty means 1; otherwise an integer > 0 (Go `strconv.Atoi` syntax).
fn parse_count(query: Option<&str>) -> Option<usize> {
    match query.and_then(|q| query_param(q, "count")) {
        None | Some("") => Some(1),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
    }
}

/// First value of `name` in a query string (the exporter never percent-encodes `count`).
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A usage record as an object (string-wrapped ones are looked into).
fn record_of(element_json: &str) -> Option<Value> {
    match serde_json::from_str::<Value>(element_json).ok()? {
        Value::String(inner) => serde_json::from_str::<Value>(&inner).ok(),
        record => Some(record),
    }
}

/// The wall clock as Go's RFC 3339 with nanoseconds.
fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    rfc3339_nano(now)
}

/// Go's `time.Duration.Round(time.Second).String()` for non-negative durations: `29m41s`.
fn go_duration(d: Duration) -> String {
    let secs = (d.as_millis() + 500) / 1000;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

fn respond(status: StatusCode, content_type: Option<&'static str>, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Some(ct) = content_type {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    resp
}

fn json_resp(status: StatusCode, body: String) -> Resp {
    respond(status, Some(JSON_TYPE), body)
}

/// gin's `AbortWithStatusJSON(status, gin.H{"error": msg})`.
fn error_json(status: StatusCode, msg: &str) -> Resp {
    json_resp(status, json!({ "error": msg }).to_string())
}

fn add_version_headers(resp: &mut Resp, version: &str) {
    let headers = resp.headers_mut();
    let version = HeaderValue::from_str(version).unwrap_or(HeaderValue::from_static("dev"));
    headers.insert("x-cpa-version", version);
    headers.insert("x-cpa-commit", HeaderValue::from_static(COMMIT));
    headers.insert("x-cpa-build-date", HeaderValue::from_static(BUILD_DATE));
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sim-management-key";
    const Q0: &str = "/v0/management/usage-queue";
    const Q8: &str = "/v8/management/observability/usage/queue";

    async fn get(cpa: &FakeCpa, path: &str, key: Option<&str>) -> (u16, HeaderMap, String) {
        let mut req = reqwest::Client::new().get(format!("{}{path}", cpa.url()));
        if let Some(key) = key {
            req = req.header("Authorization", format!("bEaReR {key}"));
        }
        let resp = req.send().await.expect("request");
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, headers, resp.text().await.expect("body"))
    }

    async fn start(cfg: SimConfig) -> FakeCpa {
        FakeCpa::start(cfg).await.expect("start")
    }

    #[tokio::test]
    async fn api_key_usage_on_both_route_families() {
        let mut key = SimApiKey::new("fakeup", "http://up/v1", "sk-up");
        key.success = 2;
        let cpa = start(SimConfig {
            api_keys: vec![key],
            ..SimConfig::default()
        })
        .await;
        for path in [
            "/v0/management/api-key-usage",
            "/v8/management/observability/usage/api-keys",
        ] {
            let (s, _, body) = get(&cpa, path, Some(KEY)).await;
            assert_eq!(s, 200, "{path}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["fakeup"]["http://up/v1|sk-up"]["success"], 2);
        }
        assert_eq!(cpa.stats().authorized_requests, 2);
    }

    #[tokio::test]
    async fn pop_is_destructive_fifo_and_verbatim() {
        let cpa = start(SimConfig::default()).await;
        for e in [r#"{"n":1}"#, r#""{\"n\":2}""#, "7", "not json"] {
            cpa.push_raw(e);
        }
        let (s, _, body) = get(&cpa, &format!("{Q8}?count=2"), Some(KEY)).await;
        assert_eq!((s, body.as_str()), (200, r#"[{"n":1},"{\"n\":2}"]"#));
        let (_, _, body) = get(&cpa, &format!("{Q0}?count=100"), Some(KEY)).await;
        assert_eq!(body, r#"[7,"not json"]"#);
        assert_eq!(get(&cpa, Q8, Some(KEY)).await.2, "[]");
        let stats = cpa.stats();
        assert_eq!(
            (stats.pushed, stats.popped, stats.queue_requests),
            (4, 4, 3)
        );
    }

    #[tokio::test]
    async fn count_must_be_a_positive_integer() {
        let cpa = start(SimConfig::default()).await;
        cpa.push_raw("1");
        cpa.push_raw("2");
        for bad in ["0", "-1", "abc", "1.5"] {
            let (s, _, body) = get(&cpa, &format!("{Q0}?count={bad}"), Some(KEY)).await;
            assert_eq!(s, 400);
            assert_eq!(body, r#"{"error":"count must be a positive integer"}"#);
        }
        assert_eq!(get(&cpa, Q0, Some(KEY)).await.2, "[1]");
        assert_eq!(cpa.stats().queued, 1);
    }

    #[test]
    fn retention_expires_lazily_in_whole_seconds() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.items.push_back((t0, "1".into()));
        q.items
            .push_back((t0 + Duration::from_secs(30), "2".into()));
        let ret = Duration::from_secs(60);
        assert_eq!(q.expire(t0 + Duration::from_secs(60), ret), 0);
        assert_eq!(q.expire(t0 + Duration::from_secs(61), ret), 1);
        assert_eq!(q.pop(5), vec!["2".to_owned()]);
        let mut st = State::new(SimConfig::default());
        st.queue = q;
        for (cfg, eff) in [(0, 60), (1, 1), (500, 500), (7200, 3600)] {
            st.cfg.retention = Duration::from_millis(cfg * 1000 + 400);
            assert_eq!(st.retention(), Duration::from_secs(eff));
        }
    }

    #[tokio::test]
    async fn disabled_management_vs_unknown_route() {
        let cpa = start(SimConfig::default()).await;
        cpa.push_raw("1");
        cpa.set_management_key("");
        assert_eq!(cpa.stats().queued, 0, "disabling clears the queue");
        let (s, h, body) = get(&cpa, Q8, Some(KEY)).await;
        assert_eq!((s, body.as_str()), (404, ""));
        assert!(h.contains_key("x-cpa-version"));
        let (s, h, body) = get(&cpa, "/v0/management/nope", Some(KEY)).await;
        assert_eq!((s, body.as_str()), (404, "404 page not found"));
        assert!(!h.contains_key("x-cpa-version"));
        assert_eq!(get(&cpa, "/healthz", None).await.2, r#"{"status":"ok"}"#);
    }

    #[tokio::test]
    async fn auth_failures_then_ban() {
        let cfg = SimConfig {
            version: "v7.2.140".into(),
            ..SimConfig::default()
        };
        let cpa = start(cfg).await;
        let (s, h, body) = get(&cpa, Q0, None).await;
        assert_eq!(
            (s, body.as_str()),
            (401, r#"{"error":"missing management key"}"#)
        );
        assert_eq!(h["x-cpa-version"], "v7.2.140");
        assert!(h.contains_key("x-cpa-commit") && h.contains_key("x-cpa-build-date"));
        let resp = reqwest::Client::new()
            .get(format!("{}{Q0}", cpa.url()))
            .header("X-Management-Key", KEY)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "X-Management-Key works; success resets");
        for _ in 0..5 {
            let (s, _, body) = get(&cpa, Q0, Some("wrong")).await;
            assert_eq!(
                (s, body.as_str()),
                (401, r#"{"error":"invalid management key"}"#)
            );
        }
        let (s, h, body) = get(&cpa, "/v0/management/config", Some(KEY)).await;
        assert_eq!(s, 403);
        assert!(h.contains_key("x-cpa-version"));
        let prefix = r#"{"error":"IP banned due to too many failed attempts. Try again in "#;
        assert!(body.starts_with(prefix), "{body}");
        assert!(
            body.ends_with(r#"m0s"}"#) || body.ends_with(r#"m59s"}"#),
            "{body}"
        );
        let stats = cpa.stats();
        assert_eq!((stats.auth_failures, stats.banned_requests), (6, 1));
        assert_eq!(stats.auth_failure_times.len(), 6);
        assert_eq!(go_duration(Duration::from_millis(1_781_400)), "29m41s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_millis(400)), "0s");
    }

    #[tokio::test]
    async fn remote_clients_need_allow_remote() {
        let cfg = SimConfig {
            clients_are_remote: true,
            ..SimConfig::default()
        };
        let cpa = start(cfg.clone()).await;
        let (s, _, body) = get(&cpa, Q0, None).await;
        assert_eq!(
            (s, body.as_str()),
            (403, r#"{"error":"remote management disabled"}"#)
        );
        assert_eq!(cpa.stats().auth_failures, 0);
        let cpa = start(SimConfig {
            allow_remote: true,
            ..cfg
        })
        .await;
        assert_eq!(get(&cpa, Q0, Some(KEY)).await.0, 200);
    }

    #[tokio::test]
    async fn route_families_and_settings() {
        for (routes, v0, v8) in [
            (Routes::V0, 200, 404),
            (Routes::V8, 404, 200),
            (Routes::Both, 200, 200),
        ] {
            let cpa = start(SimConfig {
                routes,
                ..SimConfig::default()
            })
            .await;
            assert_eq!(get(&cpa, Q0, Some(KEY)).await.0, v0);
            assert_eq!(get(&cpa, "/v0/management/config", Some(KEY)).await.0, v0);
            assert_eq!(get(&cpa, Q8, Some(KEY)).await.0, v8);
            assert_eq!(get(&cpa, "/v8/management/config", Some(KEY)).await.0, v8);
        }
        let cpa = start(SimConfig::default()).await;
        let parse = |s: String| serde_json::from_str::<Value>(&s).expect("json");
        let v0 = parse(get(&cpa, "/v0/management/config", Some(KEY)).await.2);
        assert_eq!(v0["usage-statistics-enabled"], true);
        assert_eq!(v0["redis-usage-queue-retention-seconds"], 60);
        assert_eq!(v0["api-keys"][0], CLIENT_API_KEYS[0]);
        let v8 = parse(get(&cpa, "/v8/management/config", Some(KEY)).await.2);
        let expected =
            json!({"usage-statistics-enabled": true, "redis-usage-queue-retention-seconds": 60});
        assert_eq!(v8["observability"]["usage"], expected);
        for path in ["observability/usage/", "observability/usage"] {
            let body = get(&cpa, &format!("/v8/management/config/{path}"), Some(KEY)).await;
            assert_eq!(parse(body.2), expected);
        }
        let flag = get(&cpa, "/v0/management/usage-statistics-enabled", Some(KEY)).await;
        assert_eq!(flag.2, r#"{"usage-statistics-enabled":true}"#);
    }

    #[tokio::test]
    async fn faults_and_disabled_statistics() {
        let cpa = start(SimConfig {
            usage_statistics_enabled: false,
            ..SimConfig::default()
        })
        .await;
        cpa.push_raw("1");
        assert_eq!(cpa.stats().queued, 0, "statistics off: nothing is queued");
        cpa.set_usage_statistics_enabled(true);
        cpa.push_raw("1");
        cpa.set_fault(Some(Fault::Status(503)));
        assert_eq!(get(&cpa, Q8, Some(KEY)).await.0, 503);
        cpa.set_fault(Some(Fault::ResetConnection));
        let err = reqwest::Client::new()
            .get(format!("{}{Q8}", cpa.url()))
            .bearer_auth(KEY)
            .send()
            .await;
        assert!(err.is_err());
        assert_eq!(cpa.stats().queued, 1, "faults pop nothing");
        cpa.set_fault(Some(Fault::Delay(Duration::from_millis(50))));
        assert_eq!(get(&cpa, Q8, Some(KEY)).await.2, "[1]");
        cpa.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(reqwest::get(format!("{}/healthz", cpa.url()))
            .await
            .is_err());
    }
}
