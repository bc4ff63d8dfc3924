//! Token accounting: turn a record's token fields into non-overlapping buckets (API.md 2.1).
//!
//! A v2 `token_breakdown` that satisfies its invariants is taken as is. Otherwise the breakdown is
//! derived the way CPA's `EnsureTokenBreakdownForProvider` does, from the provider's semantics. A
//! record whose numbers contradict each other is not guessed at: its whole total is unclassified.

use super::decode::{Num, RawBreakdown, RawRecord, RawTokens};
pub use crate::tokens::Tokens;

/// How a provider reports cache and reasoning tokens relative to input and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantics {
    /// Cache inside input, reasoning inside output (OpenAI style).
    Subset,
    /// Every field separate (Claude).
    Independent,
    /// Cache inside input, reasoning separate from output (Gemini family).
    SeparateReasoning,
    Unknown,
}

/// Pick the semantics from provider and executor type; first match wins (API.md 2.1).
pub fn semantics(provider: &str, executor_type: &str) -> Semantics {
    let p = provider.to_ascii_lowercase();
    let e = executor_type.to_ascii_lowercase();
    if p == "openai-compatibility"
        || p.starts_with("openai-compatible-")
        || e == "openaicompatexecutor"
    {
        return Semantics::Subset;
    }
    let v = format!("{p} {e}");
    let any = |words: &[&str]| words.iter().any(|w| v.contains(w));
    if any(&["claude", "anthropic"]) {
        Semantics::Independent
    } else if any(&["gemini", "aistudio", "antigravity", "vertex", "interaction"]) {
        Semantics::SeparateReasoning
    } else if any(&[
        "openai",
        "codex",
        "xai",
        "grok",
        "kimi",
        "qwen",
        "deepseek",
        "openrouter",
    ]) {
        Semantics::Subset
    } else {
        Semantics::Unknown
    }
}

/// A token field that is not a valid count (negative, fractional, absurd).
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidNumber;

fn n(v: Num) -> Result<u64, InvalidNumber> {
    v.0.ok_or(InvalidNumber)
}

/// The record's token buckets.
pub fn account(rec: &RawRecord<'_>) -> Result<Tokens, InvalidNumber> {
    if n(rec.accounting_version)? == 2 {
        if let Some(b) = &rec.token_breakdown {
            if let Some(t) = from_breakdown(b)? {
                return Ok(t);
            }
        }
    }
    let provider = rec.provider.as_deref().unwrap_or("");
    let executor = rec.executor_type.as_deref().unwrap_or("");
    match &rec.tokens {
        Some(raw) => derive(raw, semantics(provider, executor)),
        None => Ok(Tokens::default()),
    }
}

/// Buckets of a v2 breakdown, or `None` when it breaks its own invariants.
fn from_breakdown(b: &RawBreakdown) -> Result<Option<Tokens>, InvalidNumber> {
    let (Some(input), Some(output)) = (&b.input, &b.output) else {
        return Ok(None);
    };
    let (uncached, cr, cw) = (
        n(input.uncached_tokens)?,
        n(input.cache_read_tokens)?,
        n(input.cache_write_tokens)?,
    );
    let (non_reasoning, reasoning) = (n(output.non_reasoning_tokens)?, n(output.reasoning_tokens)?);
    let unclassified = n(b.unclassified_tokens)?;
    let (input_total, output_total, total) = (
        n(input.total_tokens)?,
        n(output.total_tokens)?,
        n(b.total_tokens)?,
    );
    let consistent = uncached + cr + cw == input_total
        && non_reasoning + reasoning == output_total
        && input_total + output_total + unclassified == total;
    Ok(consistent.then_some(Tokens([
        uncached,
        cr,
        cw,
        non_reasoning,
        reasoning,
        unclassified,
    ])))
}

/// Derive buckets from the raw fields (CPA before v7.2.97, or a broken breakdown).
pub fn derive(raw: &RawTokens, sem: Semantics) -> Result<Tokens, InvalidNumber> {
    let (input, output, reasoning) = (
        n(raw.input_tokens)?,
        n(raw.output_tokens)?,
        n(raw.reasoning_tokens)?,
    );
    let (cached, mut cr, cw, total) = (
        n(raw.cached_tokens)?,
        n(raw.cache_read_tokens)?,
        n(raw.cache_creation_tokens)?,
        n(raw.total_tokens)?,
    );
    // Records before v7.0.3 only carry `cached_tokens`.
    if cr == 0
        && cw == 0
        && cached > 0
        && matches!(sem, Semantics::Subset | Semantics::SeparateReasoning)
    {
        cr = cached;
    }
    let fallback_total = || input.max(cr + cw).max(cached) + output.max(reasoning);
    let derived = match sem {
        Semantics::Subset if cr + cw <= input && reasoning <= output => Some(Tokens([
            input - cr - cw,
            cr,
            cw,
            output - reasoning,
            reasoning,
            0,
        ])),
        Semantics::Independent => Some(Tokens([input, cr, cw, output, reasoning, 0])),
        Semantics::SeparateReasoning if cr + cw <= input => {
            Some(Tokens([input - cr - cw, cr, cw, output, reasoning, 0]))
        }
        Semantics::Unknown => Some(Tokens::unclassified(if total > 0 {
            total
        } else {
            fallback_total()
        })),
        // A "needs" condition failed: the numbers contradict the provider's semantics.
        _ => None,
    };
    Ok(match derived {
        // `total_tokens` of 0 means "not reported": the derived total stands.
        Some(t) if total == 0 || t.total() == total => t,
        _ => Tokens::unclassified(if total > 0 { total } else { fallback_total() }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(input: u64, output: u64, reasoning: u64, cr: u64, cw: u64, total: u64) -> RawTokens {
        RawTokens {
            input_tokens: Num(Some(input)),
            output_tokens: Num(Some(output)),
            reasoning_tokens: Num(Some(reasoning)),
            cache_read_tokens: Num(Some(cr)),
            cache_creation_tokens: Num(Some(cw)),
            total_tokens: Num(Some(total)),
            ..RawTokens::default()
        }
    }

    #[test]
    fn semantics_follow_cpa_first_match_wins() {
        assert_eq!(semantics("codex", "CodexExecutor"), Semantics::Subset);
        assert_eq!(semantics("claude", ""), Semantics::Independent);
        assert_eq!(semantics("gemini-cli", ""), Semantics::SeparateReasoning);
        assert_eq!(semantics("antigravity", ""), Semantics::SeparateReasoning);
        assert_eq!(
            semantics("my-llm", "OpenAICompatExecutor"),
            Semantics::Subset
        );
        // Rule 1 beats rule 2: an openai-compatible provider serving Claude is still a subset.
        assert_eq!(semantics("openai-compatible-claude", ""), Semantics::Subset);
        assert_eq!(semantics("", ""), Semantics::Unknown);
    }

    #[test]
    fn subset_puts_cache_inside_input_and_reasoning_inside_output() {
        let t = derive(&raw(12034, 845, 512, 11008, 0, 12879), Semantics::Subset).unwrap();
        assert_eq!(t.0, [1026, 11008, 0, 333, 512, 0]);
        assert_eq!(t.total(), 12879);
    }

    #[test]
    fn independent_keeps_every_field() {
        let t = derive(&raw(10, 20, 5, 100, 7, 142), Semantics::Independent).unwrap();
        assert_eq!(t.0, [10, 100, 7, 20, 5, 0]);
    }

    #[test]
    fn separate_reasoning_keeps_reasoning_outside_output() {
        let t = derive(&raw(100, 20, 30, 60, 0, 150), Semantics::SeparateReasoning).unwrap();
        assert_eq!(t.0, [40, 60, 0, 20, 30, 0]);
    }

    #[test]
    fn contradictions_become_unclassified_not_guesses() {
        // cache read larger than input breaks subset's "needs".
        let t = derive(&raw(10, 5, 0, 50, 0, 15), Semantics::Subset).unwrap();
        assert_eq!(t, Tokens::unclassified(15));
        // Derived total differs from the reported one.
        let t = derive(&raw(10, 5, 0, 0, 0, 99), Semantics::Subset).unwrap();
        assert_eq!(t, Tokens::unclassified(99));
    }

    #[test]
    fn zero_total_means_not_reported() {
        let t = derive(&raw(10, 5, 0, 0, 0, 0), Semantics::Subset).unwrap();
        assert_eq!(t.0, [10, 0, 0, 5, 0, 0]);
        let t = derive(&raw(10, 5, 0, 0, 0, 0), Semantics::Unknown).unwrap();
        assert_eq!(t, Tokens::unclassified(15));
    }

    #[test]
    fn legacy_cached_tokens_count_as_cache_read() {
        let mut r = raw(100, 10, 0, 0, 0, 110);
        r.cached_tokens = Num(Some(80));
        let t = derive(&r, Semantics::Subset).unwrap();
        assert_eq!(t.0, [20, 80, 0, 10, 0, 0]);
    }

    #[test]
    fn invalid_numbers_are_reported() {
        let mut r = raw(1, 1, 0, 0, 0, 2);
        r.output_tokens = Num(None);
        assert_eq!(derive(&r, Semantics::Subset), Err(InvalidNumber));
    }
}
