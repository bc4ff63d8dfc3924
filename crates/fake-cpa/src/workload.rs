//! Deterministic generator of CPA usage-queue elements (API.md section 2) together with the
//! truth the exporter should derive from each one.
//!
//! The truth is computed from the generator's own choices, never by re-running the exporter's
//! logic: non-overlapping token buckets are picked first, then CPA's raw fields are built from them
//! according to the provider's semantics (API.md 2.1), so a bug in the exporter's derivation
//! shows up as a mismatch.

use serde_json::{json, Map, Value};

use super::rng::Rng;

/// The client API keys the simulated CPA accepts (plaintext, as `/config` leaks them).
pub const CLIENT_API_KEYS: [&str; 4] = [
    "sk-client-7Qm2xV9aLp4RkT1n",
    "sk-client-ci-Hb8ZrW3yNe6Jd0Uc",
    "sk-client-Fs5Kq1Lg9Tx2Pv7M",
    "sk-client-dash-Yw4Cn8Ej2Ra6Gz3B",
];
const CLIENT_IPS: [&str; 4] = ["203.0.113.7", "198.51.100.23", "10.20.0.14", "192.0.2.88"];
const USER_AGENTS: [&str; 4] = [
    "codex_cli_rs/0.40.0 (Mac OS 15.6.1; arm64)",
    "claude-cli/2.0.14 (external, cli)",
    "GeminiCLI/0.8.2 (linux; x64)",
    "OpenAI/Python 1.109.1",
];
const EMAILS: [&str; 6] = [
    "alice@example.com",
    "bob.martin@example.org",
    "carol.ops@example.net",
    "dev-team@example.com",
    "erin.k@example.org",
    "frank@example.net",
];

/// How CPA's raw token fields overlap for a provider (API.md 2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Semantics {
    Subset,
    Independent,
    SeparateReasoning,
    Unknown,
}

struct Provider {
    name: &'static str,
    executor: &'static str,
    auth_type: &'static str,
    semantics: Semantics,
    weight: u32,
    /// (model, an alias clients sometimes use for it)
    models: &'static [(&'static str, &'static str)],
    endpoints: &'static [&'static str],
    credentials: usize,
    cache_p: f64,
    cache_write: bool,
    reasoning_p: f64,
}

const GEMINI_MODELS: &[(&str, &str)] = &[
    ("gemini-2.5-pro", "gemini-pro-latest"),
    ("gemini-2.5-flash", "gemini-flash-latest"),
];
const GEMINI_ENDPOINTS: &[&str] = &["POST /v1beta/models/*action", "POST /v1/chat/completions"];

#[rustfmt::skip]
const PROVIDERS: &[Provider] = &[
    Provider { name: "codex", executor: "CodexExecutor", auth_type: "oauth", semantics: Semantics::Subset, weight: 30,
        models: &[("gpt-5.4", "gpt-5.4-high"), ("gpt-5.4-mini", "gpt-5.4-mini-low"), ("gpt-5.3-codex", "gpt-5-codex")],
        endpoints: &["POST /v1/responses", "POST /v1/responses", "POST /v1/chat/completions"],
        credentials: 2, cache_p: 0.8, cache_write: false, reasoning_p: 0.8 },
    Provider { name: "claude", executor: "ClaudeExecutor", auth_type: "oauth", semantics: Semantics::Independent, weight: 25,
        models: &[("claude-sonnet-4-5", "sonnet"), ("claude-opus-4-1", "opus"), ("claude-haiku-4-5", "claude-haiku-4-5-20251001")],
        endpoints: &["POST /v1/messages", "POST /v1/messages", "POST /v1/chat/completions"],
        credentials: 2, cache_p: 0.75, cache_write: true, reasoning_p: 0.15 },
    Provider { name: "gemini-cli", executor: "GeminiCLIExecutor", auth_type: "oauth", semantics: Semantics::SeparateReasoning,
        weight: 10, models: GEMINI_MODELS, endpoints: GEMINI_ENDPOINTS, credentials: 1, cache_p: 0.4, cache_write: false, reasoning_p: 0.7 },
    Provider { name: "gemini", executor: "GeminiExecutor", auth_type: "apikey", semantics: Semantics::SeparateReasoning,
        weight: 6, models: GEMINI_MODELS, endpoints: GEMINI_ENDPOINTS, credentials: 1, cache_p: 0.3, cache_write: false, reasoning_p: 0.6 },
    Provider { name: "vertex", executor: "GeminiVertexExecutor", auth_type: "apikey", semantics: Semantics::SeparateReasoning,
        weight: 4, models: &[("gemini-2.5-pro", "gemini-2.5-pro")], endpoints: GEMINI_ENDPOINTS, credentials: 1, cache_p: 0.3, cache_write: false, reasoning_p: 0.7 },
    Provider { name: "antigravity", executor: "AntigravityExecutor", auth_type: "oauth", semantics: Semantics::SeparateReasoning,
        weight: 6, models: &[("gemini-3-pro-preview", "gemini-3-pro"), ("claude-sonnet-4-5", "claude-sonnet-4-5-thinking")],
        endpoints: GEMINI_ENDPOINTS, credentials: 1, cache_p: 0.4, cache_write: false, reasoning_p: 0.6 },
    Provider { name: "qwen", executor: "QwenExecutor", auth_type: "oauth", semantics: Semantics::Subset, weight: 4,
        models: &[("qwen3-coder-plus", "qwen3-coder")], endpoints: &["POST /v1/chat/completions"],
        credentials: 1, cache_p: 0.3, cache_write: false, reasoning_p: 0.0 },
    Provider { name: "kimi", executor: "KimiExecutor", auth_type: "oauth", semantics: Semantics::Subset, weight: 3,
        models: &[("kimi-k2-0905-preview", "kimi-k2")], endpoints: &["POST /v1/chat/completions", "POST /v1/messages"],
        credentials: 1, cache_p: 0.5, cache_write: false, reasoning_p: 0.3 },
    Provider { name: "openrouter", executor: "OpenAICompatExecutor", auth_type: "apikey", semantics: Semantics::Subset, weight: 6,
        models: &[("deepseek/deepseek-chat-v3.1", "deepseek-v3"), ("z-ai/glm-4.6", "glm-4.6")],
        endpoints: &["POST /v1/chat/completions"], credentials: 1, cache_p: 0.3, cache_write: false, reasoning_p: 0.3 },
    Provider { name: "", executor: "", auth_type: "unknown", semantics: Semantics::Unknown, weight: 1,
        models: &[("", ""), ("gpt-4o-mini", "gpt-4o-mini")], endpoints: &["POST /v1/chat/completions", ""],
        credentials: 1, cache_p: 0.2, cache_write: false, reasoning_p: 0.0 },
];

/// Ways to corrupt a record: (reason, field or `object.field`, JSON value).
const CORRUPTIONS: [(&str, &str, &str); 9] = [
    ("bad_field", "tokens", "[1]"),
    ("bad_field", "failed", r#""yes""#),
    ("bad_field", "timestamp", "5"),
    ("invalid_number", "latency_ms", "-3"),
    ("invalid_number", "latency_ms", "1500.5"),
    ("invalid_number", "tokens.input_tokens", "-5"),
    ("invalid_number", "tokens.output_tokens", "12.5"),
    ("invalid_number", "tokens.total_tokens", r#""lots""#),
    ("invalid_number", "tokens.input_tokens", "2000000000000000"),
];

/// Share of each kind of element; the remainder are ordinary usage records.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadMix {
    pub string_wrapped: f64,
    pub control: f64,
    pub invalid: f64,
    /// No `accounting_version`/`token_breakdown`: raw fields only (CPA before v7.2.97).
    pub legacy: f64,
    /// Raw fields whose derived total != `total_tokens` (everything unclassified).
    pub inconsistent: f64,
    pub failed: f64,
    pub with_event_id: f64,
    pub duplicate_event_id: f64,
}

impl Default for WorkloadMix {
    fn default() -> Self {
        WorkloadMix {
            string_wrapped: 0.05,
            control: 0.01,
            invalid: 0.01,
            legacy: 0.30,
            inconsistent: 0.02,
            failed: 0.08,
            with_event_id: 0.50,
            duplicate_event_id: 0.0,
        }
    }
}

/// One queue element and what the exporter should make of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// Text to hand to `FakeCpa::push_raw`.
    pub element_json: String,
    pub expect: Expect,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    Usage(Truth),
    /// An exact re-delivery of an earlier record (same `event_id`).
    Duplicate(Truth),
    Control,
    /// Reason: `not_json`, `not_object`, `bad_field` or `invalid_number`.
    Invalid(&'static str),
}

/// What the exporter should derive from one usage record.
#[derive(Clone, Debug, PartialEq)]
pub struct Truth {
    pub provider: String,
    pub model: String,
    pub requested_model: String,
    pub credential: String,
    pub api_key: Option<String>,
    pub endpoint: String,
    pub failed: bool,
    pub status_code: u16,
    /// input (uncached), cache_read, cache_write, output (non-reasoning), reasoning, unclassified.
    pub tokens: [u64; 6],
    pub latency_ms: Option<u64>,
    pub ttft_ms: u64,
    pub event_id: Option<String>,
}

impl Truth {
    pub fn total_tokens(&self) -> u64 {
        self.tokens.iter().sum()
    }
}

/// CPA's raw `tokens` object fields.
#[derive(Clone, Copy, Debug, Default)]
struct Raw {
    input: u64,
    output: u64,
    reasoning: u64,
    cache_read: u64,
    cache_write: u64,
    total: u64,
}

/// An upstream credential (one entry of CPA's auth-files), with slowly moving quota usage.
#[derive(Clone, Debug)]
struct Credential {
    provider: usize,
    auth_index: String,
    source: String,
    token_sha256: String,
    used_5h: f64,
    used_7d: f64,
}

/// The next attempt of a client request that just failed over (same `request_id`).
#[derive(Clone, Debug)]
struct Retry {
    request_id: String,
    client: usize,
    provider: usize,
    model: usize,
    /// When the failed attempt before it ended (Unix seconds; 0 for a first attempt): CPA starts
    /// the next attempt only after that.
    not_before: f64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Shape {
    legacy: bool,
    inconsistent: bool,
    failed: bool,
    event_id: bool,
}

/// Seeded generator of realistic CPA traffic.
pub struct Workload {
    rng: Rng,
    mix: WorkloadMix,
    credentials: Vec<Credential>,
    retry: Option<Retry>,
    /// Recent records with an `event_id`, for exact re-deliveries.
    history: Vec<(String, Truth)>,
}

impl Workload {
    pub fn new(seed: u64, mix: WorkloadMix) -> Self {
        let mut rng = Rng::new(seed);
        let mut credentials = Vec::new();
        for (provider, p) in PROVIDERS.iter().enumerate() {
            for _ in 0..p.credentials {
                let n = credentials.len();
                let (auth_index, source) = match (p.name, p.auth_type) {
                    ("", _) => (String::new(), String::new()),
                    ("vertex", _) => (rng.hex(16), format!("acme-vertex-prod-{}", 4821 + n)),
                    (_, "apikey") => (rng.hex(16), format!("sk-upstream-{}", rng.hex(24))),
                    _ => (rng.hex(16), EMAILS[n % EMAILS.len()].to_owned()),
                };
                let token_sha256 = if p.auth_type == "oauth" {
                    rng.hex(64)
                } else {
                    String::new()
                };
                let (used_5h, used_7d) = (rng.uniform(0.0, 60.0), rng.uniform(0.0, 60.0));
                credentials.push(Credential {
                    provider,
                    auth_index,
                    source,
                    token_sha256,
                    used_5h,
                    used_7d,
                });
            }
        }
        Workload {
            rng,
            mix,
            credentials,
            retry: None,
            history: Vec::new(),
        }
    }

    /// CPA's credentials listing for this workload's upstream credentials: the OAuth accounts
    /// (e-mails in their file names) and the Vertex service account. Config API keys are not in
    /// CPA's listing, so they are not here either.
    pub fn credentials(&self) -> Vec<super::SimCredential> {
        self.credentials
            .iter()
            .filter_map(|c| {
                let p = &PROVIDERS[c.provider];
                let listed = p.auth_type == "oauth" || p.name == "vertex";
                (listed && !c.auth_index.is_empty())
                    .then(|| super::SimCredential::new(p.name, &c.auth_index, &c.source))
            })
            .collect()
    }

    /// Generates the next element; its attempt ended at `now_unix_secs`.
    pub fn next(&mut self, now_unix_secs: f64) -> Generated {
        let m = self.mix;
        let roll = self.rng.f64();
        if roll < m.control {
            let text = self
                .rng
                .pick(&[r#"{"support_refresh":true}"#, r#"{"refresh":true}"#]);
            return Generated {
                element_json: (*text).to_owned(),
                expect: Expect::Control,
            };
        }
        if roll < m.control + m.invalid {
            return self.invalid(now_unix_secs);
        }
        if !self.history.is_empty() && self.rng.chance(m.duplicate_event_id) {
            let (element_json, truth) = self.rng.pick(&self.history).clone();
            return Generated {
                element_json,
                expect: Expect::Duplicate(truth),
            };
        }
        let shape = Shape {
            legacy: self.rng.chance(m.legacy),
            inconsistent: self.rng.chance(m.inconsistent),
            failed: self.rng.chance(m.failed),
            event_id: self.rng.chance(m.with_event_id),
        };
        let (record, truth) = self.usage(now_unix_secs, shape);
        let mut element_json = record.to_string();
        if self.rng.chance(m.string_wrapped) {
            element_json = Value::String(element_json).to_string();
        }
        if truth.event_id.is_some() {
            if self.history.len() >= 256 {
                self.history.remove(0);
            }
            self.history.push((element_json.clone(), truth.clone()));
        }
        Generated {
            element_json,
            expect: Expect::Usage(truth),
        }
    }

    fn invalid(&mut self, now: f64) -> Generated {
        let legacy = Shape {
            legacy: true,
            ..Shape::default()
        };
        let (reason, element_json) = match self.rng.range(0, 3) {
            0 => {
                let text = self.usage(now, legacy).0.to_string();
                let cut: String = text.chars().take(text.len() / 2).collect();
                let garbage = ["upstream usage payload: <nil>".to_owned(), cut];
                (
                    "not_json",
                    Value::String(self.rng.pick(&garbage).clone()).to_string(),
                )
            }
            1 => {
                let texts = [
                    "42",
                    "[1]",
                    "true",
                    "null",
                    r#""[1,2]""#,
                    r#""17""#,
                    r#""\"hi\"""#,
                ];
                ("not_object", (*self.rng.pick(&texts)).to_owned())
            }
            _ => {
                // Raw fields only, so the bad value cannot hide behind a valid breakdown.
                let mut record = self.usage(now, legacy).0;
                let (reason, path, bad) = *self.rng.pick(&CORRUPTIONS);
                let (target, key) = match path.split_once('.') {
                    Some((object, key)) => (record.get_mut(object), key),
                    None => (Some(&mut record), path),
                };
                if let Some(Value::Object(map)) = target {
                    map.insert(
                        key.to_owned(),
                        serde_json::from_str(bad).unwrap_or_default(),
                    );
                }
                (reason, record.to_string())
            }
        };
        Generated {
            element_json,
            expect: Expect::Invalid(reason),
        }
    }

    fn usage(&mut self, now: f64, shape: Shape) -> (Value, Truth) {
        let retry = self.retry.take().unwrap_or_else(|| self.fresh_request());
        let p = &PROVIDERS[retry.provider];
        let (model, alt_alias) = p.models[retry.model % p.models.len()];
        let alias = match self.rng.f64() {
            x if x < 0.25 => alt_alias,
            x if x < 0.35 => "",
            _ => model,
        };
        let cred = self.pick_credential(retry.provider);
        let endpoint = *self.rng.pick(p.endpoints);
        let status = shape.failed.then(|| self.failure_status(p));
        if shape.failed && self.rng.chance(0.5) {
            // CPA fails over to the next credential: same request_id on the next record.
            self.retry = Some(Retry {
                not_before: now,
                ..retry.clone()
            });
        }

        let buckets = if shape.failed || self.rng.chance(0.01) {
            [0; 6]
        } else {
            self.buckets(p)
        };
        let (tokens_json, breakdown, tokens) = self.token_fields(p.semantics, buckets, shape);

        let stream = self.rng.chance(0.7);
        let latency_s = if shape.failed {
            self.rng.lognormal(0.8, 0.9).clamp(0.05, 30.0)
        } else {
            self.rng
                .lognormal(if stream { 7.0 } else { 3.0 }, 0.9)
                .clamp(0.3, 120.0)
        };
        // A retry starts after the attempt it replaces ended, as CPA's do: it ends now, so it
        // lasted at most since then.
        let latency_s = if now - latency_s < retry.not_before {
            (now - retry.not_before).max(0.01)
        } else {
            latency_s
        };
        let latency_ms = (latency_s * 1000.0) as u64;
        let ttft_ms = if stream && !shape.failed && self.rng.chance(0.9) {
            ((latency_ms as f64 * self.rng.uniform(0.03, 0.4)) as u64).max(1)
        } else {
            0
        };
        let headers = self.response_headers(cred, now, tokens.iter().sum());
        let c = &self.credentials[cred];
        let fail_status = status
            .flatten()
            .unwrap_or(if shape.failed { 0 } else { 200 });
        let fail_body = if shape.failed {
            failure_body(fail_status)
        } else {
            String::new()
        };
        let mut record = json!({
            "timestamp": rfc3339_nano(now - latency_s),
            "latency_ms": latency_ms, "ttft_ms": ttft_ms,
            "source": c.source, "auth_index": c.auth_index, "access_token_sha256": c.token_sha256,
            "client_ip": CLIENT_IPS[retry.client], "x_forwarded_for": "",
            "user_agent": USER_AGENTS[retry.client],
            "tokens": tokens_json,
            "failed": shape.failed, "generate": true, "stream": stream,
            "fail": { "status_code": fail_status, "body": fail_body },
            "response_headers": headers,
            "provider": p.name, "executor_type": p.executor, "model": model, "alias": alias,
            "endpoint": endpoint, "auth_type": p.auth_type,
            "api_key": CLIENT_API_KEYS[retry.client], "request_id": retry.request_id,
            "reasoning_effort": *self.rng.pick(&["high", "medium", "low", ""]),
            "service_tier": "auto", "response_service_tier": "default",
        });
        let mut truth = Truth {
            provider: or_unknown(p.name),
            model: or_unknown(model),
            requested_model: or_unknown(if alias.is_empty() { model } else { alias }),
            credential: if c.auth_index.is_empty() {
                "none".to_owned()
            } else {
                c.auth_index.clone()
            },
            api_key: Some(CLIENT_API_KEYS[retry.client].to_owned()),
            endpoint: or_unknown(endpoint),
            failed: shape.failed,
            status_code: match fail_status {
                0 => 500,
                s => s,
            },
            tokens,
            latency_ms: Some(latency_ms),
            ttft_ms,
            event_id: None,
        };
        if let Some(map) = record.as_object_mut() {
            self.vary_fields(map, &mut truth, shape, breakdown);
        }
        (record, truth)
    }

    /// Version-dependent and optional fields: breakdown, event_id, fields older CPAs lack.
    fn vary_fields(
        &mut self,
        map: &mut Map<String, Value>,
        truth: &mut Truth,
        shape: Shape,
        breakdown: Value,
    ) {
        if shape.legacy {
            if self.rng.chance(0.5) {
                map.remove("ttft_ms"); // before v7.1.24
                truth.ttft_ms = 0;
            }
            if self.rng.chance(0.3) {
                map.remove("fail"); // before v7.0.0
                truth.status_code = if truth.failed { 500 } else { 200 };
            }
            if self.rng.chance(0.02) {
                map.remove("latency_ms");
                truth.latency_ms = None;
            }
        } else {
            map.insert("accounting_version".to_owned(), json!(2));
            map.insert("token_breakdown".to_owned(), breakdown);
        }
        if shape.event_id {
            let id = format!("evt_{}", self.rng.hex(24));
            map.insert("event_id".to_owned(), json!(id));
            truth.event_id = Some(id);
        }
        if self.rng.chance(0.03) {
            map.remove("api_key");
            truth.api_key = None;
        }
        if self.rng.chance(0.02) {
            map.insert("auth_index".to_owned(), json!(""));
            map.insert("source".to_owned(), json!(""));
            truth.credential = "none".to_owned();
        }
    }

    fn fresh_request(&mut self) -> Retry {
        let total: u32 = PROVIDERS.iter().map(|p| p.weight).sum();
        let mut pick = self.rng.range(0, u64::from(total) - 1);
        let mut provider = 0;
        for (i, p) in PROVIDERS.iter().enumerate() {
            if pick < u64::from(p.weight) {
                provider = i;
                break;
            }
            pick -= u64::from(p.weight);
        }
        let models = PROVIDERS[provider].models.len() as u64;
        Retry {
            request_id: self.rng.hex(8),
            client: self.rng.range(0, CLIENT_API_KEYS.len() as u64 - 1) as usize,
            provider,
            model: self.rng.range(0, models - 1) as usize,
            not_before: 0.0,
        }
    }

    fn pick_credential(&mut self, provider: usize) -> usize {
        let candidates: Vec<usize> = (0..self.credentials.len())
            .filter(|&i| self.credentials[i].provider == provider)
            .collect();
        *self.rng.pick(&candidates)
    }

    /// `Some(None)` models a failure whose status CPA did not record (reported as 0).
    fn failure_status(&mut self, p: &Provider) -> Option<u16> {
        let overloaded = if p.semantics == Semantics::Independent {
            529
        } else {
            503
        };
        let codes = [429, 429, 429, 429, 500, 502, 503, overloaded, 401, 400];
        if self.rng.chance(0.1) {
            None
        } else {
            Some(*self.rng.pick(&codes))
        }
    }

    /// Non-overlapping buckets: [uncached, cache_read, cache_write, output, reasoning, 0].
    fn buckets(&mut self, p: &Provider) -> [u64; 6] {
        let input = self.rng.lognormal(6000.0, 1.2).clamp(1.0, 400_000.0) as u64;
        let (mut cache_read, mut cache_write) = (0, 0);
        if self.rng.chance(p.cache_p) {
            cache_read = (input as f64 * self.rng.uniform(0.4, 0.95)) as u64;
            if p.cache_write && self.rng.chance(0.3) {
                cache_write = ((input - cache_read) as f64 * self.rng.uniform(0.2, 0.9)) as u64;
            }
        }
        let output = self.rng.lognormal(500.0, 1.1).clamp(1.0, 64_000.0) as u64;
        let reasoning = if self.rng.chance(p.reasoning_p) {
            (output as f64 * self.rng.uniform(0.1, 0.8)) as u64
        } else {
            0
        };
        [
            input - cache_read - cache_write,
            cache_read,
            cache_write,
            output - reasoning,
            reasoning,
            0,
        ]
    }

    /// Builds CPA's raw `tokens` object and v2 breakdown from the buckets; returns them with the
    /// truth buckets the exporter should report.
    fn token_fields(
        &mut self,
        sem: Semantics,
        b: [u64; 6],
        shape: Shape,
    ) -> (Value, Value, [u64; 6]) {
        let [uncached, cache_read, cache_write, output, reasoning, _] = b;
        let input_all = uncached + cache_read + cache_write;
        let mut raw = Raw {
            input: input_all,
            output: output + reasoning,
            reasoning,
            cache_read,
            cache_write,
            total: 0,
        };
        match sem {
            Semantics::Independent => (raw.input, raw.output) = (uncached, output),
            Semantics::SeparateReasoning => raw.output = output,
            Semantics::Subset | Semantics::Unknown => {}
        }
        raw.total = raw.input
            + raw.output
            + match sem {
                Semantics::Independent => cache_read + cache_write + reasoning,
                Semantics::SeparateReasoning => reasoning,
                _ => 0,
            };
        let mut truth = if sem == Semantics::Unknown {
            [0, 0, 0, 0, 0, raw.total]
        } else {
            b
        };
        let mut breakdown = breakdown_json(b, raw.total, sem == Semantics::Unknown);
        if shape.inconsistent && raw.total > 0 {
            // The breakdown's buckets no longer add up to its total, nor do the raw fields.
            raw.total += self.rng.range(1, 500);
            if let Some(total) = breakdown.get_mut("total_tokens") {
                *total = json!(raw.total);
            }
            truth = [0, 0, 0, 0, 0, raw.total];
        } else if shape.legacy && self.rng.chance(0.05) {
            // total_tokens 0 means "not reported": the derived total stands.
            if sem == Semantics::Unknown {
                truth[5] =
                    raw.input.max(raw.cache_read + raw.cache_write) + raw.output.max(raw.reasoning);
            }
            raw.total = 0;
        }
        // Before v7.0.3 there were no cache_read/cache_creation fields, only cached_tokens.
        let old = shape.legacy
            && sem != Semantics::Independent
            && cache_write == 0
            && self.rng.chance(0.4);
        (tokens_json(&raw, old), breakdown, truth)
    }

    /// Quota headers as upstreams send them, with per-credential usage drifting upward.
    fn response_headers(&mut self, cred: usize, now: f64, tokens: u64) -> Value {
        let bump = tokens as f64 / 40_000.0;
        let c = &mut self.credentials[cred];
        c.used_5h = (c.used_5h + bump) % 100.0;
        c.used_7d = (c.used_7d + bump / 10.0) % 100.0;
        let (h5, d7) = (c.used_5h, c.used_7d);
        let reset5 = self.rng.range(60, 18_000);
        let reset7 = self.rng.range(3_600, 604_800);
        match PROVIDERS[c.provider].name {
            "codex" => json!({
                "X-Codex-Primary-Used-Percent": [format!("{h5:.0}")],
                "X-Codex-Primary-Window-Minutes": ["300"],
                "X-Codex-Primary-Reset-After-Seconds": [reset5.to_string()],
                "X-Codex-Secondary-Used-Percent": [format!("{d7:.0}")],
                "X-Codex-Secondary-Window-Minutes": ["10080"],
                "X-Codex-Secondary-Reset-After-Seconds": [reset7.to_string()],
                "X-Codex-Plan-Type": ["plus"],
                "Content-Type": ["text/event-stream"],
                "X-Request-Id": [format!("req_{}", self.rng.hex(24))],
            }),
            "claude" => json!({
                "anthropic-ratelimit-unified-status": [if h5 > 95.0 { "rejected" } else { "allowed" }],
                "anthropic-ratelimit-unified-5h-utilization": [format!("{:.2}", h5 / 100.0)],
                "anthropic-ratelimit-unified-5h-reset": [((now as u64) + reset5).to_string()],
                "anthropic-ratelimit-unified-7d-utilization": [format!("{:.2}", d7 / 100.0)],
                "anthropic-ratelimit-unified-7d-reset": [((now as u64) + reset7).to_string()],
                "request-id": [format!("req_011C{}", self.rng.hex(20))],
            }),
            _ => json!({ "Content-Type": ["application/json"] }),
        }
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() { "unknown" } else { s }.to_owned()
}

fn tokens_json(raw: &Raw, old: bool) -> Value {
    let mut tokens = json!({
        "input_tokens": raw.input, "output_tokens": raw.output, "reasoning_tokens": raw.reasoning,
        "cached_tokens": raw.cache_read, "total_tokens": raw.total,
    });
    if !old {
        if let Some(map) = tokens.as_object_mut() {
            for (k, v) in [
                ("cache_read_tokens", json!(raw.cache_read)),
                ("cache_read_tokens_present", json!(true)),
                ("cache_creation_tokens", json!(raw.cache_write)),
                ("cache_creation_5m_tokens", json!(raw.cache_write)),
                ("cache_creation_1h_tokens", json!(0)),
            ] {
                map.insert(k.to_owned(), v);
            }
        }
    }
    tokens
}

/// CPA's v2 `token_breakdown`; for an unknown provider CPA can only say "unclassified".
fn breakdown_json(b: [u64; 6], total: u64, unclassified: bool) -> Value {
    let b = if unclassified { [0; 6] } else { b };
    let input = b[0] + b[1] + b[2];
    let output = b[3] + b[4];
    json!({
        "schema_version": 2,
        "quality": if unclassified { "unclassified" } else { "complete" },
        "total_tokens": total,
        "input": { "total_tokens": input, "uncached_tokens": b[0], "cache_read_tokens": b[1], "cache_write_tokens": b[2] },
        "output": { "total_tokens": output, "non_reasoning_tokens": b[3], "reasoning_tokens": b[4] },
        "unclassified_tokens": total.saturating_sub(input + output),
    })
}

/// Upstream error text; like real bodies, some of it is personal data that must never leak.
fn failure_body(status: u16) -> String {
    match status {
        429 => r#"{"error":{"type":"usage_limit_reached","message":"The usage limit has been reached","resets_in_seconds":1843}}"#.to_owned(),
        529 => r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#.to_owned(),
        502 => "<html><body><h1>502 Bad Gateway</h1></body></html>".to_owned(),
        503 => "upstream connect error or disconnect/reset before headers. reset reason: connection termination".to_owned(),
        401 => r#"{"error":{"message":"Your authentication token has expired. Please try signing in again.","code":"token_expired"}}"#.to_owned(),
        400 => r#"{"error":{"message":"Invalid 'input[3].content': string too long (account alice@example.com)","type":"invalid_request_error"}}"#.to_owned(),
        _ => r#"{"error":{"message":"Internal server error","type":"server_error"}}"#.to_owned(),
    }
}

/// Go's RFC3339Nano in UTC: fraction without trailing zeros, omitted when zero.
pub fn rfc3339_nano(unix_secs: f64) -> String {
    let unix = if unix_secs.is_finite() {
        unix_secs.max(0.0)
    } else {
        0.0
    };
    let secs = unix.floor() as u64;
    let nanos = (((unix - unix.floor()) * 1e9).round() as u64).min(999_999_999);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    if nanos > 0 {
        out.push('.');
        out.push_str(format!("{nanos:09}").trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe as i64 + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: &Value, key: &str) -> u64 {
        v[key].as_u64().unwrap_or(0)
    }

    /// API.md 2.1 derivation for a provider whose semantics the generator knows.
    fn derive(sem: Semantics, t: &Value) -> [u64; 6] {
        let (inp, out, r) = (
            n(t, "input_tokens"),
            n(t, "output_tokens"),
            n(t, "reasoning_tokens"),
        );
        let (mut cr, cw) = (n(t, "cache_read_tokens"), n(t, "cache_creation_tokens"));
        if cr == 0 && cw == 0 && sem != Semantics::Independent {
            cr = n(t, "cached_tokens");
        }
        match sem {
            Semantics::Subset => [inp - cr - cw, cr, cw, out - r, r, 0],
            Semantics::Independent => [inp, cr, cw, out, r, 0],
            Semantics::SeparateReasoning => [inp - cr - cw, cr, cw, out, r, 0],
            Semantics::Unknown => [0, 0, 0, 0, 0, n(t, "total_tokens")],
        }
    }

    fn check_usage(record: &Value, truth: &Truth) {
        let p = PROVIDERS
            .iter()
            .find(|p| or_unknown(p.name) == truth.provider)
            .expect("known provider");
        let tokens = &record["tokens"];
        let total = n(tokens, "total_tokens");
        if total > 0 {
            assert_eq!(truth.total_tokens(), total, "{record}");
        }
        let derived = derive(p.semantics, tokens);
        if truth.tokens[5] == 0 || p.semantics == Semantics::Unknown && total > 0 {
            assert_eq!(derived, truth.tokens, "{record}");
        } else {
            assert_ne!(derived.iter().sum::<u64>(), total, "inconsistent: {record}");
        }
        if let Some(b) = record.get("token_breakdown") {
            let (i, o) = (&b["input"], &b["output"]);
            let buckets = [
                n(i, "uncached_tokens"),
                n(i, "cache_read_tokens"),
                n(i, "cache_write_tokens"),
                n(o, "non_reasoning_tokens"),
                n(o, "reasoning_tokens"),
                n(b, "unclassified_tokens"),
            ];
            let valid = n(i, "total_tokens") == buckets[..3].iter().sum::<u64>()
                && n(o, "total_tokens") == buckets[3] + buckets[4]
                && n(b, "total_tokens") == buckets.iter().sum::<u64>();
            assert_eq!(valid, buckets == truth.tokens, "{record}");
        }
        let status = record["fail"]["status_code"].as_u64().unwrap_or(0);
        let expected = match (truth.failed, status) {
            (false, _) => 200,
            (true, 0) => 500,
            (true, s) => s,
        };
        assert_eq!(u64::from(truth.status_code), expected);
        assert_eq!(record["latency_ms"].as_u64(), truth.latency_ms);
        assert_eq!(record["ttft_ms"].as_u64().unwrap_or(0), truth.ttft_ms);
        assert_eq!(record["api_key"].as_str(), truth.api_key.as_deref());
        assert_eq!(record["event_id"].as_str(), truth.event_id.as_deref());
        assert!(record["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }

    #[test]
    fn truths_are_self_consistent() {
        let mix = WorkloadMix {
            string_wrapped: 0.2,
            control: 0.05,
            invalid: 0.1,
            inconsistent: 0.1,
            duplicate_event_id: 0.05,
            ..WorkloadMix::default()
        };
        let mut w = Workload::new(42, mix);
        let mut seen = std::collections::HashSet::new();
        let mut kinds = std::collections::HashSet::new();
        for i in 0..10_000 {
            let g = w.next(1_787_409_543.0 + f64::from(i));
            let mut value: Value = serde_json::from_str(&g.element_json).expect("valid JSON");
            if let (Some(inner), Expect::Usage(_) | Expect::Duplicate(_)) =
                (value.as_str(), &g.expect)
            {
                value = serde_json::from_str(inner).expect("wrapped object");
            }
            match &g.expect {
                Expect::Usage(t) => check_usage(&value, t),
                Expect::Duplicate(t) => {
                    assert!(t.event_id.as_ref().is_some_and(|id| seen.contains(id)))
                }
                Expect::Control => assert!(value.get("timestamp").is_none()),
                Expect::Invalid(reason) => {
                    let inner = value.as_str().map(serde_json::from_str::<Value>);
                    kinds.insert(*reason);
                    match *reason {
                        "not_json" => assert!(inner.is_some_and(|r| r.is_err())),
                        "not_object" => assert!(!inner
                            .map_or(value.clone(), |r| r.expect("json"))
                            .is_object()),
                        _ => assert!(value.is_object()),
                    }
                }
            }
            if let Expect::Usage(Truth {
                event_id: Some(id), ..
            }) = g.expect
            {
                seen.insert(id);
            }
        }
        assert_eq!(kinds.len(), 4, "every invalid reason is generated");
    }

    #[test]
    fn deterministic_for_a_seed() {
        let run = |seed| {
            let mut w = Workload::new(seed, WorkloadMix::default());
            (0..500)
                .map(|i| w.next(1e9 + f64::from(i)))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn rfc3339_nano_matches_go() {
        assert_eq!(rfc3339_nano(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_nano(951_782_400.25), "2000-02-29T00:00:00.25Z");
        assert_eq!(rfc3339_nano(1_787_409_543.5), "2026-08-22T14:39:03.5Z");
    }
}
