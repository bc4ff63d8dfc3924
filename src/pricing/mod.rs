//! Request cost in USD: a price table, model-name matching, and exact integer cost arithmetic.
//!
//! # Price sources
//! [`PriceTable::embedded`] is the built-in table (`prices.yaml`, list prices as of 2026-11-24).
//! [`PriceTable::load`] reads a file that overrides and extends it: either this project's YAML
//! (`models: { name: { input, cache_read, cache_write, output } }`, USD per million tokens) or
//! LiteLLM's `model_prices_and_context_window.json`, told apart by content (a JSON object without
//! a top-level `models` key is LiteLLM's).
//!
//! # Pricing the buckets
//! Each [`Tokens`] bucket has its own rate: uncached input at `input`, `cache_read`,
//! `cache_write`, non-reasoning output at `output`, reasoning at `output` (every provider bills
//! thinking tokens as output). Unclassified tokens are priced at `input`: they come from records
//! whose split is unknown (unknown provider, or numbers that contradict each other), input is the
//! kind of token that dominates real traffic, and such records are rare and visible on their own
//! in the token metrics. It is an estimate, not a bound: cached prompts would cost less, output
//! more.
//!
//! Missing rates: no `cache_read` means no discount (the input price); no `cache_write` means the
//! input price x 1.25 for Claude models (Anthropic's 5-minute cache write; the 1-hour write is 2x)
//! and the input price otherwise (OpenAI and Gemini bill implicit cache writes as input).
//!
//! # Matching a record to a price
//! The upstream `model` is tried with every rule below before the client's `requested_model`: the
//! upstream model is what is billed, and CPA may route a requested name to a different model, so
//! a date-stripped upstream name is a better guess than an exact requested one. For each name the
//! candidates are, in order, first hit wins:
//! 1. the name lowercased, with known provider prefixes removed (`openai/`, `anthropic/`,
//!    `gemini/`, `google/`, `vertex_ai/`, `vertex/`, `models/`, `openrouter/`, `xai/`, `deepseek/`,
//!    `moonshot/`, `moonshotai/`, `dashscope/`, `qwen/`, `zai/`, `z-ai/`; repeatedly);
//! 2. then one suffix at a time removed from the end, trying after each: a `(...)` thinking level
//!    (`gpt-5.4(high)`), an `@version` (`claude-sonnet-4@20250514`), a date (`-20251001`,
//!    `-2025-08-07`), `-thinking`, an effort (`-minimal`, `-low`, `-medium`, `-high`, `-xhigh`,
//!    `-none`), `-latest`;
//! 3. the last path segment of a name with an unknown prefix (`my-proxy/gpt-5.4`), then rule 2;
//! 4. dots turned into dashes (`claude-sonnet-4.5` -> `claude-sonnet-4-5`), then rule 2.
//!
//! The alias map is consulted for the name as written and before each candidate (keys compared
//! case-insensitively): an alias whose target is in the table wins over the candidate itself. The
//! table's own keys are normalized with rule 1 when loaded; when two keys normalize to the same
//! name (`gemini/gemini-2.5-pro` and `gemini-2.5-pro`), the one with fewer prefixes wins.
//!
//! # Arithmetic
//! Prices become integer pico-USD per token (`USD per 1M x 1e6`, exact for prices with up to six
//! decimals), a record's buckets are summed in `u128`, and the total is rounded half up once to
//! nano-USD and saturated at `u64::MAX` (about 18.4 billion USD).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::tokens::Tokens;

/// The built-in table.
const EMBEDDED: &str = include_str!("prices.yaml");

/// Prefixes removed from model names (rule 1), as LiteLLM keys and some providers carry them.
#[rustfmt::skip]
const PROVIDER_PREFIXES: &[&str] = &[
    "openai", "anthropic", "gemini", "google", "vertex_ai", "vertex", "models", "openrouter",
    "xai", "deepseek", "moonshot", "moonshotai", "dashscope", "qwen", "zai", "z-ai",
];

/// Suffixes removed by rule 2 besides `(...)`, `@...` and dates. `-xhigh` does not end in `-high`.
#[rustfmt::skip]
const NAME_SUFFIXES: &[&str] = &[
    "-thinking", "-minimal", "-low", "-medium", "-high", "-xhigh", "-none", "-latest",
];

/// LiteLLM `mode`s that are priced per token like a chat model.
const LITELLM_MODES: &[&str] = &["chat", "responses", "completion"];

/// Cache write premium assumed for Claude models when a table has no cache write price.
const CLAUDE_CACHE_WRITE_FACTOR: f64 = 1.25;

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub cache_read: f64,
    pub cache_write: f64,
    pub output: f64,
}

impl Price {
    /// A price with the documented defaults for missing cache rates.
    fn with_defaults(
        input: f64,
        output: f64,
        cache_read: Option<f64>,
        cache_write: Option<f64>,
        claude: bool,
    ) -> Price {
        let write_factor = if claude {
            CLAUDE_CACHE_WRITE_FACTOR
        } else {
            1.0
        };
        Price {
            input,
            cache_read: cache_read.unwrap_or(input),
            cache_write: cache_write.unwrap_or(input * write_factor),
            output,
        }
    }
}

/// A problem with a price file. Messages name the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("cannot read price file {origin}: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// Syntax or shape; for YAML the message carries the field path, line and column.
    #[error("price file {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("price file {origin}: model `{model}`: `{field}` must be a finite, non-negative number of USD per million tokens, not {value}")]
    BadPrice {
        origin: String,
        model: String,
        field: &'static str,
        value: f64,
    },
    #[error("price file {origin}: no chat model has both an input and an output price (expected this project's YAML or LiteLLM's model_prices_and_context_window.json)")]
    NoPrices { origin: String },
}

/// Model name (normalized by rule 1) -> price.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
}

/// This project's YAML format.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlFile {
    #[serde(default)]
    models: Models,
}

/// `models` in file order, duplicates kept so they can be reported.
#[derive(Default)]
struct Models(Vec<(String, YamlPrice)>);

impl<'de> Deserialize<'de> for Models {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Models, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Models;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of model names to prices")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Models, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = m.next_entry()? {
                    entries.push(entry);
                }
                Ok(Models(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlPrice {
    input: f64,
    output: f64,
    cache_read: Option<f64>,
    cache_write: Option<f64>,
}

impl PriceTable {
    /// The built-in defaults (see `prices.yaml`).
    pub fn embedded() -> PriceTable {
        // The embedded file is tested to parse; an empty table (everything unpriced) is the
        // visible, non-fatal outcome should that ever break.
        PriceTable::from_yaml_str(EMBEDDED, "(embedded prices.yaml)").unwrap_or_else(|e| {
            tracing::error!(error = %e, "embedded price table is invalid");
            PriceTable::default()
        })
    }

    /// The embedded defaults, overridden and extended by the file at `path` (YAML or LiteLLM JSON).
    pub fn load(path: &Path) -> Result<PriceTable, PriceError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PriceError::Read {
            origin: origin.clone(),
            source,
        })?;
        let mut table = PriceTable::embedded();
        table.extend(PriceTable::parse(&text, &origin)?);
        Ok(table)
    }

    /// Parse either format, detected by content. `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PriceTable, PriceError> {
        if !text.trim_start().starts_with('{') {
            return PriceTable::from_yaml_str(text, origin);
        }
        let doc: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| PriceError::Parse {
                origin: origin.to_owned(),
                message: format!("invalid JSON: {e}"),
            })?;
        if doc.contains_key("models") {
            // This project's format written as JSON, which YAML reads with line numbers.
            PriceTable::from_yaml_str(text, origin)
        } else {
            PriceTable::from_litellm_map(doc, origin)
        }
    }

    /// This project's YAML format. `origin` names the source in errors.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<PriceTable, PriceError> {
        let file: Option<YamlFile> =
            serde_norway::from_str(text).map_err(|e| PriceError::Parse {
                origin: origin.to_owned(),
                message: e.to_string(),
            })?;
        let mut builder = Builder::default();
        for (name, p) in file.map(|f| f.models.0).unwrap_or_default() {
            let fields = [
                ("input", Some(p.input)),
                ("output", Some(p.output)),
                ("cache_read", p.cache_read),
                ("cache_write", p.cache_write),
            ];
            for (field, value) in fields {
                if let Some(value) = value.filter(|v| !valid(*v)) {
                    return Err(PriceError::BadPrice {
                        origin: origin.to_owned(),
                        model: name,
                        field,
                        value,
                    });
                }
            }
            let claude = name.to_ascii_lowercase().contains("claude");
            let price =
                Price::with_defaults(p.input, p.output, p.cache_read, p.cache_write, claude);
            if let Some(first) = builder.insert(&name, price) {
                return Err(PriceError::Parse {
                    origin: origin.to_owned(),
                    message: format!("models `{first}` and `{name}` are the same model"),
                });
            }
        }
        Ok(builder.finish())
    }

    /// LiteLLM's `model_prices_and_context_window.json`. Entries without an input and output
    /// price per token, with a `mode` other than chat/responses/completion, or with invalid
    /// numbers are skipped, as is `sample_spec`.
    pub fn from_litellm_json_str(text: &str, origin: &str) -> Result<PriceTable, PriceError> {
        let doc: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| PriceError::Parse {
                origin: origin.to_owned(),
                message: format!("invalid LiteLLM JSON: {e}"),
            })?;
        PriceTable::from_litellm_map(doc, origin)
    }

    fn from_litellm_map(doc: Map<String, Value>, origin: &str) -> Result<PriceTable, PriceError> {
        let mut builder = Builder::default();
        for (name, entry) in &doc {
            let Some(entry) = entry.as_object().filter(|_| name != "sample_spec") else {
                continue;
            };
            let mode = entry.get("mode").and_then(Value::as_str);
            if mode.is_some_and(|m| !LITELLM_MODES.contains(&m)) {
                continue;
            }
            // USD per token -> per million, rounded to 1e-12 USD per token to drop float noise.
            let rate = |field: &str| {
                let v = entry.get(field)?.as_f64()?;
                valid(v).then(|| (v * 1e12).round() / 1e6)
            };
            let (Some(input), Some(output)) =
                (rate("input_cost_per_token"), rate("output_cost_per_token"))
            else {
                continue;
            };
            let provider = entry.get("litellm_provider").and_then(Value::as_str);
            let claude = provider.is_some_and(|p| p.contains("anthropic"))
                || name.to_ascii_lowercase().contains("claude");
            let price = Price::with_defaults(
                input,
                output,
                rate("cache_read_input_token_cost"),
                rate("cache_creation_input_token_cost"),
                claude,
            );
            // Same-named entries of one provider family (e.g. `vertex_ai/x` and `gemini/x`):
            // the first in key order is kept.
            builder.insert(name, price);
        }
        if builder.0.is_empty() {
            return Err(PriceError::NoPrices {
                origin: origin.to_owned(),
            });
        }
        Ok(builder.finish())
    }

    /// Add `other`'s prices, replacing this table's for the same names.
    pub fn extend(&mut self, other: PriceTable) {
        self.prices.extend(other.prices);
    }

    /// The price for a record: `model` by every rule, then `requested_model` (see module docs).
    pub fn lookup(
        &self,
        model: &str,
        requested_model: &str,
        aliases: &HashMap<String, String>,
    ) -> Option<&Price> {
        [model, requested_model]
            .into_iter()
            .find_map(|name| self.lookup_name(name, aliases))
    }

    fn lookup_name(&self, name: &str, aliases: &HashMap<String, String>) -> Option<&Price> {
        let aliased = |c: &str| {
            let target = alias_of(aliases, c)?;
            self.prices.get(&normalize(target).0)
        };
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        aliased(name).or_else(|| {
            candidates(name)
                .iter()
                .find_map(|c| aliased(c).or_else(|| self.prices.get(c)))
        })
    }

    pub fn len(&self) -> usize {
        self.prices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }
}

/// Collects one file's prices: normalized name -> (price, prefixes removed, name as written).
/// Of two names that normalize alike, the one with fewer prefixes wins, else the first.
#[derive(Default)]
struct Builder(HashMap<String, (Price, usize, String)>);

impl Builder {
    /// Returns the name as written of an earlier entry with as few prefixes, which is kept.
    fn insert(&mut self, name: &str, price: Price) -> Option<String> {
        let (key, prefixes) = normalize(name);
        match self.0.get(&key) {
            _ if key.is_empty() => None,
            Some((_, existing, first)) if *existing == prefixes => Some(first.clone()),
            Some((_, existing, _)) if *existing < prefixes => None,
            _ => {
                self.0.insert(key, (price, prefixes, name.to_owned()));
                None
            }
        }
    }

    fn finish(self) -> PriceTable {
        PriceTable {
            prices: self.0.into_iter().map(|(k, (p, _, _))| (k, p)).collect(),
        }
    }
}

fn valid(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

/// Rule 1: trimmed, lowercased, known provider prefixes removed; with how many were removed.
fn normalize(name: &str) -> (String, usize) {
    let mut s = name.trim().to_ascii_lowercase();
    let mut removed = 0;
    while let Some((head, rest)) = s.split_once('/') {
        if rest.is_empty() || !PROVIDER_PREFIXES.contains(&head) {
            break;
        }
        s = rest.to_owned();
        removed += 1;
    }
    (s, removed)
}

/// Names to try for one model name, in order (rules 1-4), without repeats.
fn candidates(name: &str) -> Vec<String> {
    let (base, _) = normalize(name);
    let mut out: Vec<String> = Vec::new();
    if base.is_empty() {
        return out;
    }
    let mut push_stripped = |mut s: &str| loop {
        if !out.iter().any(|c| c == s) {
            out.push(s.to_owned());
        }
        match strip_one_suffix(s) {
            Some(shorter) => s = shorter,
            None => break,
        }
    };
    push_stripped(&base);
    let last = base.rsplit('/').next().unwrap_or(&base);
    push_stripped(last);
    push_stripped(&last.replace('.', "-"));
    out
}

/// Rule 2: the name without its last recognized suffix, if it has one.
fn strip_one_suffix(s: &str) -> Option<&str> {
    if let Some(open) = s.strip_suffix(')').and_then(|t| t.rfind('(')) {
        return Some(s[..open].trim_end()).filter(|t| !t.is_empty());
    }
    if let Some(at) = s.rfind('@').filter(|&i| i > 0) {
        return Some(&s[..at]);
    }
    // Dates, checked on bytes: the cut is next to an ASCII `-`, so on a char boundary.
    let (b, n) = (s.as_bytes(), s.len());
    let digits = |r: &[u8]| r.iter().all(u8::is_ascii_digit);
    // -YYYYMMDD
    if n > 9 && b[n - 9] == b'-' && digits(&b[n - 8..]) {
        return Some(&s[..n - 9]);
    }
    // -YYYY-MM-DD
    let dashes = |at: &[usize]| at.iter().all(|&i| b[n - i] == b'-');
    if n > 11
        && dashes(&[11, 6, 3])
        && [(10, 6), (5, 3), (2, 0)]
            .iter()
            .all(|&(from, to)| digits(&b[n - from..n - to]))
    {
        return Some(&s[..n - 11]);
    }
    NAME_SUFFIXES
        .iter()
        .find_map(|suffix| s.strip_suffix(suffix))
        .filter(|t| !t.is_empty())
}

/// The alias target for a candidate: exact key, else a case-insensitive match.
fn alias_of<'a>(aliases: &'a HashMap<String, String>, candidate: &str) -> Option<&'a str> {
    if aliases.is_empty() {
        return None;
    }
    aliases
        .get(candidate)
        .or_else(|| {
            aliases
                .iter()
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(candidate))
                .map(|(_, v)| v)
        })
        .map(String::as_str)
}

/// USD per million tokens -> pico-USD (1e-12 USD) per token. Negative and NaN become 0.
fn pico_per_token(usd_per_million: f64) -> u128 {
    // USD/1M tokens x 1e-6 = USD/token; x 1e12 = pico-USD/token. `as` saturates.
    (usd_per_million * 1e6).round() as u128
}

/// Cost of one record's buckets in nano-USD (1e-9 USD), an integer so persisted sums are exact.
/// Rounded half up once per record; saturates at `u64::MAX`.
pub fn cost_nano_usd(price: &Price, tokens: &Tokens) -> u64 {
    let mut rates = [0.0; 6];
    rates[Tokens::INPUT] = price.input;
    rates[Tokens::CACHE_READ] = price.cache_read;
    rates[Tokens::CACHE_WRITE] = price.cache_write;
    rates[Tokens::OUTPUT] = price.output;
    rates[Tokens::REASONING] = price.output;
    rates[Tokens::UNCLASSIFIED] = price.input;
    let pico = tokens
        .0
        .iter()
        .zip(rates)
        .map(|(&n, rate)| u128::from(n).saturating_mul(pico_per_token(rate)))
        .fold(0u128, u128::saturating_add);
    u64::try_from(pico.saturating_add(500) / 1000).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_aliases() -> HashMap<String, String> {
        HashMap::new()
    }

    fn yaml(text: &str) -> PriceTable {
        PriceTable::from_yaml_str(text, "test.yaml").unwrap()
    }

    const SMALL: &str = "models:
  gpt-5.4: { input: 2.5, cache_read: 0.25, output: 15 }
  gpt-5.4-mini: { input: 0.75, cache_read: 0.075, output: 4.5 }
  claude-sonnet-4-5: { input: 3, cache_read: 0.3, output: 15 }
  gemini-2.5-pro: { input: 1.25, output: 10 }
";

    #[test]
    fn embedded_table_parses_and_covers_the_simulator() {
        let t = PriceTable::from_yaml_str(EMBEDDED, "embedded").unwrap();
        assert_eq!(t.len(), PriceTable::embedded().len());
        assert!(t.len() >= 50, "{}", t.len());
        // Every upstream model of crates/fake-cpa/src/workload.rs.
        for model in [
            "gpt-5.4",
            "gpt-5.4-mini",
            "gpt-5.3-codex",
            "claude-sonnet-4-5",
            "claude-opus-4-1",
            "claude-haiku-4-5",
            "gemini-2.5-pro",
            "gemini-2.5-flash",
            "gemini-3-pro-preview",
            "qwen3-coder-plus",
            "kimi-k2-0905-preview",
            "deepseek/deepseek-chat-v3.1",
            "z-ai/glm-4.6",
            "gpt-4o-mini",
        ] {
            assert!(t.lookup(model, "", &no_aliases()).is_some(), "{model}");
        }
        let p = t.lookup("gpt-5.4", "", &no_aliases()).unwrap();
        assert_eq!((p.input, p.cache_read, p.output), (2.5, 0.25, 15.0));
        for key in [
            "gpt-4.1",
            "gpt-4o",
            "o3",
            "o4-mini",
            "gpt-5-nano",
            "gemini-2.5-flash-lite",
        ] {
            assert!(t.prices.contains_key(key), "{key}");
        }
        for (name, p) in &t.prices {
            assert!(
                p.cache_read <= p.input && p.input <= p.output,
                "{name}: {p:?}"
            );
            // Claude bills cache writes at a premium; the others at the input price.
            if name.contains("claude") {
                assert!(p.cache_write > p.input, "{name}: {p:?}");
            } else {
                assert_eq!(p.cache_write, p.input, "{name}");
            }
        }
    }

    #[test]
    fn model_rules_come_before_requested_model() {
        let t = yaml(SMALL);
        let a = no_aliases();
        let name = |p: Option<&Price>| p.map(|p| p.input);
        assert_eq!(name(t.lookup("gpt-5.4-mini", "gpt-5.4", &a)), Some(0.75));
        assert_eq!(name(t.lookup("unknown-model", "gpt-5.4", &a)), Some(2.5));
        // The upstream model's date- or effort-stripped name beats an exact requested name.
        assert_eq!(
            name(t.lookup("gpt-5.4-high", "gpt-5.4-mini", &a)),
            Some(2.5)
        );
        assert_eq!(t.lookup("", "", &a), None);
        assert_eq!(t.lookup("unknown-model", "also-unknown", &a), None);
    }

    #[test]
    fn normalization_rules() {
        let t = yaml(SMALL);
        let a = no_aliases();
        let input = |m: &str| t.lookup(m, "", &a).map(|p| p.input);
        for m in [
            "GPT-5.4",
            " openai/gpt-5.4 ",
            "openrouter/openai/gpt-5.4",
            "gpt-5.4-2026-03-05",
            "gpt-5.4-xhigh",
            "gpt-5.4(high)",
            "gpt-5.4-2026-03-05-high",
            "my-proxy/gpt-5.4",
        ] {
            assert_eq!(input(m), Some(2.5), "{m}");
        }
        for m in [
            "claude-sonnet-4-5-20250929",
            "anthropic/claude-sonnet-4-5",
            "claude-sonnet-4-5-thinking",
            "claude-sonnet-4-5@20250929",
            "claude-sonnet-4.5",
        ] {
            assert_eq!(input(m), Some(3.0), "{m}");
        }
        assert_eq!(input("vertex_ai/gemini-2.5-pro-latest"), Some(1.25));
        // Only recognized suffixes go: `-max` and `-preview` are parts of names.
        assert_eq!(input("gpt-5.4-max"), None);
        assert_eq!(input("gemini-2.5-pro-preview"), None);
        assert_eq!(strip_one_suffix("o3-mini-high"), Some("o3-mini"));
        assert_eq!(strip_one_suffix("gpt-5-2025-08-07"), Some("gpt-5"));
        assert_eq!(strip_one_suffix("gpt-5"), None);
        assert_eq!(strip_one_suffix("-high"), None);
    }

    #[test]
    fn aliases_apply_to_both_names_and_win_over_the_table() {
        let t = yaml(SMALL);
        let aliases: HashMap<String, String> = [
            ("Sonnet".to_owned(), "claude-sonnet-4-5".to_owned()),
            ("gpt-5.4".to_owned(), "openai/gpt-5.4-mini".to_owned()),
            ("broken".to_owned(), "no-such-model".to_owned()),
            ("Acme/Custom".to_owned(), "gemini/gemini-2.5-pro".to_owned()),
        ]
        .into();
        let input = |m: &str, r: &str| t.lookup(m, r, &aliases).map(|p| p.input);
        assert_eq!(input("sonnet", ""), Some(3.0));
        assert_eq!(input("unknown", "SONNET"), Some(3.0));
        assert_eq!(input("gpt-5.4", ""), Some(0.75));
        // An alias is consulted per candidate: the date-stripped name is aliased too.
        assert_eq!(input("gpt-5.4-2026-03-05", ""), Some(0.75));
        assert_eq!(input("broken", ""), None);
        assert_eq!(input("acme/custom", ""), Some(1.25));
    }

    #[test]
    fn hand_computed_cost() {
        let p = Price {
            input: 3.0,
            cache_read: 0.3,
            cache_write: 3.75,
            output: 15.0,
        };
        // input 1000 x $3/M = $0.003; cache read 20000 x $0.30/M = $0.006;
        // cache write 4000 x $3.75/M = $0.015; output 500 x $15/M = $0.0075;
        // reasoning 300 x $15/M = $0.0045; unclassified 100 x $3/M (input rate) = $0.0003.
        // Total $0.0363 = 36_300_000 nano-USD.
        let t = Tokens([1000, 20000, 4000, 500, 300, 100]);
        assert_eq!(cost_nano_usd(&p, &t), 36_300_000);
        assert_eq!(cost_nano_usd(&p, &Tokens::default()), 0);
    }

    #[test]
    fn missing_cache_rates_take_the_documented_defaults() {
        let t = yaml(SMALL);
        let get = |m: &str| *t.lookup(m, "", &no_aliases()).unwrap();
        // Claude: cache write at input x 1.25; others: at input. No cache read: input.
        assert_eq!(get("claude-sonnet-4-5").cache_write, 3.75);
        assert_eq!(get("gpt-5.4").cache_write, 2.5);
        let gemini = get("gemini-2.5-pro");
        assert_eq!((gemini.cache_read, gemini.cache_write), (1.25, 1.25));
    }

    #[test]
    fn reasoning_is_priced_as_output() {
        let p = yaml(SMALL)
            .lookup("gpt-5.4", "", &no_aliases())
            .copied()
            .unwrap();
        let reasoning = cost_nano_usd(&p, &Tokens([0, 0, 0, 0, 1000, 0]));
        let output = cost_nano_usd(&p, &Tokens([0, 0, 0, 1000, 0, 0]));
        // 1000 x $15/M = $0.015.
        assert_eq!((reasoning, output), (15_000_000, 15_000_000));
    }

    #[test]
    fn nano_usd_rounds_once_and_saturates() {
        let price = |input, output| Price {
            input,
            cache_read: input,
            cache_write: input,
            output,
        };
        // 1 token at $0.005/M = 5 nano exactly; at $0.0125/M = 12.5 nano, rounded half up.
        assert_eq!(
            cost_nano_usd(&price(0.005, 0.0), &Tokens([1, 0, 0, 0, 0, 0])),
            5
        );
        assert_eq!(
            cost_nano_usd(&price(0.0125, 0.0), &Tokens([1, 0, 0, 0, 0, 0])),
            13
        );
        // 0.4 + 0.2 nano: summed before rounding, so 1, not 0 + 0.
        assert_eq!(
            cost_nano_usd(&price(0.0004, 0.0002), &Tokens([1, 0, 0, 1, 0, 0])),
            1
        );
        // 1e15 tokens x $10/M = $1e10 = 1e19 nano: still exact in u64.
        let e15 = 1_000_000_000_000_000;
        let t = Tokens([e15, 0, 0, 0, 0, 0]);
        assert_eq!(
            cost_nano_usd(&price(10.0, 0.0), &t),
            10_000_000_000_000_000_000
        );
        // 1e15 tokens in every bucket at $75/M output: beyond u64, saturated.
        let t = Tokens([e15; 6]);
        assert_eq!(cost_nano_usd(&price(15.0, 75.0), &t), u64::MAX);
        let t = Tokens([u64::MAX; 6]);
        assert_eq!(cost_nano_usd(&price(f64::MAX, f64::MAX), &t), u64::MAX);
        assert_eq!(cost_nano_usd(&price(f64::NAN, -1.0), &t), 0);
    }

    const LITELLM: &str = r#"{
        "sample_spec": {
            "input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
            "litellm_provider": "one of https://docs.litellm.ai/docs/providers",
            "mode": "one of: chat, embedding, completion, image_generation"
        },
        "claude-sonnet-4-5": {
            "cache_read_input_token_cost": 3e-07, "input_cost_per_token": 3e-06,
            "litellm_provider": "anthropic", "mode": "chat", "output_cost_per_token": 1.5e-05
        },
        "gemini/gemini-2.5-pro": {
            "cache_read_input_token_cost": 1.25e-07, "input_cost_per_token": 1.25e-06,
            "litellm_provider": "gemini", "mode": "chat", "output_cost_per_token": 1e-05
        },
        "gpt-5.3-codex": {
            "cache_creation_input_token_cost": 2e-06, "cache_read_input_token_cost": 1.75e-07,
            "input_cost_per_token": 1.75e-06, "litellm_provider": "openai", "mode": "responses",
            "output_cost_per_token": 1.4e-05
        },
        "gpt-image-1": { "input_cost_per_token": 5e-06, "litellm_provider": "openai",
            "mode": "image_generation" },
        "text-embedding-3-small": { "input_cost_per_token": 2e-08, "output_cost_per_token": 0.0,
            "litellm_provider": "openai", "mode": "embedding" },
        "gpt-unpriced": { "litellm_provider": "openai", "mode": "chat" }
    }"#;

    #[test]
    fn litellm_format() {
        let t = PriceTable::from_litellm_json_str(LITELLM, "prices.json").unwrap();
        assert_eq!(t.len(), 3);
        let a = no_aliases();
        let claude = t.lookup("claude-sonnet-4-5-20250929", "", &a).unwrap();
        // No cache creation price for a Claude model: input x 1.25.
        assert_eq!(
            *claude,
            Price {
                input: 3.0,
                cache_read: 0.3,
                cache_write: 3.75,
                output: 15.0
            }
        );
        let gemini = t.lookup("gemini-2.5-pro", "", &a).unwrap();
        assert_eq!((gemini.cache_read, gemini.cache_write), (0.125, 1.25));
        let codex = t.lookup("gpt-5.3-codex", "", &a).unwrap();
        assert_eq!(
            (codex.input, codex.cache_write, codex.output),
            (1.75, 2.0, 14.0)
        );
        for skipped in [
            "sample_spec",
            "gpt-image-1",
            "text-embedding-3-small",
            "gpt-unpriced",
        ] {
            assert!(t.lookup(skipped, "", &a).is_none(), "{skipped}");
        }
        let err = PriceTable::from_litellm_json_str(r#"{"sample_spec": {}}"#, "x.json");
        assert!(matches!(err, Err(PriceError::NoPrices { .. })));
    }

    #[test]
    fn load_detects_the_format_and_overrides_the_embedded_table() {
        let dir = tempfile::tempdir().unwrap();
        let embedded = PriceTable::embedded();
        let a = no_aliases();

        let json = dir.path().join("model_prices_and_context_window.json");
        std::fs::write(&json, LITELLM).unwrap();
        let t = PriceTable::load(&json).unwrap();
        assert_eq!(t.len(), embedded.len());
        assert_eq!(t.lookup("gpt-5.3-codex", "", &a).unwrap().cache_write, 2.0);

        let yaml = dir.path().join("prices.yaml");
        std::fs::write(
            &yaml,
            "models:\n  gpt-5.4: { input: 1, output: 2 }\n  new-model: { input: 1, output: 2 }\n",
        )
        .unwrap();
        let t = PriceTable::load(&yaml).unwrap();
        assert_eq!(t.len(), embedded.len() + 1);
        assert_eq!(t.lookup("gpt-5.4", "", &a).unwrap().output, 2.0);
        assert_eq!(
            t.lookup("claude-opus-4-1", "", &a),
            embedded.lookup("claude-opus-4-1", "", &a)
        );

        // This project's format in JSON syntax is not mistaken for LiteLLM's.
        let ours = dir.path().join("ours.json");
        std::fs::write(
            &ours,
            r#"{"models": {"x-model": {"input": 1, "output": 2}}}"#,
        )
        .unwrap();
        assert!(PriceTable::load(&ours)
            .unwrap()
            .lookup("x-model", "", &a)
            .is_some());

        let missing = dir.path().join("missing.yaml");
        let err = PriceTable::load(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.yaml"), "{err}");
        // An empty or comment-only file is an empty table, not an error.
        assert!(PriceTable::from_yaml_str("# nothing yet\n", "e.yaml")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bad_yaml_names_the_file_model_field_and_line() {
        let err = |text: &str| {
            PriceTable::from_yaml_str(text, "my-prices.yaml")
                .unwrap_err()
                .to_string()
        };
        let e = err("models:\n  gpt-x: { input: 1, outptu: 2 }\n");
        for part in ["my-prices.yaml", "gpt-x", "outptu", "line 2"] {
            assert!(e.contains(part), "{part}: {e}");
        }
        let e = err("models:\n  gpt-x: { input: 1 }\n");
        assert!(e.contains("gpt-x") && e.contains("output"), "{e}");
        let e = err("models:\n  gpt-x: { input: 1, output: cheap }\n");
        assert!(
            e.contains("gpt-x") && e.contains("output") && e.contains("line 2"),
            "{e}"
        );
        let e = err("models:\n  gpt-x: { input: 1, output: 2, cache_read: -0.5 }\n");
        assert!(
            e.contains("gpt-x") && e.contains("cache_read") && e.contains("-0.5"),
            "{e}"
        );
        let e = err("prices:\n  gpt-x: { input: 1, output: 2 }\n");
        assert!(e.contains("prices"), "{e}");
        let e =
            err("models:\n  gpt-x: { input: 1, output: 2 }\n  GPT-X: { input: 1, output: 3 }\n");
        assert!(e.contains("`gpt-x` and `GPT-X`"), "{e}");
        let e = err("models: [1, 2]\n");
        assert!(e.contains("my-prices.yaml"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn lookup_never_panics(model in "\\PC{0,40}", requested in "[a-z0-9./@()-]{0,30}") {
            let t = yaml(SMALL);
            let aliases: HashMap<String, String> = [("Ä".to_owned(), "gpt-5.4".to_owned())].into();
            let _ = t.lookup(&model, &requested, &aliases);
            let _ = t.lookup(&format!("{model}-2025-01-01"), &format!("模型{requested}"), &aliases);
        }
    }
}

/// What ingest needs to put a price on a record: the table and the configured model aliases.
#[derive(Debug, Clone)]
pub struct Pricing {
    pub table: PriceTable,
    pub aliases: HashMap<String, String>,
}

impl Pricing {
    /// The embedded table with no aliases.
    pub fn embedded() -> Pricing {
        Pricing {
            table: PriceTable::embedded(),
            aliases: HashMap::new(),
        }
    }

    pub fn lookup(&self, model: &str, requested_model: &str) -> Option<&Price> {
        self.table.lookup(model, requested_model, &self.aliases)
    }
}
