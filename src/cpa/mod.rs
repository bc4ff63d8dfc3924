//! CPA client: pops the usage queue over HTTP, on v8 or v0 routes. No metrics here.
//!
//! The key is sent only to the configured origin: redirects are refused and proxy environment
//! variables are ignored. Error values carry a classification, never a response body.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{redirect, StatusCode};

use crate::secret::Secret;
use split::{Sink, Splitter};

/// Which queue API CPA speaks (`api-version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApiVersion {
    Auto,
    V0,
    V8,
}

/// How the queue is popped (`transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Auto,
    Http,
    Resp,
    /// `SUBSCRIBE usage` on one RESP connection, and `LPOP usage` on another after every
    /// (re)subscription for what was queued while nobody was subscribed.
    Subscribe,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Http => "http",
            Transport::Resp => "resp",
            Transport::Subscribe => "subscribe",
        }
    }

    /// Whether this transport talks RESP (and so gets RESP's short idle interval).
    pub fn is_resp(self) -> bool {
        matches!(self, Transport::Resp | Transport::Subscribe)
    }
}

pub mod mgmt;
pub mod resp;
pub mod source;
pub mod split;
pub mod subscribe;

/// Largest queue element accepted by default (a record is about 1.5 KB; the response itself is
/// streamed and has no size limit).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    V0,
    V8,
}

impl Route {
    pub fn queue_path(self) -> &'static str {
        match self {
            Route::V0 => "/v0/management/usage-queue",
            Route::V8 => "/v8/management/observability/usage/queue",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Route::V0 => "v0",
            Route::V8 => "v8",
        }
    }
}

/// Why CPA refused the key (401/403). Each needs a different fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthCause {
    MissingKey,
    WrongKey,
    RemoteManagementDisabled,
    /// Too many failed logins from this IP; CPA says when it lifts the ban.
    IpBanned {
        retry_after: Option<Duration>,
    },
    /// A 401/403 whose body CPA does not normally send.
    Other(u16),
}

impl std::fmt::Display for AuthCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthCause::MissingKey => f.write_str("CPA received no management key"),
            AuthCause::WrongKey => f.write_str(
                "CPA rejected the management key (wrong key): check CPA_MANAGEMENT_KEY / --management-key-file against remote-management.secret-key",
            ),
            AuthCause::RemoteManagementDisabled => f.write_str(
                "CPA refuses remote management: set remote-management.allow-remote: true in CPA's config, or run the exporter on CPA's host or in its network namespace",
            ),
            AuthCause::IpBanned { retry_after } => {
                f.write_str("CPA has banned this IP after too many failed logins")?;
                if let Some(d) = retry_after {
                    write!(f, " (lifted in {})", humantime::format_duration(*d))?;
                }
                f.write_str("; fix the key, then wait for the ban to end")
            }
            AuthCause::Other(code) => write!(f, "CPA refused the request with HTTP {code}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PopError {
    #[error("{0}")]
    Auth(AuthCause),
    #[error("CPA's management API is disabled (HTTP 404 with an empty body): set remote-management.secret-key in CPA's config (and not home/cluster mode)")]
    ManagementDisabled,
    #[error("CPA has no usage-queue route (HTTP 404 on {tried}): CPA older than v6.10.8, or --api-version does not match")]
    RouteNotFound { tried: &'static str },
    #[error("CPA answered HTTP {0}")]
    Status(u16),
    #[error("cannot reach CPA: {0}")]
    Unreachable(String),
    #[error("CPA did not answer within the timeout")]
    Timeout,
    #[error("CPA's response exceeds {0} bytes (max-response-bytes)")]
    TooLarge(usize),
    /// The connection broke after the response started (reset or closed mid-body).
    #[error("CPA's response broke off mid-body: {0}")]
    Interrupted(String),
    /// The body is not a JSON array (or stops being one part way: the elements before the fault
    /// were kept).
    #[error("CPA's queue response is not a JSON array: {0}")]
    NotAnArray(String),
    /// A RESP reply that cannot be used (malformed, refused, or not RESP at all).
    #[error("{0}")]
    BadReply(String),
}

impl PopError {
    /// Stable `result` label of `cpa_exporter_polls_total`.
    pub fn result_label(&self) -> &'static str {
        match self {
            PopError::Auth(_) => "unauthorized",
            PopError::ManagementDisabled => "management_disabled",
            PopError::RouteNotFound { .. } | PopError::Status(_) => "http_error",
            PopError::Unreachable(_) | PopError::Timeout => "unreachable",
            PopError::TooLarge(_)
            | PopError::Interrupted(_)
            | PopError::NotAnArray(_)
            | PopError::BadReply(_) => "bad_response",
        }
    }
}

/// How a pop reached CPA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Http(Route),
    Resp,
    /// Records CPA published to the exporter's subscription.
    Subscription,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Http(r) => r.name(),
            Via::Resp => "resp",
            Via::Subscription => "subscribe",
        }
    }
}

/// One successful pop. Its elements went to the [`Sink`] given to the pop as they arrived.
#[derive(Debug)]
pub struct Popped {
    /// Bytes of the response (HTTP body, or RESP element payloads).
    pub bytes: u64,
    pub via: Via,
    /// `X-CPA-VERSION` / `X-CPA-COMMIT`, when CPA sent them (HTTP only).
    pub cpa_version: Option<String>,
    pub cpa_commit: Option<String>,
}

pub struct ClientOptions {
    pub base_url: String,
    pub key: Secret,
    pub api_version: ApiVersion,
    pub timeout: Duration,
    pub max_body_bytes: usize,
    /// Proxy for every request to CPA (`--cpa-proxy`); `None`: direct, whatever the environment.
    pub proxy: Option<Secret>,
}

pub struct HttpClient {
    http: reqwest::Client,
    base_url: String,
    api_version: ApiVersion,
    /// The route that answered last; `None` until one did (or after it disappeared).
    resolved: Option<Route>,
    max_body_bytes: usize,
}

impl HttpClient {
    pub fn new(opts: ClientOptions) -> Result<HttpClient, reqwest::Error> {
        let http = http_client(&opts.key, opts.timeout, opts.proxy.as_ref())?;
        Ok(HttpClient {
            http,
            base_url: opts.base_url,
            api_version: opts.api_version,
            resolved: None,
            max_body_bytes: opts.max_body_bytes,
        })
    }

    fn candidates(&self) -> &'static [Route] {
        match (self.resolved, self.api_version) {
            (Some(Route::V0), _) | (None, ApiVersion::V0) => &[Route::V0],
            (Some(Route::V8), _) | (None, ApiVersion::V8) => &[Route::V8],
            (None, ApiVersion::Auto) => &[Route::V8, Route::V0],
        }
    }

    /// Pop up to `count` elements, handing each to `sink` as it arrives. With `auto` routes, v8
    /// is tried first and v0 after a 404; a 401/403 ends the attempt at once, so one poll never
    /// costs two failed logins. On an error after the body started, the elements already
    /// handed over are real records (CPA has removed them): the caller keeps them.
    pub async fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> Result<Popped, PopError> {
        let candidates = self.candidates();
        let mut disabled = false;
        for &route in candidates {
            let url = format!("{}{}?count={count}", self.base_url, route.queue_path());
            let resp = self.http.get(&url).send().await.map_err(transport_error)?;
            let status = resp.status();
            let cpa_version = header_str(resp.headers(), "x-cpa-version");
            let cpa_commit = header_str(resp.headers(), "x-cpa-commit");
            match status {
                StatusCode::OK => {
                    self.resolved = Some(route);
                    let bytes = stream_elements(resp, self.max_body_bytes, sink).await?;
                    return Ok(Popped {
                        bytes,
                        via: Via::Http(route),
                        cpa_version,
                        cpa_commit,
                    });
                }
                StatusCode::NOT_FOUND => {
                    let body = read_limited(resp, 4096).await.unwrap_or_default();
                    disabled |= body.iter().all(u8::is_ascii_whitespace);
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    let body = read_limited(resp, 4096).await.unwrap_or_default();
                    return Err(PopError::Auth(classify_auth(status.as_u16(), &body)));
                }
                other => return Err(PopError::Status(other.as_u16())),
            }
        }
        self.resolved = None;
        if disabled {
            Err(PopError::ManagementDisabled)
        } else {
            Err(PopError::RouteNotFound {
                tried: match candidates {
                    [Route::V0] => "the v0 route",
                    [Route::V8] => "the v8 route",
                    _ => "the v8 and v0 routes",
                },
            })
        }
    }
}

/// The HTTP client every management call uses: the key as a sensitive bearer header, no
/// redirects (the key goes only to the configured origin), bounded connect and total time.
/// Proxy environment variables are ignored; only an explicitly configured proxy is used.
pub(crate) fn http_client(
    key: &Secret,
    timeout: Duration,
    proxy: Option<&Secret>,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut auth = HeaderValue::try_from(format!("Bearer {}", key.expose()))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    auth.set_sensitive(true);
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, auth);
    let builder = reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("cpa-usage-exporter/", env!("CARGO_PKG_VERSION")))
        .redirect(redirect::Policy::none())
        .no_proxy()
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .timeout(timeout);
    let builder = match proxy {
        // `Proxy::all` takes credentials from the URL; its errors never quote the URL.
        Some(url) => builder.proxy(reqwest::Proxy::all(url.expose())?),
        None => builder,
    };
    builder.build()
}

pub fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    (!v.is_empty() && v.len() <= 64).then(|| v.to_owned())
}

pub fn transport_error(e: reqwest::Error) -> PopError {
    if e.is_timeout() {
        return PopError::Timeout;
    }
    // The innermost cause ("Connection refused (os error 111)") is what an operator can act on;
    // it never contains headers, so the key cannot leak through it.
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    PopError::Unreachable(cause.to_string())
}

/// Split a queue response into elements while it arrives. Only the element being read is held
/// (at most `max_element` bytes of it; a larger one is skipped and reported as oversize).
async fn stream_elements(
    mut resp: reqwest::Response,
    max_element: usize,
    sink: &mut impl Sink,
) -> Result<u64, PopError> {
    let mut splitter = Splitter::new(max_element);
    let mut bytes = 0u64;
    let broken = |e: reqwest::Error| match transport_error(e) {
        PopError::Unreachable(cause) => PopError::Interrupted(cause),
        other => other,
    };
    while let Some(chunk) = resp.chunk().await.map_err(broken)? {
        bytes += chunk.len() as u64;
        splitter
            .feed(&chunk, sink)
            .map_err(|e| PopError::NotAnArray(e.to_string()))?;
    }
    splitter
        .finish()
        .map_err(|e| PopError::NotAnArray(e.to_string()))?;
    Ok(bytes)
}

async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, PopError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(PopError::TooLarge(limit));
    }
    let mut body = Vec::new();
    let broken = |e: reqwest::Error| match transport_error(e) {
        PopError::Unreachable(cause) => PopError::Interrupted(cause),
        other => other,
    };
    while let Some(chunk) = resp.chunk().await.map_err(broken)? {
        if body.len() + chunk.len() > limit {
            return Err(PopError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Read CPA's `{"error": "..."}` body into a cause. The text itself is never kept.
pub fn classify_auth(status: u16, body: &[u8]) -> AuthCause {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let msg = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_default();
    classify_auth_message(status, &msg)
}

/// CPA's auth error text (the HTTP `error` field, or what follows `ERR ` over RESP) into a cause.
/// `status` is the HTTP status, or 401 for a refused RESP `AUTH`.
pub fn classify_auth_message(status: u16, msg: &str) -> AuthCause {
    let msg = msg.to_ascii_lowercase();
    if msg.contains("banned") {
        let retry_after = msg
            .split("try again in")
            .nth(1)
            .and_then(|rest| humantime::parse_duration(rest.trim().trim_end_matches('.')).ok());
        AuthCause::IpBanned { retry_after }
    } else if msg.contains("remote management disabled") {
        AuthCause::RemoteManagementDisabled
    } else if msg.contains("missing management key") {
        AuthCause::MissingKey
    } else if msg.contains("invalid management key") || status == 401 {
        AuthCause::WrongKey
    } else {
        AuthCause::Other(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpa_error_bodies_map_to_causes() {
        let c = |status, body: &str| classify_auth(status, body.as_bytes());
        assert_eq!(
            c(401, r#"{"error":"invalid management key"}"#),
            AuthCause::WrongKey
        );
        assert_eq!(
            c(401, r#"{"error":"missing management key"}"#),
            AuthCause::MissingKey
        );
        assert_eq!(
            c(403, r#"{"error":"remote management disabled"}"#),
            AuthCause::RemoteManagementDisabled
        );
        assert_eq!(
            c(
                403,
                r#"{"error":"IP banned due to too many failed attempts. Try again in 29m41s"}"#
            ),
            AuthCause::IpBanned {
                retry_after: Some(Duration::from_secs(29 * 60 + 41))
            }
        );
        assert_eq!(c(403, "<html>"), AuthCause::Other(403));
    }

    #[test]
    fn messages_say_what_to_do_without_the_body() {
        let m = PopError::Auth(AuthCause::RemoteManagementDisabled).to_string();
        assert!(m.contains("allow-remote"));
        assert!(PopError::ManagementDisabled
            .to_string()
            .contains("secret-key"));
    }
}
