//! Lenient decoding of one usage-queue element into a borrowed record.
//!
//! Only the fields the exporter uses are declared; serde skips the rest (including secrets such as
//! `fail.body`, `client_ip` and most of `response_headers`) without allocating. Strings borrow from
//! the batch buffer unless they contain escapes.

use std::borrow::Cow;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::families::reason;

/// Largest token count or latency accepted; anything above is corrupt data, not usage.
pub const MAX_NUMBER: u64 = 1_000_000_000_000_000;

/// A non-negative integer that CPA may send as a number or a numeric string. Decoding never fails
/// on a number-like value; bad values are remembered and turned into an `invalid_number` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Num(pub Option<u64>);

impl Num {
    pub const ZERO: Num = Num(Some(0));
}

/// A missing field is zero, as CPA's Go structs default it.
impl Default for Num {
    fn default() -> Self {
        Num::ZERO
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NumVisitor;
        impl Visitor<'_> for NumVisitor {
            type Value = Num;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num((v <= MAX_NUMBER).then_some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Ok(Num(None)),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Num, E> {
                // Integral floats (`12.0`) are accepted; fractions and negatives are not usage.
                if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= MAX_NUMBER as f64 {
                    Ok(Num(Some(v as u64)))
                } else {
                    Ok(Num(None))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Num, E> {
                match v.trim().parse::<u64>() {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Ok(Num(None)),
                }
            }
            fn visit_unit<E: de::Error>(self) -> Result<Num, E> {
                Ok(Num::ZERO)
            }
        }
        d.deserialize_any(NumVisitor)
    }
}

/// Decode a nested struct only from a JSON object (or `null`, meaning absent). serde's derived
/// structs also accept arrays, which would turn `"tokens":[1]` into one input token.
fn object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
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
        fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Option<T>, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_any(ObjectVisitor(std::marker::PhantomData))
}

/// A string, borrowed when it has no escapes; any other JSON value is skipped and reads as `None`.
pub(crate) fn lenient_str<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct StrVisitor;
    impl<'de> Visitor<'de> for StrVisitor {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
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
    d.deserialize_any(StrVisitor)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawTokens {
    pub input_tokens: Num,
    pub output_tokens: Num,
    pub reasoning_tokens: Num,
    pub cached_tokens: Num,
    pub cache_read_tokens: Num,
    pub cache_creation_tokens: Num,
    pub total_tokens: Num,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawInput {
    pub total_tokens: Num,
    pub uncached_tokens: Num,
    pub cache_read_tokens: Num,
    pub cache_write_tokens: Num,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawOutput {
    pub total_tokens: Num,
    pub non_reasoning_tokens: Num,
    pub reasoning_tokens: Num,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawBreakdown {
    pub total_tokens: Num,
    #[serde(deserialize_with = "object")]
    pub input: Option<RawInput>,
    #[serde(deserialize_with = "object")]
    pub output: Option<RawOutput>,
    pub unclassified_tokens: Num,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawFail {
    pub status_code: Num,
}

/// The fields of a usage record the exporter reads. `null` counts as missing everywhere.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRecord<'a> {
    #[serde(borrow)]
    pub timestamp: Option<Cow<'a, str>>,
    pub latency_ms: Option<Num>,
    pub ttft_ms: Num,
    #[serde(borrow)]
    pub auth_index: Option<Cow<'a, str>>,
    #[serde(deserialize_with = "object")]
    pub tokens: Option<RawTokens>,
    pub failed: Option<bool>,
    #[serde(deserialize_with = "object")]
    pub fail: Option<RawFail>,
    pub accounting_version: Num,
    #[serde(deserialize_with = "object")]
    pub token_breakdown: Option<RawBreakdown>,
    #[serde(borrow)]
    pub provider: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub executor_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub alias: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub endpoint: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub api_key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub event_id: Option<Cow<'a, str>>,
    /// CPA's id of the client request, shared by the attempts of one inbound request: it
    /// groups them (hashed), and appears only in OpenMetrics exemplars and the opt-in event
    /// log, never as a label or stored text. Anything but a string reads as absent, so a
    /// malformed id never costs the record.
    #[serde(borrow, deserialize_with = "lenient_str")]
    pub request_id: Option<Cow<'a, str>>,
    /// Only the quota and rate-limit headers; nothing else of `response_headers` is read.
    #[serde(borrow, deserialize_with = "super::quota::deserialize_quota_headers")]
    pub response_headers: super::quota::QuotaHeaders<'a>,
}

/// What one queue element turned out to be.
#[derive(Debug)]
pub enum Element<'a> {
    Usage(Box<RawRecord<'a>>),
    /// An object without `timestamp`: CPA's `{"support_refresh":true}` style control payloads.
    Control,
    Invalid(&'static str),
}

/// Classify and decode one element of the queue's JSON array (given as its raw JSON text).
///
/// A JSON-string element carries a payload CPA could not parse as JSON; when its content is an
/// object after all, it is decoded like one. The returned record may own its strings then.
pub fn decode_element(raw: &str) -> Element<'_> {
    match raw.as_bytes().first() {
        Some(b'{') => decode_object(raw),
        Some(b'"') => match serde_json::from_str::<String>(raw) {
            Ok(inner) => decode_wrapped(&inner),
            Err(_) => Element::Invalid(reason::NOT_JSON),
        },
        // Over RESP an element is the raw payload, which need not be JSON at all.
        _ => match serde_json::from_str::<serde::de::IgnoredAny>(raw) {
            Ok(_) => Element::Invalid(reason::NOT_OBJECT),
            Err(_) => Element::Invalid(reason::NOT_JSON),
        },
    }
}

fn decode_wrapped(inner: &str) -> Element<'static> {
    let trimmed = inner.trim_start();
    if !trimmed.starts_with('{') {
        return match serde_json::from_str::<serde::de::IgnoredAny>(trimmed) {
            Ok(_) => Element::Invalid(reason::NOT_OBJECT),
            Err(_) => Element::Invalid(reason::NOT_JSON),
        };
    }
    // The same depth rule as for elements; `Value` would also stop at serde_json's limit (128).
    if crate::cpa::split::nesting(trimmed.as_bytes()) > crate::cpa::split::MAX_ELEMENT_DEPTH {
        return Element::Invalid(reason::TOO_DEEP);
    }
    match serde_json::from_str::<serde_json::value::Value>(trimmed) {
        Err(e) => Element::Invalid(syntax_reason(&e)),
        // Rare path: decoding from a `Value` yields owned strings, free of the local buffer.
        Ok(value) => match RawRecord::deserialize(value) {
            Ok(rec) => classify(rec),
            Err(_) => Element::Invalid(reason::BAD_FIELD),
        },
    }
}

fn decode_object(raw: &str) -> Element<'_> {
    match serde_json::from_str::<RawRecord<'_>>(raw) {
        Ok(rec) => classify(rec),
        Err(e) if e.is_syntax() || e.is_eof() => Element::Invalid(syntax_reason(&e)),
        Err(_) => Element::Invalid(reason::BAD_FIELD),
    }
}

/// serde_json reports a number beyond f64 (`1e400`) as a syntax error; in a record that can only
/// be a count, so it is an invalid number rather than broken JSON.
fn syntax_reason(e: &serde_json::Error) -> &'static str {
    if e.to_string().starts_with("number out of range") {
        reason::INVALID_NUMBER
    } else {
        reason::NOT_JSON
    }
}

fn classify(rec: RawRecord<'_>) -> Element<'_> {
    if rec.timestamp.is_none() {
        Element::Control
    } else {
        Element::Usage(Box::new(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(raw: &str) -> RawRecord<'_> {
        match decode_element(raw) {
            Element::Usage(r) => *r,
            other => panic!("expected usage, got {other:?}"),
        }
    }

    #[test]
    fn objects_decode_and_unknown_fields_are_ignored() {
        let r = usage(
            r#"{"timestamp":"2026-08-22T14:39:03Z","model":"m","fail":{"status_code":429,"body":"x"},"zzz":[1,2]}"#,
        );
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(r.fail.map(|f| f.status_code), Some(Num(Some(429))));
    }

    #[test]
    fn string_elements_holding_objects_decode_like_objects() {
        let r = usage(r#""{\"timestamp\":\"t\",\"model\":\"gpt\"}""#);
        assert_eq!(r.model.as_deref(), Some("gpt"));
    }

    #[test]
    fn elements_are_classified_with_reasons() {
        let reason = |raw| match decode_element(raw) {
            Element::Invalid(r) => r,
            other => panic!("{raw}: {other:?}"),
        };
        assert_eq!(reason(r#""not json at all""#), reason::NOT_JSON);
        assert_eq!(reason(r#""[1,2]""#), reason::NOT_OBJECT);
        assert_eq!(reason("42"), reason::NOT_OBJECT);
        assert_eq!(reason("null"), reason::NOT_OBJECT);
        assert_eq!(reason(r#"{"timestamp":5}"#), reason::BAD_FIELD);
        assert_eq!(
            reason(r#"{"timestamp":"t","failed":"yes"}"#),
            reason::BAD_FIELD
        );
        assert_eq!(
            reason(r#"{"timestamp":"t","tokens":[1]}"#),
            reason::BAD_FIELD
        );
        assert!(matches!(
            decode_element(r#"{"support_refresh":true}"#),
            Element::Control
        ));
    }

    #[test]
    fn numbers_are_lenient_but_never_negative_or_fractional() {
        let n = |v: &str| serde_json::from_str::<Num>(v).unwrap().0;
        assert_eq!(n("12"), Some(12));
        assert_eq!(n("12.0"), Some(12));
        assert_eq!(n(r#"" 12 ""#), Some(12));
        assert_eq!(n("null"), Some(0));
        assert_eq!(n("-1"), None);
        assert_eq!(n("1.5"), None);
        assert_eq!(n(r#""abc""#), None);
        assert_eq!(n("1e300"), None);
        assert_eq!(n("18446744073709551615"), None);
    }
}
