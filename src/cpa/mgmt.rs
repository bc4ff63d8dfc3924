//! CPA management reads besides the queue: the usage settings and the credentials listing.
//! No metrics here.
//!
//! Same HTTP conventions as [`super::Client`]: the key only goes to the configured origin, bodies
//! are read with a size limit, and errors carry a classification, never a body. Every call here
//! is one bcrypt-checked login attempt on CPA's side, so callers must keep them rare.
//!
//! Personal data and secrets: the v0 config body holds client API keys in plaintext, and the
//! credentials listing holds e-mail addresses. Only the fields named below are kept; the e-mail
//! fields are used once, to mask the file name, and then dropped.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{classify_auth, header_str, http_client, read_limited, transport_error};
use super::{AuthCause, ClientOptions, PopError, Route};
use crate::cpa::ApiVersion;
use crate::time::parse_rfc3339;

/// Largest settings or credentials response accepted (a listing of 1 000 credentials with their
/// request histories is about 2 MB).
pub const MAX_MGMT_BODY_BYTES: usize = 16 * 1024 * 1024;

/// CPA's own default and cap for `redis-usage-queue-retention-seconds`.
const DEFAULT_RETENTION_SECS: u64 = 60;
const MAX_RETENTION_SECS: u64 = 3600;

/// What a management read was for, to pick its path and name it in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Settings,
    Credentials,
}

impl Call {
    fn path(self, route: Route) -> &'static str {
        match (self, route) {
            (Call::Settings, Route::V8) => "/v8/management/config/observability/usage/",
            (Call::Settings, Route::V0) => "/v0/management/config",
            (Call::Credentials, Route::V8) => "/v8/management/credentials",
            (Call::Credentials, Route::V0) => "/v0/management/auth-files",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Call::Settings => "usage settings",
            Call::Credentials => "credentials listing",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    /// Refused key, management disabled, transport faults, unexpected status, oversized body.
    #[error(transparent)]
    Http(#[from] PopError),
    #[error("CPA has no {what} route (HTTP 404 on {tried}): CPA is older than this route, or --api-version does not match")]
    RouteNotFound {
        what: &'static str,
        tried: &'static str,
    },
    #[error("CPA's {what} response is not the JSON expected")]
    BadResponse { what: &'static str },
}

impl MgmtError {
    /// The cause when CPA refused the key (401/403).
    pub fn auth(&self) -> Option<&AuthCause> {
        match self {
            MgmtError::Http(PopError::Auth(cause)) => Some(cause),
            _ => None,
        }
    }

    /// Short stable kind, for "log once per change".
    pub fn kind(&self) -> &'static str {
        match self {
            MgmtError::Http(e) => e.result_label(),
            MgmtError::RouteNotFound { .. } => "route_not_found",
            MgmtError::BadResponse { .. } => "bad_response",
        }
    }
}

/// CPA's build, from the `X-CPA-*` headers of the last response that carried them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub version: Option<String>,
    pub commit: Option<String>,
}

/// The two usage settings the exporter needs, and nothing else of CPA's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageSettings {
    /// `None` when CPA's answer did not say (a build without the key).
    pub statistics_enabled: Option<bool>,
    /// Effective retention, after CPA's own rule (<= 0 means 60 s, capped at 3600 s).
    pub retention: Duration,
}

/// CPA's credential states; anything else reads as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Active,
    Pending,
    Refreshing,
    Error,
    Disabled,
    Unknown,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Active,
        Status::Pending,
        Status::Refreshing,
        Status::Error,
        Status::Disabled,
        Status::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Pending => "pending",
            Status::Refreshing => "refreshing",
            Status::Error => "error",
            Status::Disabled => "disabled",
            Status::Unknown => "unknown",
        }
    }

    fn parse(s: &str) -> Status {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
            .unwrap_or(Status::Unknown)
    }
}

/// A display name in two forms: as CPA has it, and with e-mail local parts masked.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Name {
    pub raw: String,
    pub masked: String,
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Debug output may end up in a log line: show only the masked form.
        write!(f, "Name({:?})", self.masked)
    }
}

/// One entry of CPA's credentials listing, reduced to what the exporter shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Credential {
    /// Stable 16-hex id; joins with `auth_index` in usage records.
    pub auth_index: String,
    pub provider: String,
    /// CPA's `label` when it has one, else the file name.
    pub name: Name,
    pub status: Status,
    pub disabled: bool,
    /// Cooling down or blocked by a quota.
    pub unavailable: bool,
    /// Unix seconds; `None` when CPA gave none (or Go's zero time).
    pub next_retry_after: Option<f64>,
    /// CPA's in-memory attempt counters (reset when CPA restarts).
    pub success: u64,
    pub failed: u64,
    /// The subscription behind a codex credential, from its `id_token` (absent when not known).
    pub subscription: Option<Subscription>,
}

/// `chatgpt_subscription_active_until` and `plan_type` of a codex `id_token`. The account id
/// next to them is an account identifier and is never read.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// Unix seconds.
    pub active_until: f64,
    /// e.g. `plus`, `pro`; empty when not given.
    pub plan_type: String,
}

pub struct MgmtClient {
    http: reqwest::Client,
    base_url: String,
    api_version: ApiVersion,
    /// The route family that answered last with 200; `None` until one did.
    resolved: Option<Route>,
    /// The route family that last answered with anything but a 404 (a 401 proves it exists).
    answered: Option<Route>,
    max_body_bytes: usize,
    identity: Identity,
}

impl MgmtClient {
    pub fn new(opts: ClientOptions) -> Result<MgmtClient, reqwest::Error> {
        Ok(MgmtClient {
            http: http_client(&opts.key, opts.timeout, opts.proxy.as_ref())?,
            base_url: opts.base_url,
            api_version: opts.api_version,
            resolved: None,
            answered: None,
            max_body_bytes: opts.max_body_bytes,
            identity: Identity::default(),
        })
    }

    /// CPA's build as last reported in response headers (401/403 responses carry them too).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The route family that answered last (with 200, or with a refusal that proves it exists).
    pub fn route(&self) -> Option<Route> {
        self.answered
    }

    /// `GET /healthz` (no authentication): `Ok(true)` on 200, `Ok(false)` when CPA has no such
    /// route (before v6.9.10).
    pub async fn healthz(&self) -> Result<bool, MgmtError> {
        let url = format!("{}/healthz", self.base_url);
        let resp = self.http.get(&url).send().await.map_err(transport_error)?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            other => Err(PopError::Status(other.as_u16()).into()),
        }
    }

    /// `usage-statistics-enabled` and the effective queue retention. One authenticated request
    /// (v8 first with `auto`; a 404 there is gin's, before any key check).
    pub async fn usage_settings(&mut self) -> Result<UsageSettings, MgmtError> {
        let body = self.get(Call::Settings).await?;
        decode_settings(&body)
    }

    /// The credentials listing, one authenticated request.
    pub async fn credentials(&mut self) -> Result<Vec<Credential>, MgmtError> {
        let body = self.get(Call::Credentials).await?;
        decode_credentials(&body)
    }

    fn candidates(&self) -> &'static [Route] {
        match (self.resolved, self.api_version) {
            (Some(Route::V0), _) | (None, ApiVersion::V0) => &[Route::V0],
            (Some(Route::V8), _) | (None, ApiVersion::V8) => &[Route::V8],
            (None, ApiVersion::Auto) => &[Route::V8, Route::V0],
        }
    }

    /// GET the call's path on the first route family that has it; a 401/403 ends at once.
    async fn get(&mut self, call: Call) -> Result<Vec<u8>, MgmtError> {
        let candidates = self.candidates();
        let mut disabled = false;
        for &route in candidates {
            let url = format!("{}{}", self.base_url, call.path(route));
            let resp = self.http.get(&url).send().await.map_err(transport_error)?;
            self.note_identity(resp.headers());
            let status = resp.status();
            if status != StatusCode::NOT_FOUND {
                self.answered = Some(route);
            }
            match status {
                StatusCode::OK => {
                    self.resolved = Some(route);
                    return Ok(read_limited(resp, self.max_body_bytes).await?);
                }
                StatusCode::NOT_FOUND => {
                    let body = read_limited(resp, 4096).await.unwrap_or_default();
                    disabled |= body.iter().all(u8::is_ascii_whitespace);
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    let body = read_limited(resp, 4096).await.unwrap_or_default();
                    return Err(PopError::Auth(classify_auth(status.as_u16(), &body)).into());
                }
                other => return Err(PopError::Status(other.as_u16()).into()),
            }
        }
        self.resolved = None;
        if disabled {
            return Err(PopError::ManagementDisabled.into());
        }
        Err(MgmtError::RouteNotFound {
            what: call.name(),
            tried: match candidates {
                [Route::V0] => "the v0 route",
                [Route::V8] => "the v8 route",
                _ => "the v8 and v0 routes",
            },
        })
    }

    fn note_identity(&mut self, headers: &reqwest::header::HeaderMap) {
        if let Some(version) = header_str(headers, "x-cpa-version") {
            self.identity = Identity {
                version: Some(version),
                commit: header_str(headers, "x-cpa-commit"),
            };
        }
    }
}

/// Read the two usage settings from either the v8 subtree or the whole v0 config (both have
/// them at the top level). Everything else in the body is skipped unread.
pub fn decode_settings(body: &[u8]) -> Result<UsageSettings, MgmtError> {
    #[derive(Deserialize)]
    struct Wanted {
        #[serde(rename = "usage-statistics-enabled", default)]
        enabled: Option<Value>,
        #[serde(rename = "redis-usage-queue-retention-seconds", default)]
        retention: Option<Value>,
    }
    let bad = || MgmtError::BadResponse {
        what: Call::Settings.name(),
    };
    if !is_object(body) {
        return Err(bad());
    }
    let wanted: Wanted = serde_json::from_slice(body).map_err(|_| bad())?;
    let retention_secs = wanted.retention.as_ref().and_then(Value::as_f64);
    Ok(UsageSettings {
        statistics_enabled: wanted.enabled.as_ref().and_then(Value::as_bool),
        retention: effective_retention(retention_secs),
    })
}

/// Whether a body is a JSON object (serde would also take an array for a struct).
fn is_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// CPA's rule: missing or <= 0 means 60 s; at most 3600 s; whole seconds.
pub fn effective_retention(configured_secs: Option<f64>) -> Duration {
    let secs = match configured_secs {
        Some(s) if s.is_finite() && s >= 1.0 => (s as u64).min(MAX_RETENTION_SECS),
        _ => DEFAULT_RETENTION_SECS,
    };
    Duration::from_secs(secs)
}

/// Decode `{"files": [...]}` leniently: entries that are not objects or have no `auth_index`
/// are skipped, fields of the wrong type take their defaults, repeated `auth_index`es keep the
/// first entry.
pub fn decode_credentials(body: &[u8]) -> Result<Vec<Credential>, MgmtError> {
    #[derive(Deserialize)]
    struct Listing {
        #[serde(default)]
        files: Vec<Value>,
    }
    let bad = || MgmtError::BadResponse {
        what: Call::Credentials.name(),
    };
    if !is_object(body) {
        return Err(bad());
    }
    let listing: Listing = serde_json::from_slice(body).map_err(|_| bad())?;
    let mut out: Vec<Credential> = Vec::with_capacity(listing.files.len());
    for entry in listing.files.iter().filter_map(Value::as_object) {
        if let Some(c) = decode_entry(entry) {
            if !out.iter().any(|o| o.auth_index == c.auth_index) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

fn decode_entry(e: &Map<String, Value>) -> Option<Credential> {
    let auth_index = text(e, &["auth_index"]);
    if auth_index.is_empty() {
        return None;
    }
    // The e-mail fields are read only to find them inside the name, then dropped.
    let emails: Vec<&str> = ["email", "account"]
        .iter()
        .map(|k| text(e, &[k]))
        .filter(|v| v.contains('@'))
        .collect();
    let label = text(e, &["label"]);
    let raw = if label.is_empty() {
        text(e, &["name", "id"])
    } else {
        label
    };
    let next_retry_after = e
        .get("next_retry_after")
        .and_then(Value::as_str)
        .and_then(parse_rfc3339)
        .filter(|t| *t > 0.0);
    Some(Credential {
        auth_index: auth_index.to_owned(),
        provider: text(e, &["provider", "type"]).to_owned(),
        name: Name {
            raw: raw.to_owned(),
            masked: mask_emails(raw, &emails),
        },
        status: Status::parse(text(e, &["status"])),
        disabled: flag(e, "disabled"),
        unavailable: flag(e, "unavailable"),
        next_retry_after,
        success: e.get("success").and_then(Value::as_u64).unwrap_or(0),
        failed: e.get("failed").and_then(Value::as_u64).unwrap_or(0),
        subscription: e
            .get("id_token")
            .and_then(Value::as_object)
            .and_then(subscription),
    })
}

/// The subscription end of an `id_token` object; `None` without a valid
/// `chatgpt_subscription_active_until`.
fn subscription(token: &Map<String, Value>) -> Option<Subscription> {
    let active_until = token
        .get("chatgpt_subscription_active_until")
        .and_then(Value::as_str)
        .and_then(parse_rfc3339)
        .filter(|t| *t > 0.0)?;
    Some(Subscription {
        active_until,
        plan_type: text(token, &["plan_type"]).to_ascii_lowercase(),
    })
}

/// The first non-empty string among `keys`, or "".
fn text<'a>(e: &'a Map<String, Value>, keys: &[&str]) -> &'a str {
    keys.iter()
        .filter_map(|k| e.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .find(|v| !v.is_empty())
        .unwrap_or("")
}

fn flag(e: &Map<String, Value>, key: &str) -> bool {
    e.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Mask the local part of every e-mail address in `text` to its first character and `***`:
/// `codex-alice@example.com.json` -> `codex-a***@example.com.json`. Addresses CPA listed for the
/// entry (`known`) are found exactly, so a local part with a `-` is masked whole; any other `@`
/// masks the run of address characters before it.
pub fn mask_emails(text: &str, known: &[&str]) -> String {
    let mut s = text.to_owned();
    for email in known {
        if let Some((local, domain)) = email.split_once('@') {
            if let Some(first) = local.chars().next() {
                s = s.replace(email, &format!("{first}***@{domain}"));
            }
        }
    }
    mask_local_parts(&s)
}

fn is_local_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '%' | '+')
}

fn mask_local_parts(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for (at, _) in s.match_indices('@') {
        let before = &s[last..at];
        let local_len: usize = before
            .chars()
            .rev()
            .take_while(|c| is_local_char(*c))
            .map(char::len_utf8)
            .sum();
        let (keep, local) = before.split_at(before.len() - local_len);
        out.push_str(keep);
        if let Some(first) = local.chars().next() {
            out.push(first);
            out.push_str("***");
        }
        out.push('@');
        last = at + 1;
    }
    out.push_str(&s[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_only_the_two_fields_with_cpas_retention_rule() {
        let v0 = br#"{"api-keys":["sk-secret"],"usage-statistics-enabled":true,"redis-usage-queue-retention-seconds":120}"#;
        let s = decode_settings(v0).unwrap();
        assert_eq!(s.statistics_enabled, Some(true));
        assert_eq!(s.retention, Duration::from_secs(120));
        let cases = [
            ("0", 60),
            ("-5", 60),
            ("7200", 3600),
            ("1", 1),
            ("\"x\"", 60),
        ];
        for (raw, secs) in cases {
            let body = format!(
                r#"{{"usage-statistics-enabled":false,"redis-usage-queue-retention-seconds":{raw}}}"#
            );
            let s = decode_settings(body.as_bytes()).unwrap();
            assert_eq!(s.retention, Duration::from_secs(secs), "{raw}");
            assert_eq!(s.statistics_enabled, Some(false));
        }
        let s = decode_settings(b"{}").unwrap();
        assert_eq!(s.statistics_enabled, None);
        assert_eq!(s.retention, Duration::from_secs(60));
        assert!(decode_settings(b"[1]").is_err());
    }

    #[test]
    fn credentials_decode_leniently_and_drop_emails() {
        let body = br#"{"files":[
            {"auth_index":"aa11","name":"codex-dev-team@example.com.json","type":"codex",
             "email":"dev-team@example.com","status":"error","status_message":"token expired",
             "disabled":false,"unavailable":true,"next_retry_after":"2026-08-22T14:40:00Z",
             "success":12,"failed":3},
            {"auth_index":"bb22","id":"claude-x.json","provider":"claude","label":"team-pro",
             "status":"ACTIVE","disabled":"yes","next_retry_after":"0001-01-01T00:00:00Z"},
            {"auth_index":"","name":"no-index.json"},
            {"auth_index":"aa11","name":"duplicate.json"},
            "not an object",
            {"auth_index":"cc33","name":"weird.json","status":"sleeping","success":-1}
        ]}"#;
        let c = decode_credentials(body).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].auth_index, "aa11");
        assert_eq!(c[0].provider, "codex");
        assert_eq!(c[0].name.masked, "codex-d***@example.com.json");
        assert_eq!(c[0].name.raw, "codex-dev-team@example.com.json");
        assert_eq!(c[0].status, Status::Error);
        assert!(c[0].unavailable && !c[0].disabled);
        assert_eq!(c[0].next_retry_after, parse_rfc3339("2026-08-22T14:40:00Z"));
        assert_eq!((c[0].success, c[0].failed), (12, 3));
        assert_eq!(c[1].name.raw, "team-pro");
        assert_eq!(c[1].status, Status::Active);
        assert!(!c[1].disabled, "a non-bool flag reads as false");
        assert_eq!(c[1].next_retry_after, None, "Go's zero time is no time");
        assert_eq!(c[2].status, Status::Unknown);
        assert_eq!(c[2].success, 0);
        assert!(!format!("{c:?}").contains("dev-team"));
        assert!(decode_credentials(b"{\"files\":7}").is_err());
        assert!(decode_credentials(b"{}").unwrap().is_empty());
        assert!(decode_credentials(b"[[]]").is_err());
    }

    #[test]
    fn the_subscription_end_comes_from_the_id_token_and_the_account_id_is_dropped() {
        let body = br#"{"files":[
            {"auth_index":"aa11","type":"codex","id_token":{"chatgpt_account_id":"acct-secret-1",
             "plan_type":"Pro","chatgpt_subscription_active_start":"2026-11-01T00:00:00Z",
             "chatgpt_subscription_active_until":"2026-12-01T00:00:00Z"}},
            {"auth_index":"bb22","type":"codex","id_token":{"plan_type":"plus"}},
            {"auth_index":"cc33","type":"codex","id_token":"eyJhbGciOi.not-an-object"},
            {"auth_index":"dd44","type":"codex","id_token":{"chatgpt_subscription_active_until":"soon"}}
        ]}"#;
        let c = decode_credentials(body).unwrap();
        assert_eq!(
            c[0].subscription,
            Some(Subscription {
                active_until: parse_rfc3339("2026-12-01T00:00:00Z").unwrap(),
                plan_type: "pro".to_owned(),
            })
        );
        assert!(c[1..].iter().all(|c| c.subscription.is_none()));
        assert!(!format!("{c:?}").contains("acct-secret"));
    }

    #[test]
    fn email_local_parts_are_masked() {
        let m = |s: &str| mask_emails(s, &[]);
        assert_eq!(
            m("codex-alice@example.com.json"),
            "codex-a***@example.com.json"
        );
        assert_eq!(
            m("bob.martin@example.org-project-1.json"),
            "b***@example.org-project-1.json"
        );
        assert_eq!(m("no-email.json"), "no-email.json");
        assert_eq!(m("a@b@c"), "a***@b***@c");
        assert_eq!(m("@x"), "@x");
        assert_eq!(
            mask_emails(
                "claude-dev-team@example.com.json",
                &["dev-team@example.com"]
            ),
            "claude-d***@example.com.json"
        );
    }
}
