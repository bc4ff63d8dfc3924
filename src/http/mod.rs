//! HTTP endpoints: `/` (landing page), `/metrics`, `/healthz` (alive), `/readyz` (store healthy
//! and CPA polled recently).
//!
//! Optional protection from an exporter-toolkit web configuration file ([`web_config`]): TLS
//! with certificate reload ([`tls`]), basic auth and a bearer token ([`auth`]). `/healthz`
//! always stays open, so liveness probes need no credentials; every other path (including
//! unknown ones) answers 401 with `WWW-Authenticate` without valid credentials.
//!
//! A slow or hostile client cannot hold the server ([`ConnLimits`]):
//! - at most `max_connections` are served at once; more wait in the kernel's accept queue and
//!   are taken in arrival order as slots free;
//! - the TLS handshake, and each request's headers, must arrive within `header_read_timeout`;
//!   the same bound closes a keep-alive connection idle between requests;
//! - a connection older than `max_age` is asked to close after the response in progress (an idle
//!   one closes at once), and is dropped `close_grace` later whatever it is doing, so a client
//!   that never reads its response frees its slot within `max_age + close_grace`.
//!
//! The default bounds free every slot held by idle connections within 10 s, so a scrape
//! waits at most about two header timeouts behind any number of idle connections.

pub mod auth;
pub mod tls;
pub mod web_config;

use std::convert::Infallible;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flate2::write::GzEncoder;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderName, HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, VARY,
    WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

use crate::metrics::text::{render, Format};
use crate::metrics::{unix_now, Shared};

pub use web_config::{WebConfig, WebConfigError};

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
    registry: Arc<Registry>,
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
    registry: Registry,
    options: ServeOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = options.limits;
    let ctx = Ctx {
        shared,
        registry: Arc::new(registry),
        ready_window: options.ready_window,
        protection: Arc::new(options.protection),
    };
    if ctx.protection.requires_auth() && !ctx.protection.is_tls() {
        warn!("the endpoints require credentials but TLS is off: credentials cross the network in clear text (add tls_server_config to the web config)");
    }
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.wait_for(|s| *s) => break,
        };
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
        tokio::spawn(async move {
            let _permit = permit;
            match &ctx.protection.tls {
                None => serve_connection(stream, ctx, limits).await,
                Some(tls) => {
                    let acceptor = tls.acceptor();
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                        Ok(Ok(stream)) => serve_connection(stream, ctx, limits).await,
                        Ok(Err(e)) => debug!("TLS handshake failed: {e}"),
                        Err(_) => debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serve HTTP/1.1 on one connection within the bounds of `limits`.
async fn serve_connection<I>(io: I, ctx: Ctx, limits: ConnLimits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(respond(&ctx, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
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

async fn respond(ctx: &Ctx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut resp = match &ctx.protection.auth {
        Some(auth) if req.uri().path() != "/healthz" && !auth.allows(req.headers()).await => {
            debug!(path = req.uri().path(), "request without valid credentials");
            let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
            for challenge in &auth.challenges {
                r.headers_mut().append(WWW_AUTHENTICATE, challenge.clone());
            }
            r
        }
        _ => handle(ctx, &req).await,
    };
    for (name, value) in &ctx.protection.headers {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(ctx: &Ctx, req: &Request<Incoming>) -> Response<Full<Bytes>> {
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

async fn metrics(ctx: &Ctx, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let format = Format::negotiate(header(req, ACCEPT));
    let gzip = header(req, ACCEPT_ENCODING).is_some_and(|a| {
        a.split(',')
            .any(|e| e.split(';').next().is_some_and(|n| n.trim() == "gzip"))
    });
    let registry = ctx.registry.clone();
    // Rendering is CPU-bound (about 23 ms at 10 000 series, O(series)): run it on the
    // blocking pool so the server's few async workers keep answering /healthz and /readyz.
    match tokio::task::spawn_blocking(move || encode_metrics(&registry, format, gzip)).await {
        Ok(resp) => resp,
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        ),
    }
}

fn encode_metrics(registry: &Registry, format: Format, gzip: bool) -> Response<Full<Bytes>> {
    let body = match render(registry, format) {
        Ok(b) => b,
        Err(_) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
        }
    };
    let mut resp = if gzip {
        let mut enc = GzEncoder::new(
            Vec::with_capacity(body.len() / 4),
            flate2::Compression::fast(),
        );
        match enc.write_all(body.as_bytes()).and_then(|()| enc.finish()) {
            Ok(compressed) => {
                let mut r = Response::new(Full::new(Bytes::from(compressed)));
                r.headers_mut()
                    .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                r
            }
            Err(_) => Response::new(Full::new(Bytes::from(body))),
        }
    } else {
        Response::new(Full::new(Bytes::from(body)))
    };
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
    resp
}

fn landing(ctx: &Ctx) -> Response<Full<Bytes>> {
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
    let mut r = Response::new(Full::new(Bytes::from(html)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}
