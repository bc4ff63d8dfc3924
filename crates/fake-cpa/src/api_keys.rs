//! CPA's counts of its config API-key credentials (v0 `GET /v0/management/api-key-usage`, v8
//! `/v8/management/observability/usage/api-keys`), in the shape CPA v7.2.140 answers:
//! `{"<provider>": {"<base_url>|<upstream key in plaintext>": {"success", "failed",
//! "recent_requests"}}}`. The keys are secrets: tests check the exporter keeps none of them.

use serde_json::{json, Map, Value};

/// Buckets of `recent_requests` (10 minutes each, labelled `"HH:MM-HH:MM"`).
const RECENT_BUCKETS: usize = 20;

/// One upstream API key of CPA's config. Counters are set by the test (CPA bumps them on every
/// attempt, published or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimApiKey {
    /// CPA's group: `gemini`, `codex`, `claude`, or an openai-compatibility entry's name.
    pub provider: String,
    /// Empty for a provider's default endpoint.
    pub base_url: String,
    pub key: String,
    pub success: u64,
    pub failed: u64,
}

impl SimApiKey {
    pub fn new(provider: &str, base_url: &str, key: &str) -> SimApiKey {
        SimApiKey {
            provider: provider.to_owned(),
            base_url: base_url.to_owned(),
            key: key.to_owned(),
            success: 0,
            failed: 0,
        }
    }

    /// 20 buckets of 10 minutes; all attempts are put in the newest one.
    fn recent_requests(&self) -> Value {
        let buckets: Vec<Value> = (0..RECENT_BUCKETS)
            .map(|i| {
                let newest = i + 1 == RECENT_BUCKETS;
                let (from, to) = (i * 10, i * 10 + 10);
                json!({
                    "time": format!("{:02}:{:02}-{:02}:{:02}", from / 60, from % 60, to / 60, to % 60),
                    "success": if newest { self.success } else { 0 },
                    "failed": if newest { self.failed } else { 0 },
                })
            })
            .collect();
        Value::Array(buckets)
    }
}

/// The answer for `keys`; two entries with the same provider, base URL and key are summed, as
/// CPA sums them.
pub fn usage_json(keys: &[SimApiKey]) -> Value {
    let mut out = Map::new();
    for k in keys {
        let group = out
            .entry(k.provider.to_ascii_lowercase())
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(group) = group.as_object_mut() else {
            continue;
        };
        let composite = format!("{}|{}", k.base_url, k.key);
        let (mut success, mut failed) = (k.success, k.failed);
        if let Some(prev) = group.get(&composite) {
            success += prev["success"].as_u64().unwrap_or(0);
            failed += prev["failed"].as_u64().unwrap_or(0);
        }
        let summed = SimApiKey {
            success,
            failed,
            ..k.clone()
        };
        group.insert(
            composite,
            json!({"success": success, "failed": failed, "recent_requests": summed.recent_requests()}),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_by_provider_and_keyed_by_base_url_and_key() {
        let mut a = SimApiKey::new("fakeup", "http://127.0.0.1:18081/v1", "sk-upstream-a");
        a.success = 3;
        let mut b = SimApiKey::new("Gemini", "", "AIza-1");
        b.failed = 2;
        let v = usage_json(&[a.clone(), b, a]);
        let a = &v["fakeup"]["http://127.0.0.1:18081/v1|sk-upstream-a"];
        assert_eq!(a["success"], 6);
        assert_eq!(a["recent_requests"].as_array().map(Vec::len), Some(20));
        assert_eq!(a["recent_requests"][19]["time"], "03:10-03:20");
        assert_eq!(v["gemini"]["|AIza-1"]["failed"], 2);
    }
}
