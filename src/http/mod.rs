//! HTTP endpoints: `/` (landing page), `/metrics`, `/healthz` (alive), `/readyz` (store healthy
//! and CPA polled recently).
//!
//! Optional protection from an exporter-toolkit web configuration file ([`web_config`]): TLS
//! with certificate reload ([`tls`]), basic auth and a bearer token ([`auth`]). `/healthz`
//! always stays open, so liveness probes need no credentials; every other path (including
//! unknown ones) answers 401 with `WWW-Authenticate` without valid credentials.
//!
//! A slow or hostile client cannot hold the server ([`ConnLimits`]):
//! - at most `max_connections` are served at once; every connection is accepted at once, and
//!   when all slots are taken, a newcomer whose request has arrived evicts the connection idle
//!   the longest (no request in progress, no byte received lately; [`conns`]), so idle or
//!   trickling connections make room for a scraper instead of making it queue; newcomers that
//!   send nothing wait (at most two per slot, each for at most `header_read_timeout`);
//! - the TLS handshake, and each request's headers, must arrive within `header_read_timeout`;
//!   the same bound closes a keep-alive connection idle between requests;
//! - a connection older than `max_age` is asked to close after the response in progress (an idle
//!   one closes at once), and is dropped `close_grace` later whatever it is doing, so a client
//!   that never reads its response frees its slot within `max_age + close_grace`.
//!
//! `/metrics` is streamed ([`crate::metrics::render`]): at most [`MAX_RENDERS`] bodies are
//! produced at once, each in chunks, so memory per scrape is bounded by a chunk, not by the
//! series. A scrape that finds them all busy waits until its
//! `X-Prometheus-Scrape-Timeout-Seconds` (or [`DEFAULT_SCRAPE_TIMEOUT`]) and then gets 503;
//! a body still unsent at that deadline is cut off (the connection is reset, so a truncated
//! body never looks complete).

pub mod auth;
mod conns;
pub mod tls;
pub mod web_config;

use std::convert::Infallible;
use std::io::Write;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use flate2::write::GzEncoder;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{
    HeaderName, HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER,
    VARY, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use crate::metrics::render::render;
use crate::metrics::text::{accepts_gzip, Format};
use crate::metrics::Shared;
use crate::time::unix_now;

pub use web_config::{WebConfig, WebConfigError};

/// Bodies of `/metrics` produced at once; more scrapes wait for one to finish.
pub const MAX_RENDERS: usize = 3;
/// How long a scrape without `X-Prometheus-Scrape-Timeout-Seconds` may wait for a render and
/// take to receive its body (Prometheus' default scrape timeout is 10 s).
pub const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an evicted connection may take to flush a response it has finished.
const EVICT_GRACE: Duration = Duration::from_millis(500);
/// The longest scrape timeout honoured.
const MAX_SCRAPE_TIMEOUT: Duration = Duration::from_secs(300);
const SCRAPE_TIMEOUT_HEADER: &str = "x-prometheus-scrape-timeout-seconds";

/// Every response body: whole for small answers, streamed for `/metrics`.
type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// Bounds on what one client can hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// The TLS handshake, and each request's headers, must arrive within this time; also the
    /// idle time allowed between two requests on a keep-alive connection.
    pub header_read_timeout: Duration,
    /// Age at which a connection is asked to close after its current response.
    pub max_age: Duration,
    /// How long after `max_age` a connection is dropped regardless.
    pub close_grace: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 128,
            header_read_timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(60),
            close_grace: Duration::from_secs(30),
        }
    }
}

/// How the endpoints are protected (from `--web.config.file`); the default protects nothing.
#[derive(Default)]
pub struct Protection {
    tls: Option<tls::TlsReloader>,
    auth: Option<auth::Authenticator>,
    /// Added to every response (`http_server_config.headers`).
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Protection {
    /// Read the web configuration file and everything it names (certificate, key, client CA,
    /// bearer token). Any problem stops the exporter at start, naming the key at fault.
    pub fn load(path: &Path) -> Result<Protection, WebConfigError> {
        Protection::from_config(WebConfig::load(path)?)
    }

    pub fn from_config(config: WebConfig) -> Result<Protection, WebConfigError> {
        let err = |problem: String| WebConfigError {
            path: config.path.clone(),
            problem,
        };
        let tls = config
            .tls
            .clone()
            .map(tls::TlsReloader::new)
            .transpose()
            .map_err(err)?;
        let auth = if config.requires_auth() {
            Some(
                auth::Authenticator::new(
                    config.basic_auth_users.clone(),
                    config.bearer_token_file.clone(),
                )
                .map_err(err)?,
            )
        } else {
            None
        };
        Ok(Protection {
            tls,
            auth,
            headers: config.headers,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn requires_auth(&self) -> bool {
        self.auth.is_some()
    }
}

#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    /// One permit per render in progress.
    renders: Arc<Semaphore>,
    /// `/readyz` fails when the last successful poll is older than this.
    ready_window: Duration,
    protection: Arc<Protection>,
}

pub struct ServeOptions {
    /// `/readyz` fails when the last successful poll is older than this.
    pub ready_window: Duration,
    pub protection: Protection,
    pub limits: ConnLimits,
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    options: ServeOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = options.limits;
    let ctx = Ctx {
        shared,
        renders: Arc::new(Semaphore::new(MAX_RENDERS)),
        ready_window: options.ready_window,
        protection: Arc::new(options.protection),
    };
    if ctx.protection.requires_auth() && !ctx.protection.is_tls() {
        warn!("the endpoints require credentials but TLS is off: credentials cross the network in clear text (add tls_server_config to the web config)");
    }
    let table = conns::Table::new(limits.max_connections);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        let table = table.clone();
        tokio::spawn(async move {
            let tls = ctx.protection.tls.is_some();
            let Some(slot) = admit(&table, &stream, tls, limits.header_read_timeout).await else {
                debug!("connection closed: no slot and no request");
                return;
            };
            let conn = slot.conn.clone();
            let stream = conns::Tracked {
                io: stream,
                conn: conn.clone(),
            };
            match &ctx.protection.tls {
                None => serve_connection(stream, ctx, conn, limits).await,
                Some(tls) => {
                    let acceptor = tls.acceptor();
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(stream)) => serve_connection(stream, ctx, conn, limits).await,
                            Ok(Err(e)) => debug!("TLS handshake failed: {e}"),
                            Err(_) => debug!("TLS handshake timed out"),
                        },
                        () = conn.evict.notified() => debug!("connection evicted during its TLS handshake"),
                    }
                }
            }
            drop(slot);
        });
    }
}

/// How often a connection waiting for a slot is looked at again.
const WAIT_POLL: Duration = Duration::from_millis(50);
/// How long a connection may wait for its request when too many are waiting already.
const NO_PLACE_GRACE: Duration = Duration::from_millis(200);

/// Whether the client's whole request head (or, with TLS, its first handshake record) has
/// arrived; `None` when the client has closed the connection.
async fn request_ready(stream: &tokio::net::TcpStream, tls: bool) -> Option<bool> {
    let mut buf = vec![0u8; 8192];
    let n = match tokio::time::timeout(Duration::ZERO, stream.peek(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return None,
        Ok(Ok(n)) => n,
        Err(_) => return Some(false),
    };
    let head = &buf[..n];
    Some(if tls {
        // A TLS record: type, version (2 bytes), length (2 bytes), then the handshake.
        head.len() >= 5 && head.len() >= 5 + usize::from(u16::from_be_bytes([head[3], head[4]]))
    } else {
        memchr::memmem::find(head, b"\r\n\r\n").is_some()
    })
}

/// A slot for an accepted connection (see [`conns`]): `None` closes it.
async fn admit(
    table: &Arc<conns::Table>,
    stream: &tokio::net::TcpStream,
    tls: bool,
    timeout: Duration,
) -> Option<conns::Slot> {
    let waiting = table.wait();
    let deadline = tokio::time::Instant::now()
        + if waiting.is_some() {
            timeout
        } else {
            NO_PLACE_GRACE
        };
    loop {
        let freed = table.freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let ready = request_ready(stream, tls).await?;
        if let Some(slot) = table.try_admit(ready) {
            return Some(slot);
        }
        tokio::select! {
            () = freed => {},
            () = tokio::time::sleep(WAIT_POLL) => {},
            () = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// Serve HTTP/1.1 on one connection within the bounds of `limits`.
async fn serve_connection<I>(io: I, ctx: Ctx, conn: Arc<conns::Conn>, limits: ConnLimits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let evicted = conn.clone();
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let busy = conn.busy();
        async move {
            let resp = respond(&ctx, req).await;
            let status = resp.status();
            busy.answered(matches!(
                status,
                StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
            ));
            // The connection counts as busy until the body is sent.
            Ok::<_, Infallible>(resp.map(|body| {
                TrackedBody {
                    inner: body,
                    _busy: busy,
                }
                .boxed()
            }))
        }
    });
    let http = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(http);
    let mut conn = http;
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = evicted.evict.notified() => {
            // Close at once if idle; let a response that is still being flushed finish.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(EVICT_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    debug!("idle connection evicted for a new one");
                    return;
                }
            }
        }
        _ = tokio::time::sleep(limits.max_age) => {
            // Finish the response in progress (an idle connection closes at once)...
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.close_grace, conn.as_mut()).await {
                Ok(r) => r,
                // ...but a client that does not read it loses the connection.
                Err(_) => {
                    debug!("connection dropped: still busy past its maximum age");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        debug!("connection ended: {e}");
    }
}

/// A response body that keeps its connection marked busy until it is sent (or dropped).
struct TrackedBody {
    inner: Body,
    _busy: conns::Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn respond(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let verdict = match &ctx.protection.auth {
        Some(auth) if req.uri().path() != "/healthz" => auth.check(req.headers()).await,
        _ => auth::Verdict::Allowed,
    };
    let mut resp = match verdict {
        auth::Verdict::Allowed => handle(ctx, &req).await,
        auth::Verdict::Denied => {
            debug!(path = req.uri().path(), "request without valid credentials");
            let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
            if let Some(auth) = &ctx.protection.auth {
                for challenge in &auth.challenges {
                    r.headers_mut().append(WWW_AUTHENTICATE, challenge.clone());
                }
            }
            r
        }
        auth::Verdict::Busy => {
            debug!("password checks saturated: answered 429");
            let mut r = text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many password checks in progress; retry\n",
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    };
    for (name, value) in &ctx.protection.headers {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(ctx: &Ctx, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/metrics" => metrics(ctx, req).await,
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match not_ready_reason(ctx) {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/" => landing(ctx),
        _ => text(StatusCode::NOT_FOUND, "not found; see /metrics\n"),
    }
}

fn not_ready_reason(ctx: &Ctx) -> Option<String> {
    let live = &ctx.shared.live;
    if let Some(why) = live.store_lost() {
        return Some(why);
    }
    if !live.store_healthy() {
        return Some("the state database cannot commit".into());
    }
    match live.last_success() {
        None => Some("CPA has not been polled successfully yet".into()),
        Some(t) if unix_now() - t > ctx.ready_window.as_secs_f64() => Some(format!(
            "no successful poll of CPA for {:.0}s",
            unix_now() - t
        )),
        Some(_) => None,
    }
}

fn header(req: &Request<Incoming>, name: hyper::header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The scraper's timeout, from Prometheus' header, within sane bounds.
fn scrape_timeout(req: &Request<Incoming>) -> Duration {
    header(req, HeaderName::from_static(SCRAPE_TIMEOUT_HEADER))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(DEFAULT_SCRAPE_TIMEOUT, |s| {
            Duration::from_secs_f64(s.min(MAX_SCRAPE_TIMEOUT.as_secs_f64()))
        })
}

async fn metrics(ctx: &Ctx, req: &Request<Incoming>) -> Response<Body> {
    let format = Format::negotiate(header(req, ACCEPT));
    let gzip = accepts_gzip(header(req, ACCEPT_ENCODING));
    let deadline = tokio::time::Instant::now() + scrape_timeout(req);
    let permit = match tokio::time::timeout_at(deadline, ctx.renders.clone().acquire_owned()).await
    {
        Ok(Ok(permit)) => permit,
        _ => {
            debug!("scrape answered 503: every render slot stayed busy until its timeout");
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many scrapes at once; try again\n",
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    };
    let (tx, rx) = mpsc::channel(2);
    let complete = Arc::new(AtomicBool::new(false));
    let body = ChannelBody {
        rx,
        complete: complete.clone(),
    };
    let shared = ctx.shared.clone();
    let handle = tokio::runtime::Handle::current();
    // Rendering is CPU-bound: it runs on the blocking pool, so the server's few async workers
    // keep answering /healthz and /readyz, and waits there while the network takes each chunk.
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut out = ChannelWriter {
            tx,
            handle,
            deadline,
        };
        let done = if gzip {
            let mut gz = GzEncoder::new(&mut out, flate2::Compression::fast());
            render(&shared, format, &mut gz).and_then(|()| gz.finish().map(|_| ()))
        } else {
            render(&shared, format, &mut out)
        };
        match done {
            Ok(()) => complete.store(true, Ordering::Release),
            Err(e) => debug!("scrape body cut off: {e}"),
        }
    });
    let mut resp = Response::new(body.boxed());
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    headers.insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
    resp
}

/// Chunks from the render thread to the connection.
struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    handle: tokio::runtime::Handle,
    deadline: tokio::time::Instant,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let send =
            tokio::time::timeout_at(self.deadline, self.tx.send(Bytes::copy_from_slice(buf)));
        match self.handle.block_on(send) {
            Ok(Ok(())) => Ok(buf.len()),
            Ok(Err(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the scraper went away",
            )),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the scrape timeout passed before the body was sent",
            )),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The streamed `/metrics` body. If the render stops before the end, the body ends with an
/// error, so hyper resets the connection instead of closing the chunked body as if complete.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    complete: Arc<AtomicBool>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            Poll::Ready(None) if self.complete.load(Ordering::Acquire) => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(std::io::Error::other(
                "the exposition was cut off",
            )))),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn landing(ctx: &Ctx) -> Response<Body> {
    let live = &ctx.shared.live;
    let cpa = match live.last_success() {
        Some(t) if live.cpa_up.get() == 1 => {
            format!("up (last poll {:.0}s ago)", (unix_now() - t).max(0.0))
        }
        Some(t) => format!(
            "DOWN (last successful poll {:.0}s ago)",
            (unix_now() - t).max(0.0)
        ),
        None => "not polled successfully yet".to_owned(),
    };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>CPA usage exporter</title></head>\
         <body><h1>CPA usage exporter</h1><p>Version {version}. CPA: {cpa}. Ready: {ready}.</p>\
         <ul><li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/healthz\">/healthz</a></li>\
         <li><a href=\"/readyz\">/readyz</a></li></ul></body></html>\n",
        version = env!("CARGO_PKG_VERSION"),
        ready = if not_ready_reason(ctx).is_none() { "yes" } else { "no" },
    );
    let mut r = Response::new(full(html));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}
