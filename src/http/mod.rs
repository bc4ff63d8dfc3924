//! HTTP endpoints: `/` (landing page), `/metrics`, `/healthz` (alive), `/readyz` (store healthy
//! and CPA polled recently).

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use flate2::write::GzEncoder;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

use crate::metrics::text::{render, Format};
use crate::metrics::{unix_now, Shared};

/// Concurrent connections served; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 128;
/// A client must send its request headers within this time (slow-loris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    /// `/readyz` fails when the last successful poll is older than this.
    ready_window: Duration,
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    registry: Registry,
    ready_window: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let ctx = Ctx {
        shared,
        registry: Arc::new(registry),
        ready_window,
    };
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
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
            let service = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(&ctx, &req)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
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

fn handle(ctx: &Ctx, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/metrics" => metrics(ctx, req),
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

fn metrics(ctx: &Ctx, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let format = Format::negotiate(header(req, ACCEPT));
    let body = match render(&ctx.registry, format) {
        Ok(b) => b,
        Err(_) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
        }
    };
    let gzip = header(req, ACCEPT_ENCODING).is_some_and(|a| {
        a.split(',')
            .any(|e| e.split(';').next().is_some_and(|n| n.trim() == "gzip"))
    });
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
