//! Quota and rate-limit headers (API.md 2.2): the only values read from `response_headers`.
//!
//! Every other header is skipped without being decoded; a header of an unexpected shape is
//! ignored rather than spoiling the record, since usage counts matter more than quota gauges.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::time::parse_rfc3339;

/// A quota window: Codex's primary/secondary, Anthropic's unified 5-hour and 7-day windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    Primary,
    Secondary,
    FiveHour,
    SevenDay,
}

impl Window {
    pub const ALL: [Window; 4] = [
        Window::Primary,
        Window::Secondary,
        Window::FiveHour,
        Window::SevenDay,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Window::Primary => "primary",
            Window::Secondary => "secondary",
            Window::FiveHour => "5h",
            Window::SevenDay => "7d",
        }
    }
}

/// What an OpenAI-style rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Requests,
    Tokens,
}

impl Resource {
    pub fn label(self) -> &'static str {
        match self {
            Resource::Requests => "requests",
            Resource::Tokens => "tokens",
        }
    }
}

/// One gauge value derived from the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    UsedRatio(Window),
    WindowSeconds(Window),
    ResetTimestamp(Window),
    RateLimitRemaining(Resource),
    RateLimitLimit(Resource),
}

impl Field {
    /// Stable text form, as stored in SQLite.
    pub fn key(self) -> String {
        match self {
            Field::UsedRatio(w) => format!("used_ratio:{}", w.label()),
            Field::WindowSeconds(w) => format!("window_seconds:{}", w.label()),
            Field::ResetTimestamp(w) => format!("reset_timestamp:{}", w.label()),
            Field::RateLimitRemaining(r) => format!("ratelimit_remaining:{}", r.label()),
            Field::RateLimitLimit(r) => format!("ratelimit_limit:{}", r.label()),
        }
    }

    pub fn from_key(key: &str) -> Option<Field> {
        let (kind, arg) = key.split_once(':')?;
        let window = || Window::ALL.into_iter().find(|w| w.label() == arg);
        let resource = || {
            [Resource::Requests, Resource::Tokens]
                .into_iter()
                .find(|r| r.label() == arg)
        };
        Some(match kind {
            "used_ratio" => Field::UsedRatio(window()?),
            "window_seconds" => Field::WindowSeconds(window()?),
            "reset_timestamp" => Field::ResetTimestamp(window()?),
            "ratelimit_remaining" => Field::RateLimitRemaining(resource()?),
            "ratelimit_limit" => Field::RateLimitLimit(resource()?),
            _ => return None,
        })
    }
}

/// The quota gauge families, by their `family` label in `cpa_exporter_series` and
/// `cpa_exporter_series_overflow_total` (the metric name without `cpa_`). Index = [`Field::family`];
/// the last one has one series per credential.
pub const FAMILIES: [&str; 6] = [
    "quota_used_ratio",
    "quota_window_seconds",
    "quota_reset_timestamp_seconds",
    "ratelimit_remaining",
    "ratelimit_limit",
    "quota_last_observed_timestamp_seconds",
];
/// Index in [`FAMILIES`] of the one-series-per-credential family.
pub const PER_CREDENTIAL: usize = 5;

impl Field {
    /// Index in [`FAMILIES`] of the gauge family this field is a series of.
    pub fn family(self) -> usize {
        match self {
            Field::UsedRatio(_) => 0,
            Field::WindowSeconds(_) => 1,
            Field::ResetTimestamp(_) => 2,
            Field::RateLimitRemaining(_) => 3,
            Field::RateLimitLimit(_) => 4,
        }
    }
}

/// How a header's text becomes a field value.
#[derive(Debug, Clone, Copy)]
enum Conv {
    /// A percentage, 0..100.
    Percent,
    /// Anthropic's utilization: a ratio, though a value above 1.5 is taken as a percentage.
    Utilization,
    Minutes,
    /// Seconds from the observation.
    SecondsFromNow,
    /// A point in time: Unix seconds (or milliseconds), or RFC 3339.
    Timestamp,
    Count,
}

const HEADERS: [(&str, Field, Conv); 16] = [
    (
        "x-codex-primary-used-percent",
        Field::UsedRatio(Window::Primary),
        Conv::Percent,
    ),
    (
        "x-codex-primary-window-minutes",
        Field::WindowSeconds(Window::Primary),
        Conv::Minutes,
    ),
    (
        "x-codex-primary-reset-after-seconds",
        Field::ResetTimestamp(Window::Primary),
        Conv::SecondsFromNow,
    ),
    (
        "x-codex-primary-reset-at",
        Field::ResetTimestamp(Window::Primary),
        Conv::Timestamp,
    ),
    (
        "x-codex-secondary-used-percent",
        Field::UsedRatio(Window::Secondary),
        Conv::Percent,
    ),
    (
        "x-codex-secondary-window-minutes",
        Field::WindowSeconds(Window::Secondary),
        Conv::Minutes,
    ),
    (
        "x-codex-secondary-reset-after-seconds",
        Field::ResetTimestamp(Window::Secondary),
        Conv::SecondsFromNow,
    ),
    (
        "x-codex-secondary-reset-at",
        Field::ResetTimestamp(Window::Secondary),
        Conv::Timestamp,
    ),
    (
        "x-ratelimit-limit-requests",
        Field::RateLimitLimit(Resource::Requests),
        Conv::Count,
    ),
    (
        "x-ratelimit-remaining-requests",
        Field::RateLimitRemaining(Resource::Requests),
        Conv::Count,
    ),
    (
        "x-ratelimit-limit-tokens",
        Field::RateLimitLimit(Resource::Tokens),
        Conv::Count,
    ),
    (
        "x-ratelimit-remaining-tokens",
        Field::RateLimitRemaining(Resource::Tokens),
        Conv::Count,
    ),
    (
        "anthropic-ratelimit-unified-5h-utilization",
        Field::UsedRatio(Window::FiveHour),
        Conv::Utilization,
    ),
    (
        "anthropic-ratelimit-unified-5h-reset",
        Field::ResetTimestamp(Window::FiveHour),
        Conv::Timestamp,
    ),
    (
        "anthropic-ratelimit-unified-7d-utilization",
        Field::UsedRatio(Window::SevenDay),
        Conv::Utilization,
    ),
    (
        "anthropic-ratelimit-unified-7d-reset",
        Field::ResetTimestamp(Window::SevenDay),
        Conv::Timestamp,
    ),
];

/// Longest header value read; quota values are short numbers or timestamps.
const MAX_VALUE_CHARS: usize = 64;

/// The quota header values of one record, still as text (converted once the time is known),
/// borrowed from the response where they hold no escapes: one slot per known header, the last
/// occurrence wins. Decoding them allocates nothing.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct QuotaHeaders<'a>([Option<Cow<'a, str>>; HEADERS.len()]);

impl QuotaHeaders<'_> {
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// Each field value as of `observed_at` (Unix seconds), in header order. Anthropic windows
    /// imply their length.
    pub fn for_each_field(&self, observed_at: f64, mut f: impl FnMut(Field, f64)) {
        for (text, (_, field, conv)) in self.0.iter().zip(HEADERS) {
            let Some(text) = text else { continue };
            if let Some(v) = convert(conv, text.trim(), observed_at) {
                f(field, v);
                match field {
                    Field::UsedRatio(Window::FiveHour) => {
                        f(Field::WindowSeconds(Window::FiveHour), 5.0 * 3600.0);
                    }
                    Field::UsedRatio(Window::SevenDay) => {
                        f(Field::WindowSeconds(Window::SevenDay), 7.0 * 86_400.0);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Field values as of `observed_at` (Unix seconds).
    pub fn fields(&self, observed_at: f64) -> BTreeMap<Field, f64> {
        let mut out = BTreeMap::new();
        self.for_each_field(observed_at, |field, v| {
            out.insert(field, v);
        });
        out
    }
}

fn convert(conv: Conv, text: &str, observed_at: f64) -> Option<f64> {
    let num = || {
        text.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    match conv {
        Conv::Percent => num().map(|p| (p / 100.0).min(1.0)),
        Conv::Utilization => num().map(|u| if u > 1.5 { u / 100.0 } else { u }.min(1.0)),
        Conv::Minutes => num().map(|m| m * 60.0),
        Conv::SecondsFromNow => num().map(|s| observed_at + s),
        // Above 1e12 a Unix time can only be in milliseconds.
        Conv::Timestamp => num()
            .map(|t| if t > 1e12 { t / 1000.0 } else { t })
            .or_else(|| parse_rfc3339(text)),
        Conv::Count => num(),
    }
}

/// Shortest and longest known header name: a cheap pre-check, most response headers are
/// neither quota nor rate-limit headers.
const NAME_LEN: std::ops::RangeInclusive<usize> = {
    let (mut min, mut max, mut i) = (usize::MAX, 0, 0);
    while i < HEADERS.len() {
        let len = HEADERS[i].0.len();
        min = if len < min { len } else { min };
        max = if len > max { len } else { max };
        i += 1;
    }
    min..=max
};

fn header_index(name: &str) -> Option<usize> {
    let first = name.as_bytes().first()?.to_ascii_lowercase();
    if (first != b'x' && first != b'a') || !NAME_LEN.contains(&name.len()) {
        return None;
    }
    HEADERS
        .iter()
        .position(|(h, _, _)| h.len() == name.len() && h.eq_ignore_ascii_case(name))
}

/// `response_headers`: `name -> [values]`. Only known names are decoded (their first value).
pub fn deserialize_quota_headers<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<QuotaHeaders<'de>, D::Error> {
    struct MapVisitor;
    impl<'de> Visitor<'de> for MapVisitor {
        type Value = QuotaHeaders<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of header names to values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<QuotaHeaders<'de>, A::Error> {
            let mut out = QuotaHeaders::default();
            while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                match header_index(&name) {
                    Some(i) => {
                        if let FirstValue(Some(v)) = map.next_value()? {
                            out.0[i] = Some(v);
                        }
                    }
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(out)
        }
        // Anything but a map (null, a string, ...) carries no quota information.
        fn visit_unit<E: de::Error>(self) -> Result<QuotaHeaders<'de>, E> {
            Ok(QuotaHeaders::default())
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<QuotaHeaders<'de>, E> {
            Ok(QuotaHeaders::default())
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<QuotaHeaders<'de>, E> {
            Ok(QuotaHeaders::default())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<QuotaHeaders<'de>, E> {
            Ok(QuotaHeaders::default())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<QuotaHeaders<'de>, E> {
            Ok(QuotaHeaders::default())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<QuotaHeaders<'de>, E> {
            Ok(QuotaHeaders::default())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<QuotaHeaders<'de>, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(QuotaHeaders::default())
        }
    }
    d.deserialize_any(MapVisitor)
}

/// The first string of a header's value list (or the value itself if it is a bare string),
/// borrowed when it holds no escapes.
struct FirstValue<'a>(Option<Cow<'a, str>>);

/// At most [`MAX_VALUE_CHARS`] characters of `v`.
fn bounded(v: &str) -> &str {
    match v.char_indices().nth(MAX_VALUE_CHARS) {
        Some((i, _)) => &v[..i],
        None => v,
    }
}

impl<'de> de::Deserialize<'de> for FirstValue<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FirstValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of header values")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<FirstValue<'de>, E> {
                Ok(FirstValue(Some(Cow::Borrowed(bounded(v)))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FirstValue<'de>, E> {
                Ok(FirstValue(Some(Cow::Owned(bounded(v).to_owned()))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FirstValue<'de>, E> {
                Ok(FirstValue(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<FirstValue<'de>, E> {
                Ok(FirstValue(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<FirstValue<'de>, E> {
                Ok(FirstValue(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<FirstValue<'de>, E> {
                Ok(FirstValue(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<FirstValue<'de>, E> {
                Ok(FirstValue(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstValue<'de>, A::Error> {
                let first = seq.next_element::<FirstValue<'de>>()?.and_then(|f| f.0);
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstValue(first))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstValue<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FirstValue(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> QuotaHeaders<'_> {
        let mut de = serde_json::Deserializer::from_str(json);
        deserialize_quota_headers(&mut de).unwrap()
    }

    #[test]
    fn codex_headers_become_ratios_seconds_and_timestamps() {
        let h = parse(
            r#"{"X-Codex-Primary-Used-Percent":["42"],"x-codex-primary-window-minutes":["300"],
                "x-codex-primary-reset-after-seconds":["600"],"x-codex-secondary-used-percent":["7.5"],
                "x-codex-secondary-reset-at":["1790000000"],"Set-Cookie":["secret"],"x-request-id":["abc"]}"#,
        );
        let f = h.fields(1000.0);
        assert_eq!(f[&Field::UsedRatio(Window::Primary)], 0.42);
        assert_eq!(f[&Field::WindowSeconds(Window::Primary)], 18_000.0);
        assert_eq!(f[&Field::ResetTimestamp(Window::Primary)], 1600.0);
        assert_eq!(f[&Field::UsedRatio(Window::Secondary)], 0.075);
        assert_eq!(
            f[&Field::ResetTimestamp(Window::Secondary)],
            1_790_000_000.0
        );
        assert_eq!(f.len(), 5);
    }

    #[test]
    fn anthropic_and_openai_headers() {
        let h = parse(
            r#"{"anthropic-ratelimit-unified-5h-utilization":["0.91"],"anthropic-ratelimit-unified-5h-reset":["1790003600"],
                "anthropic-ratelimit-unified-7d-utilization":["35"],"x-ratelimit-remaining-tokens":["12000"],
                "x-ratelimit-limit-tokens":"40000"}"#,
        );
        let f = h.fields(0.0);
        assert_eq!(f[&Field::UsedRatio(Window::FiveHour)], 0.91);
        assert_eq!(f[&Field::WindowSeconds(Window::FiveHour)], 18_000.0);
        assert_eq!(f[&Field::UsedRatio(Window::SevenDay)], 0.35);
        assert_eq!(f[&Field::RateLimitRemaining(Resource::Tokens)], 12_000.0);
        assert_eq!(f[&Field::RateLimitLimit(Resource::Tokens)], 40_000.0);
    }

    #[test]
    fn odd_shapes_are_ignored_not_fatal() {
        for json in [
            r#"null"#,
            r#""x""#,
            r#"[1,2]"#,
            r#"{"x-codex-primary-used-percent":{"a":1}}"#,
            r#"{"x-codex-primary-used-percent":[]}"#,
            r#"{"x-codex-primary-used-percent":["lots"]}"#,
        ] {
            assert!(parse(json).fields(0.0).is_empty(), "{json}");
        }
    }

    #[test]
    fn field_keys_round_trip() {
        for (_, field, _) in HEADERS {
            assert_eq!(Field::from_key(&field.key()), Some(field));
        }
    }
}
