//! Property tests of record decoding and token accounting: no input makes them panic, buckets
//! never overflow, and token totals are conserved.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::decode::{self, Element, Num, RawBreakdown, RawInput, RawOutput, RawRecord, RawTokens};
use super::tokens::{self, Semantics, Tokens};
use super::{from_body, ingest_elements, Batch};
use crate::families::Family;
use crate::pricing::Pricing;
use crate::series::Value as SeriesValue;

fn sum(batch: &Batch, family: Family) -> u64 {
    batch.delta.families[family as usize]
        .values()
        .map(|v| match v {
            SeriesValue::Counter(n) => *n,
            SeriesValue::Histogram(h) => h.count,
        })
        .sum()
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(".{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A count as CPA might send it, or might not: mostly sane, sometimes hostile.
fn any_count() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (0u64..100_000).prop_map(Value::from),
        1 => (0u64..=decode::MAX_NUMBER).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        1 => (0u64..1000).prop_map(|n| Value::from(n.to_string())),
        1 => any_json(),
    ]
}

const TOKEN_FIELDS: [&str; 7] = [
    "input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "cache_read_tokens",
    "cache_creation_tokens",
    "total_tokens",
];
const PROVIDERS: [&str; 6] = ["codex", "claude", "gemini", "openai-compatibility", "x", ""];

/// A record whose every known field may hold anything, with any extra fields.
fn any_record() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(any_count(), 7),
        prop::sample::select(PROVIDERS.to_vec()),
        any_count(),
        any_count(),
        any_json(),
        prop::option::of(any_json()),
        any::<bool>(),
        prop::collection::btree_map("[a-z_]{1,8}", any_json(), 0..4),
    )
        .prop_map(
            |(counts, provider, latency, ttft, model, breakdown, failed, extra)| {
                let mut tokens = Map::new();
                for (name, v) in TOKEN_FIELDS.iter().zip(counts) {
                    tokens.insert((*name).to_owned(), v);
                }
                let mut rec: Map<String, Value> = extra.into_iter().collect();
                rec.insert("timestamp".into(), json!("2026-11-24T10:00:00Z"));
                rec.insert("provider".into(), json!(provider));
                rec.insert("model".into(), model);
                rec.insert("latency_ms".into(), latency);
                rec.insert("ttft_ms".into(), ttft);
                rec.insert("failed".into(), json!(failed));
                rec.insert("tokens".into(), Value::Object(tokens));
                if let Some(b) = breakdown {
                    rec.insert("accounting_version".into(), json!(2));
                    rec.insert("token_breakdown".into(), b);
                }
                Value::Object(rec)
            },
        )
}

fn num() -> impl Strategy<Value = Num> {
    prop_oneof![
        8 => (0u64..1_000_000).prop_map(|n| Num(Some(n))),
        2 => (0u64..=decode::MAX_NUMBER).prop_map(|n| Num(Some(n))),
        1 => Just(Num(None)),
    ]
}

fn raw_tokens() -> impl Strategy<Value = RawTokens> {
    prop::collection::vec(num(), 7).prop_map(|v| RawTokens {
        input_tokens: v[0],
        output_tokens: v[1],
        reasoning_tokens: v[2],
        cached_tokens: v[3],
        cache_read_tokens: v[4],
        cache_creation_tokens: v[5],
        total_tokens: v[6],
    })
}

fn semantics() -> impl Strategy<Value = Semantics> {
    prop::sample::select(vec![
        Semantics::Subset,
        Semantics::Independent,
        Semantics::SeparateReasoning,
        Semantics::Unknown,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoding_never_panics_on_arbitrary_text(text in ".{0,300}") {
        let _ = decode::decode_element(&text);
        let _ = from_body(text.as_bytes(), &Pricing::embedded(), |_| false);
    }

    #[test]
    fn ingest_never_panics_on_arbitrary_bytes(
        body in prop::collection::vec(any::<u8>(), 0..400),
        elements in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
    ) {
        let mut array = b"[".to_vec();
        array.extend_from_slice(&body);
        let _ = from_body(&body, &Pricing::embedded(), |_| false);
        let _ = from_body(&array, &Pricing::embedded(), |_| false);
        let batch = ingest_elements(&elements, &Pricing::embedded(), |_| false);
        prop_assert_eq!(sum(&batch, Family::Records), elements.len() as u64);
    }

    /// Hostile records in any mix: every element gets exactly one outcome, every invalid one
    /// exactly one reason, and what is ingested is requests.
    #[test]
    fn every_element_is_accounted_for_once(
        records in prop::collection::vec(prop_oneof![4 => any_record(), 1 => any_json()], 0..12),
        wrap in prop::collection::vec(any::<bool>(), 12),
    ) {
        let texts: Vec<String> = records
            .iter()
            .zip(&wrap)
            .map(|(r, w)| {
                let text = r.to_string();
                if *w { Value::String(text).to_string() } else { text }
            })
            .collect();
        let body = format!("[{}]", texts.join(","));
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        prop_assert_eq!(batch.elements, records.len());
        prop_assert_eq!(sum(&batch, Family::Records), records.len() as u64);
        let invalid: u64 = batch.invalid.values().sum();
        prop_assert_eq!(sum(&batch, Family::InvalidRecords), invalid);
        prop_assert_eq!(sum(&batch, Family::Requests), batch.ingested);
        // RESP hands over the same payloads one by one: same outcomes.
        let elements: Vec<Vec<u8>> = texts.iter().map(|t| t.clone().into_bytes()).collect();
        let resp = ingest_elements(&elements, &Pricing::embedded(), |_| false);
        prop_assert_eq!(resp.ingested, batch.ingested);
        prop_assert_eq!(resp.invalid, batch.invalid);
    }

    /// The buckets of a batch add up to the sum of its records' totals (nothing lost, nothing
    /// invented), whatever the mix of semantics and contradictions.
    #[test]
    fn token_totals_are_conserved_over_a_batch(records in prop::collection::vec(any_record(), 1..12)) {
        let mut expected = 0u64;
        let mut texts = Vec::new();
        for r in &records {
            let text = r.to_string();
            if let Element::Usage(rec) = decode::decode_element(&text) {
                // A record counts only if all its numbers are valid (latency too).
                if let Ok(o) = super::Observation::of(&rec) {
                    prop_assert_eq!(Ok(o.tokens), tokens::account(&rec));
                    expected += o.tokens.total();
                }
            }
            texts.push(text);
        }
        let body = format!("[{}]", texts.join(","));
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        prop_assert_eq!(sum(&batch, Family::Tokens), expected);
    }

    /// Derived buckets: never an overflow, and a reported total is always kept: either split by
    /// the provider's semantics, or, when the numbers contradict them, all unclassified.
    #[test]
    fn derived_buckets_keep_the_reported_total(raw in raw_tokens(), sem in semantics()) {
        let Ok(t) = tokens::derive(&raw, sem) else {
            let fields = [raw.input_tokens, raw.output_tokens, raw.reasoning_tokens,
                raw.cached_tokens, raw.cache_read_tokens, raw.cache_creation_tokens, raw.total_tokens];
            prop_assert!(fields.iter().any(|f| f.0.is_none()), "only invalid numbers fail");
            return Ok(());
        };
        let total = raw.total_tokens.0.unwrap_or(0);
        let sum = t.0.iter().try_fold(0u64, |a, b| a.checked_add(*b));
        prop_assert!(sum.is_some(), "buckets overflow: {:?}", t);
        if total > 0 {
            prop_assert_eq!(t.total(), total);
            let unclassified = t.0[Tokens::UNCLASSIFIED];
            prop_assert!(unclassified == 0 || unclassified == total, "{:?}", t);
        }
        if sem == Semantics::Unknown {
            prop_assert_eq!(t.total(), t.0[Tokens::UNCLASSIFIED]);
        }
    }

    /// A v2 breakdown that satisfies its invariants is taken exactly; one that does not is not
    /// trusted, and the raw fields decide.
    #[test]
    fn breakdowns_are_taken_only_when_consistent(
        parts in prop::collection::vec(0u64..1_000_000, 6),
        skew in 0u64..3,
        raw in raw_tokens(),
    ) {
        let [uncached, cr, cw, non_reasoning, reasoning, unclassified] = parts[..] else {
            unreachable!()
        };
        let input = uncached + cr + cw;
        let output = non_reasoning + reasoning;
        let rec = RawRecord {
            accounting_version: Num(Some(2)),
            provider: Some("codex".into()),
            tokens: Some(raw),
            token_breakdown: Some(RawBreakdown {
                total_tokens: Num(Some(input + output + unclassified + skew)),
                input: Some(RawInput {
                    total_tokens: Num(Some(input)),
                    uncached_tokens: Num(Some(uncached)),
                    cache_read_tokens: Num(Some(cr)),
                    cache_write_tokens: Num(Some(cw)),
                }),
                output: Some(RawOutput {
                    total_tokens: Num(Some(output)),
                    non_reasoning_tokens: Num(Some(non_reasoning)),
                    reasoning_tokens: Num(Some(reasoning)),
                }),
                unclassified_tokens: Num(Some(unclassified)),
            }),
            ..RawRecord::default()
        };
        let got = tokens::account(&rec);
        if skew == 0 {
            prop_assert_eq!(got, Ok(Tokens([uncached, cr, cw, non_reasoning, reasoning, unclassified])));
        } else {
            let raw = rec.tokens.as_ref().unwrap();
            prop_assert_eq!(got, tokens::derive(raw, Semantics::Subset));
        }
    }
}

/// The largest accepted counts, as many as a batch can hold: sums saturate, never wrap or panic.
#[test]
fn huge_counts_saturate_instead_of_overflowing() {
    let rec = format!(
        r#"{{"timestamp":"2026-11-24T10:00:00Z","provider":"claude","model":"m","latency_ms":{max},"ttft_ms":{max},
            "tokens":{{"input_tokens":{max},"output_tokens":{max},"reasoning_tokens":{max},"cache_read_tokens":{max},
            "cache_creation_tokens":{max}}}}}"#,
        max = decode::MAX_NUMBER
    );
    let n = 20_000;
    let body = format!("[{}]", vec![rec; n].join(","));
    let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
    assert_eq!(batch.ingested, n as u64);
    let input = batch.delta.families[Family::Tokens as usize]
        .iter()
        .find(|(labels, _)| &*labels[4] == "input")
        .map(|(_, v)| v.clone());
    assert_eq!(input, Some(SeriesValue::Counter(u64::MAX)));
    // One more than the largest count is not a count.
    let over = format!(
        r#"[{{"timestamp":"t","tokens":{{"input_tokens":{}}}}}]"#,
        decode::MAX_NUMBER + 1
    );
    let batch = from_body(over.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
    assert_eq!(batch.invalid.get("invalid_number"), Some(&1));
}
