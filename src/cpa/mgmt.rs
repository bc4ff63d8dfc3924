//! CPA management reads besides the queue: the usage settings, the credentials listing and the
//! per-key counts of config API-key credentials. No metrics here.
//!
//! Same HTTP conventions as [`super::Client`]: the key only goes to the configured origin, bodies
//! are read with a size limit, and errors carry a classification, never a body. Every call here
//! is one bcrypt-checked login attempt on CPA's side, so callers must keep them rare.
//!
//! Personal data and secrets: the v0 config body holds client API keys in plaintext, and the
//! credentials listing holds e-mail addresses. Only the fields named below are kept; the e-mail
//! fields are used once, to mask the file name, and then dropped. The API-key usage is keyed by
//! upstream keys in plaintext: each is hashed into its `auth_index` while decoding and dropped.

use std::fmt;
use std::time::Duration;

use reqwest::StatusCode;
use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::BuildHasher;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

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
    ApiKeyUsage,
}

impl Call {
    fn path(self, route: Route) -> &'static str {
        match (self, route) {
            (Call::Settings, Route::V8) => "/v8/management/config/observability/usage/",
            (Call::Settings, Route::V0) => "/v0/management/config",
            (Call::Credentials, Route::V8) => "/v8/management/credentials",
            (Call::Credentials, Route::V0) => "/v0/management/auth-files",
            (Call::ApiKeyUsage, Route::V8) => "/v8/management/observability/usage/api-keys",
            (Call::ApiKeyUsage, Route::V0) => "/v0/management/api-key-usage",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Call::Settings => "usage settings",
            Call::Credentials => "credentials listing",
            Call::ApiKeyUsage => "API-key usage",
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
    /// Over the management body limit: named, as `max-response-bytes` (the queue's) does not apply.
    #[error("CPA's {what} response exceeds {}, the fixed limit of management responses (MAX_MGMT_BODY_BYTES; max-response-bytes applies to the usage queue only)", size_text(*.limit))]
    TooLarge { what: &'static str, limit: usize },
}

/// `16 MiB`, or a byte count when not a whole number of MiB.
fn size_text(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
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
            MgmtError::BadResponse { .. } | MgmtError::TooLarge { .. } => "bad_response",
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
        self.credentials_within(usize::MAX)
            .await
            .map(|l| l.credentials)
    }

    /// The credentials listing cut to its first `limit` distinct credentials (see
    /// [`decode_listing`]), decoded as it arrives: memory follows `limit`, not the listing.
    pub async fn credentials_within(&mut self, limit: usize) -> Result<Listing, MgmtError> {
        let resp = self.respond(Call::Credentials).await?;
        stream_listing(resp, self.max_body_bytes, limit).await
    }

    /// CPA's counts of its config API-key credentials, one authenticated request.
    pub async fn api_key_usage(&mut self) -> Result<Vec<KeyUsage>, MgmtError> {
        let body = self.get(Call::ApiKeyUsage).await?;
        decode_api_key_usage(&body)
    }

    fn candidates(&self) -> &'static [Route] {
        match (self.resolved, self.api_version) {
            (Some(Route::V0), _) | (None, ApiVersion::V0) => &[Route::V0],
            (Some(Route::V8), _) | (None, ApiVersion::V8) => &[Route::V8],
            (None, ApiVersion::Auto) => &[Route::V8, Route::V0],
        }
    }

    /// GET the call's path on the first route family that has it, and read the body whole.
    async fn get(&mut self, call: Call) -> Result<Vec<u8>, MgmtError> {
        let resp = self.respond(call).await?;
        read_limited(resp, self.max_body_bytes)
            .await
            .map_err(|e| too_large(e, call))
    }

    /// The 200 response of the call's path on the first route family that has it, its body
    /// unread; a 401/403 ends at once.
    async fn respond(&mut self, call: Call) -> Result<reqwest::Response, MgmtError> {
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
                    return Ok(resp);
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

/// A management body over its limit, named as such (see [`MgmtError::TooLarge`]).
fn too_large(e: PopError, call: Call) -> MgmtError {
    match e {
        PopError::TooLarge(limit) => MgmtError::TooLarge {
            what: call.name(),
            limit,
        },
        other => other.into(),
    }
}

/// Chunks of a listing on their way from the socket to the decoder: the most held at once.
const LISTING_CHUNKS_IN_FLIGHT: usize = 16;

/// Decode a listing while it is received: the chunks go through a small channel to a decoder on
/// a blocking thread (a large listing takes a core for a while; the runtime's workers serve
/// scrapes meanwhile), so neither the body nor its JSON is ever held whole. At most `max_bytes`
/// are read; a body that breaks off or runs over its limit is an error, never a partial listing.
async fn stream_listing(
    mut resp: reqwest::Response,
    max_bytes: usize,
    limit: usize,
) -> Result<Listing, MgmtError> {
    let call = Call::Credentials;
    if resp.content_length().is_some_and(|n| n > max_bytes as u64) {
        return Err(too_large(PopError::TooLarge(max_bytes), call));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(LISTING_CHUNKS_IN_FLIGHT);
    let decoder = tokio::task::spawn_blocking(move || {
        let reader = std::io::BufReader::new(ChunkReader::new(rx));
        decode_listing_from(reader, limit)
    });
    let mut read = 0usize;
    let mut failed = None;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                failed = Some(match transport_error(e) {
                    PopError::Unreachable(cause) => PopError::Interrupted(cause),
                    other => other,
                });
                break;
            }
        };
        read += chunk.len();
        if read > max_bytes {
            failed = Some(PopError::TooLarge(max_bytes));
            break;
        }
        if tx.send(chunk).await.is_err() {
            // The decoder stopped: the JSON is bad, the rest need not be read.
            break;
        }
    }
    drop(tx);
    let decoded = decoder.await;
    if let Some(e) = failed {
        return Err(too_large(e, call));
    }
    decoded.unwrap_or_else(|_| Err(MgmtError::BadResponse { what: call.name() }))
}

/// The chunks of a channel as one byte stream, for a decoder on a blocking thread.
struct ChunkReader<B> {
    rx: tokio::sync::mpsc::Receiver<B>,
    current: Option<B>,
    pos: usize,
}

impl<B: AsRef<[u8]>> ChunkReader<B> {
    fn new(rx: tokio::sync::mpsc::Receiver<B>) -> ChunkReader<B> {
        ChunkReader {
            rx,
            current: None,
            pos: 0,
        }
    }
}

impl<B: AsRef<[u8]>> std::io::Read for ChunkReader<B> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(chunk) = &self.current {
                let rest = &chunk.as_ref()[self.pos..];
                if !rest.is_empty() {
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            // The sender gone is the end of the body.
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.current = Some(chunk);
                    self.pos = 0;
                }
                None => return Ok(0),
            }
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

/// Visitor methods taking every JSON value but integers and objects as `$empty`, consumed unread.
macro_rules! non_integers_are {
    ($ty:ty, $empty:expr) => {
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<$ty, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($empty)
        }
        fn visit_unit<E>(self) -> Result<$ty, E> {
            Ok($empty)
        }
        fn visit_bool<E>(self, _: bool) -> Result<$ty, E> {
            Ok($empty)
        }
        fn visit_f64<E>(self, _: f64) -> Result<$ty, E> {
            Ok($empty)
        }
        fn visit_str<E>(self, _: &str) -> Result<$ty, E> {
            Ok($empty)
        }
    };
}

/// Visitor methods taking every JSON value but an object as `$empty`, consumed unread.
macro_rules! any_other_value_is {
    ($ty:ty, $empty:expr) => {
        non_integers_are!($ty, $empty);
        fn visit_i64<E>(self, _: i64) -> Result<$ty, E> {
            Ok($empty)
        }
        fn visit_u64<E>(self, _: u64) -> Result<$ty, E> {
            Ok($empty)
        }
    };
}

/// Decode `{"files": [...]}` leniently: entries that are not objects or have no `auth_index`
/// are skipped, fields of the wrong type take their defaults, repeated `auth_index`es keep the
/// first entry.
pub fn decode_credentials(body: &[u8]) -> Result<Vec<Credential>, MgmtError> {
    decode_listing(body, usize::MAX).map(|l| l.credentials)
}

/// A listing cut to a number of credentials, with what was left out.
#[derive(Debug, Default)]
pub struct Listing {
    /// The first distinct credentials of the listing, at most the limit given.
    pub credentials: Vec<Credential>,
    pub left_out: LeftOut,
}

/// Distinct credentials past the limit, not kept: the whole count, and those that carried a
/// retry time or a subscription end (the gauges they would have had).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LeftOut {
    pub credentials: u64,
    pub next_retry: u64,
    pub subscription: u64,
}

/// [`decode_credentials`], keeping the first `limit` distinct credentials and counting the
/// others. Memory follows `limit`, not the listing: each entry is decoded alone, unknown fields
/// (the request histories) are skipped unread, and the credentials past the limit leave 8 bytes
/// each (a hash, to count each once).
pub fn decode_listing(body: &[u8], limit: usize) -> Result<Listing, MgmtError> {
    let bad = || MgmtError::BadResponse {
        what: Call::Credentials.name(),
    };
    if !is_object(body) {
        return Err(bad());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let listing = ListingSeed(limit)
        .deserialize(&mut de)
        .and_then(|l| de.end().map(|()| l));
    listing.map_err(|_| bad())
}

/// [`decode_listing`] from a byte stream.
fn decode_listing_from(body: impl std::io::Read, limit: usize) -> Result<Listing, MgmtError> {
    let mut de = serde_json::Deserializer::from_reader(body);
    let listing = ListingSeed(limit)
        .deserialize(&mut de)
        .and_then(|l| de.end().map(|()| l));
    listing.map_err(|_| MgmtError::BadResponse {
        what: Call::Credentials.name(),
    })
}

/// The listing object: `files` is decoded with the limit, anything else skipped unread.
struct ListingSeed(usize);

impl<'de> DeserializeSeed<'de> for ListingSeed {
    type Value = Listing;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Listing, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListingSeed {
    type Value = Listing;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a credentials listing")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Listing, A::Error> {
        let mut listing = Listing::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "files" {
                listing = map.next_value_seed(FilesSeed(self.0))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(listing)
    }
}

/// The `files` array, decoded one entry at a time: only the fields the exporter reads are kept
/// from an entry, and only the first `limit` distinct credentials. Duplicates are found with
/// sets (linear): exactly among the kept ones, by a 64-bit hash among the others (a collision
/// there only miscounts what is left out).
struct FilesSeed(usize);

impl<'de> DeserializeSeed<'de> for FilesSeed {
    type Value = Listing;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Listing, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for FilesSeed {
    type Value = Listing;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of credentials")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listing, A::Error> {
        let limit = self.0;
        let mut listing = Listing::default();
        let mut kept: HashSet<String> = HashSet::new();
        let hasher = RandomState::new();
        let mut others: HashSet<u64> = HashSet::new();
        while let Some(MaybeEntry(entry)) = seq.next_element()? {
            let Some(c) = entry.as_ref().and_then(decode_entry) else {
                continue;
            };
            if kept.contains(&c.auth_index) {
                continue;
            }
            if kept.len() < limit {
                kept.insert(c.auth_index.clone());
                listing.credentials.push(c);
            } else if others.insert(hasher.hash_one(&c.auth_index)) {
                let left = &mut listing.left_out;
                left.credentials += 1;
                left.next_retry += u64::from(c.next_retry_after.is_some());
                left.subscription += u64::from(c.subscription.is_some());
            }
        }
        Ok(listing)
    }
}

/// The fields of a listing entry the exporter reads; anything else is skipped unread. A field
/// of the wrong type reads as absent.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Entry {
    auth_index: Option<Value>,
    name: Option<Value>,
    id: Option<Value>,
    label: Option<Value>,
    provider: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<Value>,
    status: Option<Value>,
    disabled: Option<Value>,
    unavailable: Option<Value>,
    next_retry_after: Option<Value>,
    success: Option<Value>,
    failed: Option<Value>,
    email: Option<Value>,
    account: Option<Value>,
    id_token: Option<Value>,
}

/// An entry, or `None` for anything but an object (consumed unread).
struct MaybeEntry(Option<Entry>);

impl<'de> Deserialize<'de> for MaybeEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MaybeEntry, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a credential")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MaybeEntry, A::Error> {
                let de = serde::de::value::MapAccessDeserializer::new(map);
                Entry::deserialize(de).map(|e| MaybeEntry(Some(e)))
            }
            any_other_value_is!(MaybeEntry, MaybeEntry(None));
        }
        d.deserialize_any(V)
    }
}

/// A field's text, trimmed; "" when absent or not a string.
fn str_of(v: &Option<Value>) -> &str {
    v.as_ref().and_then(Value::as_str).map_or("", str::trim)
}

/// The first non-empty of `fields`, or "".
fn first_text<'a>(fields: &[&'a Option<Value>]) -> &'a str {
    fields
        .iter()
        .map(|v| str_of(v))
        .find(|v| !v.is_empty())
        .unwrap_or("")
}

fn flag_of(v: &Option<Value>) -> bool {
    v.as_ref().and_then(Value::as_bool).unwrap_or(false)
}

fn decode_entry(e: &Entry) -> Option<Credential> {
    let auth_index = str_of(&e.auth_index);
    if auth_index.is_empty() {
        return None;
    }
    // The e-mail fields are read only to find them inside the name, then dropped.
    let emails: Vec<&str> = [&e.email, &e.account]
        .into_iter()
        .map(str_of)
        .filter(|v| v.contains('@'))
        .collect();
    let label = str_of(&e.label);
    let raw = if label.is_empty() {
        first_text(&[&e.name, &e.id])
    } else {
        label
    };
    let next_retry_after = e
        .next_retry_after
        .as_ref()
        .and_then(Value::as_str)
        .and_then(parse_rfc3339)
        .filter(|t| *t > 0.0);
    let count = |v: &Option<Value>| v.as_ref().and_then(Value::as_u64).unwrap_or(0);
    Some(Credential {
        auth_index: auth_index.to_owned(),
        provider: first_text(&[&e.provider, &e.kind]).to_owned(),
        name: Name {
            raw: raw.to_owned(),
            masked: mask_keys(&mask_emails(raw, &emails)),
        },
        status: Status::parse(str_of(&e.status)),
        disabled: flag_of(&e.disabled),
        unavailable: flag_of(&e.unavailable),
        next_retry_after,
        success: count(&e.success),
        failed: count(&e.failed),
        subscription: e
            .id_token
            .as_ref()
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

/// Most API-key entries decoded from one answer; more are ignored (CPA has one per configured
/// upstream key, so real configs stay far below).
pub const MAX_API_KEY_ENTRIES: usize = 10_000;

/// One config API-key credential in CPA's `api-key-usage` answer, without its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    /// CPA's group: the provider (`gemini`, `codex`, `claude`...) or the name of an
    /// openai-compatibility entry.
    pub provider: String,
    /// The `auth_index` CPA derives from the key, by the formula of CPA v7 (checked against
    /// v7.2.140), then by the older one; the records' `auth_index` is one of them.
    pub auth_index: [String; 2],
    /// CPA's in-memory attempt counters (reset when CPA restarts).
    pub success: u64,
    pub failed: u64,
}

/// CPA's `auth_index` of a config API-key credential: the first 16 hex digits of the SHA-256 of
/// a seed naming the key. CPA v7: `<kind>:<base_url>+<key>` (`kind` is `gemini-api-key`,
/// `codex-api-key`, `claude-api-key`, else `openai-compatibility`); before: `api_key:<key>`.
/// The key itself is only hashed, never kept.
pub fn api_key_auth_index(provider: &str, base_url: &str, key: &str) -> [String; 2] {
    let kind = match provider {
        "gemini" => "gemini-api-key",
        "codex" => "codex-api-key",
        "claude" => "claude-api-key",
        _ => "openai-compatibility",
    };
    let v7 = format!("{kind}:{}+{}", base_url.trim(), key.trim());
    let older = format!("api_key:{}", key.trim());
    [auth_index_of(&v7), auth_index_of(&older)]
}

/// CPA's `stableAuthIndex`: hex of the first 8 bytes of the seed's SHA-256.
fn auth_index_of(seed: &str) -> String {
    use std::fmt::Write;
    let digest = Sha256::digest(seed.trim().as_bytes());
    let mut out = String::with_capacity(16);
    for b in &digest[..8] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Decode `{"<provider>": {"<base_url>|<key>": {"success": n, "failed": n, ...}}}` as it
/// streams: nothing but the two counters is kept, `recent_requests` is skipped unread, keys are
/// hashed at once. Leniently: a group or entry that is not an object, or a counter that is not
/// a non-negative integer, counts as empty or 0; an entry without `|` has no base URL.
pub fn decode_api_key_usage(body: &[u8]) -> Result<Vec<KeyUsage>, MgmtError> {
    let bad = || MgmtError::BadResponse {
        what: Call::ApiKeyUsage.name(),
    };
    if !is_object(body) {
        return Err(bad());
    }
    let Groups(out) = serde_json::from_slice(body).map_err(|_| bad())?;
    Ok(out)
}

/// The whole answer, flattened.
struct Groups(Vec<KeyUsage>);

impl<'de> Deserialize<'de> for Groups {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Groups, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Groups;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of providers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Groups, A::Error> {
                let mut out = Vec::new();
                while let Some(provider) = map.next_key::<String>()? {
                    let Group(entries) = map.next_value()?;
                    let provider = provider.trim().to_ascii_lowercase();
                    for (base_url, key, c) in entries {
                        if out.len() >= MAX_API_KEY_ENTRIES {
                            break;
                        }
                        out.push(KeyUsage {
                            auth_index: api_key_auth_index(&provider, &base_url, &key),
                            provider: provider.clone(),
                            success: c.success,
                            failed: c.failed,
                        });
                    }
                }
                Ok(Groups(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// One provider's entries: (base URL, key, counts). Anything but an object is an empty group.
struct Group(Vec<(String, String, Counts)>);

impl<'de> Deserialize<'de> for Group {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Group, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Group;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of API keys")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Group, A::Error> {
                let mut out = Vec::new();
                while let Some(composite) = map.next_key::<String>()? {
                    let counts: Counts = map.next_value()?;
                    if out.len() >= MAX_API_KEY_ENTRIES {
                        continue;
                    }
                    let (base_url, key) = composite.split_once('|').unwrap_or(("", &composite));
                    out.push((base_url.to_owned(), key.to_owned(), counts));
                }
                Ok(Group(out))
            }
            any_other_value_is!(Group, Group(Vec::new()));
        }
        d.deserialize_any(V)
    }
}

/// An entry's two counters; anything else in it (or an entry that is not an object) is skipped.
#[derive(Default)]
struct Counts {
    success: u64,
    failed: u64,
}

impl<'de> Deserialize<'de> for Counts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Counts, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Counts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of counters")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Counts, A::Error> {
                let mut c = Counts::default();
                while let Some(field) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*field {
                        "success" => c.success = map.next_value::<Count>()?.0,
                        "failed" => c.failed = map.next_value::<Count>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(c)
            }
            any_other_value_is!(Counts, Counts::default());
        }
        d.deserialize_any(V)
    }
}

/// A counter: a non-negative integer, else 0 (whatever the JSON value is, it is consumed).
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a count")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).unwrap_or(0)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(0))
            }
            non_integers_are!(Count, Count(0));
        }
        d.deserialize_any(V)
    }
}

/// The first non-empty string among `keys`, or "".
fn text<'a>(e: &'a Map<String, Value>, keys: &[&str]) -> &'a str {
    keys.iter()
        .filter_map(|k| e.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .find(|v| !v.is_empty())
        .unwrap_or("")
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

/// Replace every key-like word of `text` by `***`. A credential's `label` is free text, and an
/// operator may have pasted a key into it; unlike an e-mail, a key is never shown, not even with
/// `unmask-credential-names`. A word is a run of `A-Za-z0-9` and `-_+/=` (the characters of
/// keys, tokens and base64); [`looks_like_key`] says which words are hidden.
pub fn mask_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word_start = None;
    // A final separator closes the last word.
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        if is_key_char(c) {
            word_start.get_or_insert(i);
            continue;
        }
        if let Some(start) = word_start.take() {
            let word = &text[start..i];
            out.push_str(if looks_like_key(word) { "***" } else { word });
        }
        if i < text.len() {
            out.push(c);
        }
    }
    out
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '/' | '=')
}

/// A heuristic that errs towards hiding: a word starting like a provider key (`sk-`, `sk_`,
/// Google's `AIza`); a part (between `-` and `_`) of 16+ characters mixing letters and digits
/// (hex digests, most random keys); a part of 32+ characters; or a word of 32+ characters with
/// digits, upper and lower case that changes class often, as random text does. Names people
/// write (`team-pro`, `gemini-my-project-123456`, `MyTeamProductionAccount`) stay.
fn looks_like_key(word: &str) -> bool {
    const PART_MIXED: usize = 16;
    const LONG: usize = 32;
    let lower = word.to_ascii_lowercase();
    if (lower.starts_with("sk-") || lower.starts_with("sk_")) && word.len() >= 8 {
        return true;
    }
    if word.starts_with("AIza") && word.len() >= 30 {
        return true;
    }
    let has = |s: &str, f: fn(&u8) -> bool| s.as_bytes().iter().any(f);
    let mixed = |s: &str| has(s, u8::is_ascii_digit) && has(s, u8::is_ascii_alphabetic);
    if word
        .split(['-', '_'])
        .any(|part| part.len() >= LONG || (part.len() >= PART_MIXED && mixed(part)))
    {
        return true;
    }
    if word.len() < LONG
        || !has(word, u8::is_ascii_digit)
        || !has(word, u8::is_ascii_uppercase)
        || !has(word, u8::is_ascii_lowercase)
    {
        return false;
    }
    // Random base62 changes class (digit, upper, lower) at about 60 % of neighbours, words
    // at well under 30 %.
    let class = |b: &u8| (b.is_ascii_digit(), b.is_ascii_uppercase());
    let alnum: Vec<u8> = word.bytes().filter(u8::is_ascii_alphanumeric).collect();
    let changes = alnum
        .windows(2)
        .filter(|w| class(&w[0]) != class(&w[1]))
        .count();
    changes * 10 >= alnum.len().saturating_sub(1) * 3
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
    fn a_listing_keeps_its_first_distinct_credentials_up_to_the_limit_and_counts_the_others_once() {
        let entry = |i: usize| {
            let retry = if i.is_multiple_of(2) {
                r#","next_retry_after":"2026-08-22T14:40:00Z""#
            } else {
                ""
            };
            let token = if i.is_multiple_of(3) {
                r#","id_token":{"chatgpt_subscription_active_until":"2026-12-01T00:00:00Z"}"#
            } else {
                ""
            };
            format!(
                r#"{{"auth_index":"{i:04x}","name":"n{i}","recent_requests":[{{"time":1,"success":0}}]{retry}{token}}}"#
            )
        };
        // 10 distinct credentials, each listed twice, and a non-object among them.
        let entries: Vec<String> = (0..10).chain(0..10).map(entry).collect();
        let body = format!(r#"{{"total":20,"files":[{},7]}}"#, entries.join(","));
        let listing = decode_listing(body.as_bytes(), 4).unwrap();
        let kept: Vec<&str> = listing
            .credentials
            .iter()
            .map(|c| c.auth_index.as_str())
            .collect();
        assert_eq!(kept, ["0000", "0001", "0002", "0003"]);
        // Left out: 4..10, once each; retry times on 4, 6, 8; subscriptions on 6, 9.
        assert_eq!(
            listing.left_out,
            LeftOut {
                credentials: 6,
                next_retry: 3,
                subscription: 2,
            }
        );
        let all = decode_listing(body.as_bytes(), usize::MAX).unwrap();
        assert_eq!(all.credentials.len(), 10);
        assert_eq!(all.left_out, LeftOut::default());
    }

    /// Duplicates are found with a set: 200 000 entries, half of them repeats, decode in one
    /// pass (a search of the kept ones per entry would be 10^10 comparisons).
    #[test]
    fn duplicates_in_a_large_listing_are_found_in_one_pass() {
        let n = 100_000;
        let mut body = String::from(r#"{"files":["#);
        for i in (0..n).chain(0..n) {
            if body.ends_with('}') {
                body.push(',');
            }
            body.push_str(&format!(r#"{{"auth_index":"{i:016x}","status":"active"}}"#));
        }
        body.push_str("]}");
        let listing = decode_listing(body.as_bytes(), 10_000).unwrap();
        assert_eq!(listing.credentials.len(), 10_000);
        assert_eq!(listing.left_out.credentials, 90_000);
        assert_eq!(decode_credentials(body.as_bytes()).unwrap().len(), n);
    }

    #[test]
    fn a_listing_read_in_chunks_decodes_as_a_whole_one() {
        let body = br#"{"files":[{"auth_index":"aa11","name":"codex-alice@example.com.json",
            "recent_requests":[{"time":1}],"status":"error"},{"auth_index":"bb22"},
            {"auth_index":"aa11"}],"total":3}"#;
        let whole = decode_listing(body, 1).unwrap();
        for size in [1, 7, 64] {
            let (tx, rx) = tokio::sync::mpsc::channel(body.len());
            for chunk in body.chunks(size) {
                tx.try_send(chunk.to_vec()).unwrap();
            }
            drop(tx);
            let chunked = decode_listing_from(ChunkReader::new(rx), 1).unwrap();
            assert_eq!(chunked.credentials, whole.credentials, "{size}");
            assert_eq!(chunked.left_out, whole.left_out, "{size}");
        }
        // Cut short: an error, not the entries before the cut.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(body[..body.len() / 2].to_vec()).unwrap();
        drop(tx);
        assert!(decode_listing_from(ChunkReader::new(rx), 10).is_err());
    }

    #[test]
    fn an_oversize_body_names_the_management_limit() {
        let e = MgmtError::TooLarge {
            what: Call::Credentials.name(),
            limit: MAX_MGMT_BODY_BYTES,
        };
        let text = e.to_string();
        assert!(text.contains("credentials listing"), "{text}");
        assert!(
            text.contains("16 MiB") && text.contains("MAX_MGMT_BODY_BYTES"),
            "{text}"
        );
        assert_eq!(e.kind(), "bad_response");
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

    /// The shape of `GET /v0/management/api-key-usage` as CPA v7.2.140 answered it (two
    /// openai-compatibility keys; `recent_requests` cut to two buckets).
    const REAL_API_KEY_USAGE: &[u8] = br#"{"fakeup":{"http://127.0.0.1:18081/v1|sk-upstream-a":{"success":3,"failed":0,"recent_requests":[{"time":"21:00-21:10","success":0,"failed":0},{"time":"21:10-21:20","success":3,"failed":0}]},"http://127.0.0.1:18081/v1|sk-upstream-b":{"success":0,"failed":2,"recent_requests":[{"time":"21:00-21:10","success":0,"failed":0},{"time":"21:10-21:20","success":0,"failed":2}]}}}"#;

    #[test]
    fn api_key_usage_joins_the_records_auth_index_and_keeps_no_key() {
        let usage = decode_api_key_usage(REAL_API_KEY_USAGE).unwrap();
        assert_eq!(usage.len(), 2);
        let a = usage.iter().find(|u| u.success == 3).unwrap();
        // The records of sk-upstream-a carried this auth_index (CPA v7.2.140).
        assert_eq!(a.auth_index[0], "c535ecab553e1911");
        assert_eq!(a.provider, "fakeup");
        let b = usage.iter().find(|u| u.failed == 2).unwrap();
        assert_eq!(b.auth_index[0], "e7fe62a13b979057");
        assert!(!format!("{usage:?}").contains("sk-upstream"));
    }

    #[test]
    fn api_key_index_follows_cpas_formula_per_provider() {
        let [v7, older] = api_key_auth_index("gemini", "", "AIza-key");
        assert_eq!(v7, auth_index_of("gemini-api-key:+AIza-key"));
        assert_eq!(older, auth_index_of("api_key:AIza-key"));
        assert_eq!(v7.len(), 16);
        assert!(v7.bytes().all(|b| b.is_ascii_hexdigit()));
        let [claude, _] = api_key_auth_index("claude", "https://x", "k");
        assert_eq!(claude, auth_index_of("claude-api-key:https://x+k"));
        let [compat, _] = api_key_auth_index("openrouter", "https://x", "k");
        assert_eq!(compat, auth_index_of("openai-compatibility:https://x+k"));
    }

    #[test]
    fn api_key_usage_decodes_leniently() {
        let body = br#"{
            "Codex": {"|sk-1": {"success": 5, "failed": "x", "extra": {"deep": [1, {"a": 2}]}},
                      "no-pipe-key": {"success": -3, "failed": 1.5},
                      "|sk-2": [1, 2], "|sk-3": null},
            "broken": 7,
            "empty": {},
            "list": [{"x": 1}]
        }"#;
        let u = decode_api_key_usage(body).unwrap();
        assert_eq!(u.len(), 4);
        assert_eq!(u[0].provider, "codex");
        assert_eq!((u[0].success, u[0].failed), (5, 0));
        assert_eq!(u[0].auth_index, api_key_auth_index("codex", "", "sk-1"));
        assert_eq!(
            u[1].auth_index,
            api_key_auth_index("codex", "", "no-pipe-key")
        );
        assert_eq!((u[1].success, u[1].failed), (0, 0));
        assert_eq!((u[2].success, u[3].success), (0, 0));
        assert!(decode_api_key_usage(b"{}").unwrap().is_empty());
        assert!(decode_api_key_usage(b"[]").is_err());
        assert!(decode_api_key_usage(b"{\"a\":").is_err());
    }

    #[test]
    fn api_key_usage_is_bounded() {
        let mut body = String::from("{\"p\":{");
        for i in 0..MAX_API_KEY_ENTRIES + 5 {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!("\"|k{i}\":{{\"success\":1}}"));
        }
        body.push_str("},\"q\":{\"|z\":{\"success\":1}}}");
        let u = decode_api_key_usage(body.as_bytes()).unwrap();
        assert_eq!(u.len(), MAX_API_KEY_ENTRIES);
    }

    #[test]
    fn key_like_words_are_masked_and_names_are_not() {
        for (text, want) in [
            ("sk-proj-4fJk29sLqP0aZ8xYt7Wb3nR1", "***"),
            (
                "prod sk-ant-api03-AbCdEf123456GhIjKl (old)",
                "prod *** (old)",
            ),
            ("AIzaSyD3m0Fake-KeyForTests_0123456789ab", "***"),
            ("3f9a1c7e5b2d4a6f8e0c1b3d5f7a9c2e4b6d8f0a", "***"),
            ("x:Zk3pQ9-vR2mT7_wL4nB8sY1-eH6jC0aF5uG", "x:***"),
            (
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl",
                "***.***.c2lnbmF0dXJl",
            ),
            ("team-pro", "team-pro"),
            (
                "gemini-my-project-123456.json",
                "gemini-my-project-123456.json",
            ),
            ("codex-a***@example.com.json", "codex-a***@example.com.json"),
            ("MyTeamProductionAccount", "MyTeamProductionAccount"),
            (
                "Production-Team-Account-2026-Backup",
                "Production-Team-Account-2026-Backup",
            ),
            ("sk-team", "sk-team"),
            ("", ""),
            ("équipe sk-0123456789", "équipe ***"),
        ] {
            assert_eq!(mask_keys(text), want, "{text}");
        }
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
