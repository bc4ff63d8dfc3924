//! Lenient decoding of one event of CPA's `errors` channel (`shared/cpa/API.md` 1.2): a failed
//! upstream attempt and the credential's state after it.
//!
//! Only the fields the exporter uses are declared. serde skips the rest without keeping them:
//! `body` and `auth_status.status_message` (the upstream's error text, which may quote keys and
//! e-mails) and `auth_id` (the auth file name, often an e-mail) are never held. Strings borrow
//! from the payload unless they contain escapes; a field of the wrong type reads as absent.

use std::borrow::Cow;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::decode::{lenient_str, Num};
use crate::cpa::mgmt::Status;
use crate::time::parse_rfc3339;

/// Largest event decoded; CPA's are about 1 KiB plus the upstream's error text. A larger payload
/// is refused without being parsed.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// One failed upstream attempt, as the exporter uses it.
#[derive(Debug, Default, PartialEq)]
pub struct ErrorEvent<'a> {
    pub provider: Option<Cow<'a, str>>,
    /// 16 hex digits, the `credential` label of the usage families.
    pub auth_index: Option<Cow<'a, str>>,
    /// The upstream's HTTP status; `None` when absent or not a status.
    pub status_code: Option<u16>,
    /// The credential's state after the failure; `None` when the event carries none.
    pub state: Option<CredentialState>,
}

/// A credential's state as CPA holds it after a failure. Each field is `None` when absent.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct CredentialState {
    pub status: Option<Status>,
    pub disabled: Option<bool>,
    pub unavailable: Option<bool>,
    /// Unix seconds; `None` when absent or Go's zero time.
    pub next_retry_after: Option<f64>,
    pub quota_exceeded: Option<bool>,
    /// When an exceeded quota is expected back, Unix seconds.
    pub quota_recover_at: Option<f64>,
}

/// Why an event was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the event is over {MAX_EVENT_BYTES} bytes")]
    TooLarge,
    #[error("the event is not a JSON object")]
    NotAnObject,
}

/// Decode one payload of the `errors` channel.
pub fn decode(payload: &[u8]) -> Result<ErrorEvent<'_>, EventError> {
    if payload.len() > MAX_EVENT_BYTES {
        return Err(EventError::TooLarge);
    }
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(EventError::NotAnObject);
    }
    let raw: RawEvent<'_> = serde_json::from_slice(payload).map_err(|_| EventError::NotAnObject)?;
    Ok(ErrorEvent {
        provider: raw.provider.filter(|s| !s.is_empty()),
        auth_index: raw.auth_index.filter(|s| !s.is_empty()),
        status_code: raw
            .status_code
            .0
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| (100..=999).contains(n)),
        state: raw.auth_status.map(RawStatus::state),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawEvent<'a> {
    #[serde(borrow, deserialize_with = "lenient_str")]
    provider: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "lenient_str")]
    auth_index: Option<Cow<'a, str>>,
    status_code: Num,
    #[serde(borrow, deserialize_with = "lenient_object")]
    auth_status: Option<RawStatus<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawStatus<'a> {
    #[serde(borrow, deserialize_with = "lenient_str")]
    status: Option<Cow<'a, str>>,
    #[serde(deserialize_with = "lenient_bool")]
    disabled: Option<bool>,
    #[serde(deserialize_with = "lenient_bool")]
    unavailable: Option<bool>,
    #[serde(borrow, deserialize_with = "lenient_str")]
    next_retry_after: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "lenient_object")]
    quota: Option<RawQuota<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawQuota<'a> {
    #[serde(deserialize_with = "lenient_bool")]
    exceeded: Option<bool>,
    #[serde(borrow, deserialize_with = "lenient_str")]
    next_recover_at: Option<Cow<'a, str>>,
}

impl RawStatus<'_> {
    fn state(self) -> CredentialState {
        let quota = self.quota.unwrap_or_default();
        CredentialState {
            status: self.status.as_deref().map(status),
            disabled: self.disabled,
            unavailable: self.unavailable,
            next_retry_after: time(self.next_retry_after.as_deref()),
            quota_exceeded: quota.exceeded,
            quota_recover_at: time(quota.next_recover_at.as_deref()),
        }
    }
}

/// CPA's status word, as the credentials listing reads it.
fn status(s: &str) -> Status {
    Status::ALL
        .into_iter()
        .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
        .unwrap_or(Status::Unknown)
}

/// An RFC 3339 time after the epoch (Go's zero time, `0001-01-01T00:00:00Z`, means none).
fn time(s: Option<&str>) -> Option<f64> {
    s.and_then(parse_rfc3339).filter(|t| *t > 0.0)
}

/// A nested object; any other JSON value is skipped and reads as `None` (an event whose state
/// is malformed still counts as an error).
fn lenient_object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectVisitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Option<T>, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(ObjectVisitor(std::marker::PhantomData))
}

/// A boolean; any other JSON value is skipped and reads as `None`.
fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct BoolVisitor;
    impl<'de> Visitor<'de> for BoolVisitor {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a boolean")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map
                .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                .is_some()
            {}
            Ok(None)
        }
    }
    d.deserialize_any(BoolVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from the real CPA v7.2.140 (`SUBSCRIBE errors`), an OpenAI-compatible upstream
    /// answering 429 to a request with `request-retry: 0`.
    const REAL_429: &str = r#"{"timestamp":"2026-12-07T21:28:16.262223979Z","provider":"openai-compatible-fakeup","model":"fake-ok","auth_id":"openai-compatibility:fakeup:dbfc58a4d9e6","auth_index":"27317114bd5866cb","status_code":429,"body":"{\"error\": {\"message\": \"Rate limit reached for sk-upstream-secret user alice@example.com\", \"type\": \"rate_limit\", \"code\": \"rate_limit_exceeded\"}}","auth_status":{"status":"error","status_message":"{\"error\": {\"message\": \"Rate limit reached for sk-upstream-secret user alice@example.com\", \"type\": \"rate_limit\", \"code\": \"rate_limit_exceeded\"}}","disabled":false,"unavailable":true,"next_retry_after":"2026-12-07T21:28:17.262180928Z","quota":{"exceeded":true,"reason":"quota","next_recover_at":"2026-12-07T21:28:17.262180928Z","backoff_level":1},"model":{"name":"fake-ok","status":"error","status_message":"{\"error\": {\"message\": \"Rate limit reached for sk-upstream-secret user alice@example.com\", \"type\": \"rate_limit\", \"code\": \"rate_limit_exceeded\"}}","unavailable":true,"next_retry_after":"2026-12-07T21:28:17.262180928Z","quota":{"exceeded":true,"reason":"quota","next_recover_at":"2026-12-07T21:28:17.262180928Z","backoff_level":1}}}}"#;

    /// The same credential answering 500 right after: a 60 s cooldown, and the quota block of
    /// the 429 still reported (with its recovery time already past).
    const REAL_500: &str = r#"{"timestamp":"2026-12-07T21:28:27.356078894Z","provider":"openai-compatible-fakeup","model":"fake-ok","auth_id":"openai-compatibility:fakeup:dbfc58a4d9e6","auth_index":"27317114bd5866cb","status_code":500,"body":"{\"error\": {\"message\": \"Rate limit reached for sk-upstream-secret user alice@example.com\", \"type\": \"rate_limit\", \"code\": \"rate_limit_exceeded\"}}","auth_status":{"status":"error","status_message":"{\"error\": {\"message\": \"Rate limit reached for sk-upstream-secret user alice@example.com\", \"type\": \"rate_limit\", \"code\": \"rate_limit_exceeded\"}}","disabled":false,"unavailable":true,"next_retry_after":"2026-12-07T21:29:27.35602328Z","quota":{"exceeded":true,"reason":"quota","next_recover_at":"2026-12-07T21:28:17.262180928Z","backoff_level":1},"model":{"name":"fake-ok","status":"error","status_message":"{\"error\": {\"message\": \"Rate limit reached for sk-upstream-secret user alice@example.com\", \"type\": \"rate_limit\", \"code\": \"rate_limit_exceeded\"}}","unavailable":true,"next_retry_after":"2026-12-07T21:29:27.35602328Z","quota":{"exceeded":true,"reason":"quota","next_recover_at":"2026-12-07T21:28:17.262180928Z","backoff_level":1}}}}"#;

    #[test]
    fn a_real_429_event_gives_the_credential_and_its_cooldown() {
        let e = decode(REAL_429.as_bytes()).unwrap();
        assert_eq!(e.provider.as_deref(), Some("openai-compatible-fakeup"));
        assert_eq!(e.auth_index.as_deref(), Some("27317114bd5866cb"));
        assert_eq!(e.status_code, Some(429));
        let s = e.state.unwrap();
        assert_eq!(s.status, Some(Status::Error));
        assert_eq!(s.disabled, Some(false));
        assert_eq!(s.unavailable, Some(true));
        let retry = parse_rfc3339("2026-12-07T21:28:17.262180928Z").unwrap();
        assert_eq!(s.next_retry_after, Some(retry));
        assert_eq!(s.quota_exceeded, Some(true));
        assert_eq!(s.quota_recover_at, Some(retry));
    }

    #[test]
    fn a_real_500_event_keeps_the_credential_level_times() {
        let e = decode(REAL_500.as_bytes()).unwrap();
        assert_eq!(e.status_code, Some(500));
        let s = e.state.unwrap();
        assert_eq!(
            s.next_retry_after,
            parse_rfc3339("2026-12-07T21:29:27.35602328Z")
        );
        assert_eq!(
            s.quota_recover_at,
            parse_rfc3339("2026-12-07T21:28:17.262180928Z")
        );
    }

    #[test]
    fn the_secret_bearing_fields_are_not_kept() {
        let e = decode(REAL_429.as_bytes()).unwrap();
        let shown = format!("{e:?}");
        for secret in [
            "sk-upstream",
            "alice",
            "openai-compatibility:fakeup",
            "Rate",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn strings_borrow_from_the_payload() {
        let e = decode(REAL_429.as_bytes()).unwrap();
        assert!(matches!(e.auth_index, Some(Cow::Borrowed(_))));
        assert!(matches!(e.provider, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn wrong_types_and_missing_fields_read_as_absent() {
        let e = decode(
            br#"{"provider":7,"auth_index":"","status_code":"x","auth_status":{"status":"Cooling","disabled":"no","unavailable":null,"next_retry_after":"0001-01-01T00:00:00Z","quota":[1]}}"#,
        )
        .unwrap();
        assert_eq!(e.provider, None);
        assert_eq!(e.auth_index, None);
        assert_eq!(e.status_code, None);
        let s = e.state.unwrap();
        assert_eq!(s.status, Some(Status::Unknown));
        assert_eq!((s.disabled, s.unavailable), (None, None));
        assert_eq!(s.next_retry_after, None);
        assert_eq!((s.quota_exceeded, s.quota_recover_at), (None, None));
        // No state at all: nothing to apply to the gauges.
        assert_eq!(
            decode(br#"{"status_code":"503"}"#).unwrap().status_code,
            Some(503)
        );
        assert_eq!(
            decode(br#"{"status_code":503,"auth_status":5}"#)
                .unwrap()
                .state,
            None
        );
        assert_eq!(
            decode(br#"{"status_code":70000}"#).unwrap().status_code,
            None
        );
    }

    #[test]
    fn non_objects_and_oversized_events_are_refused() {
        assert_eq!(decode(b"[1]"), Err(EventError::NotAnObject));
        assert_eq!(decode(b"{\"a\":"), Err(EventError::NotAnObject));
        assert_eq!(decode(b""), Err(EventError::NotAnObject));
        let big = format!(r#"{{"body":"{}"}}"#, "x".repeat(MAX_EVENT_BYTES));
        assert_eq!(decode(big.as_bytes()), Err(EventError::TooLarge));
    }
}
