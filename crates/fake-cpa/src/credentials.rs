//! CPA's credentials listing (v0 `auth-files`, v8 `credentials`; API.md section 3) for the fake
//! CPA. Entries carry what real ones carry, personal data included (`email`, `account`, e-mails
//! in file names), so tests can check the exporter keeps none of it.

use serde::Deserialize;
use serde_json::{json, Value};

/// Buckets of `recent_requests` (10 minutes each).
const RECENT_BUCKETS: usize = 20;
/// Start of the first `recent_requests` bucket; the exporter ignores these times.
const RECENT_START_UNIX: u64 = 1_787_400_000;

/// One upstream credential as CPA lists it. Fields are public so tests can change a status,
/// block a credential or remove it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimCredential {
    /// 16 hex chars; the `auth_index` of the usage records this credential serves.
    pub auth_index: String,
    /// `provider` / `type`, e.g. `codex`.
    pub provider: String,
    /// File name (`name` and `id`), typically with the account's e-mail in it.
    pub file_name: String,
    /// CPA's `label`; empty for most entries.
    pub label: String,
    /// The account's e-mail (`email` and `account`); empty for non-OAuth entries.
    pub email: String,
    /// `active`, `pending`, `refreshing`, `error`, `disabled`, `unknown` (or anything else).
    pub status: String,
    pub status_message: String,
    pub disabled: bool,
    pub unavailable: bool,
    /// RFC 3339, when CPA will try a held-back credential again.
    pub next_retry_after: Option<String>,
    /// CPA's quota state of the credential; only the `errors` channel shows it.
    pub quota: Option<SimQuota>,
    /// In-memory attempt counters; the fake CPA bumps them on every pushed record.
    pub success: u64,
    pub failed: u64,
    /// Codex entries carry the account's `id_token` claims (API.md 3): the account id (an
    /// identifier the exporter must not export), the plan and the subscription period.
    pub id_token: Option<Value>,
}

/// CPA's quota state (`QuotaState`), as the `errors` channel renders it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimQuota {
    pub exceeded: bool,
    /// E.g. `quota`; empty is left out.
    pub reason: String,
    /// RFC 3339, when CPA expects the quota back.
    pub next_recover_at: Option<String>,
    /// 0 is left out.
    pub backoff_level: u32,
}

/// The subscription end of codex credentials made by [`SimCredential::new`].
pub const SUBSCRIPTION_UNTIL: &str = "2027-06-30T00:00:00Z";

impl SimCredential {
    /// An active credential with CPA's usual file name for `provider`.
    pub fn new(provider: &str, auth_index: &str, account: &str) -> SimCredential {
        let email = if account.contains('@') { account } else { "" };
        let file_name = match provider {
            "gemini-cli" => format!("{account}-acme-dev-3141.json"),
            _ => format!("{provider}-{account}.json"),
        };
        SimCredential {
            auth_index: auth_index.to_owned(),
            provider: provider.to_owned(),
            file_name,
            label: String::new(),
            email: email.to_owned(),
            status: "active".to_owned(),
            status_message: String::new(),
            disabled: false,
            unavailable: false,
            next_retry_after: None,
            quota: None,
            success: 0,
            failed: 0,
            id_token: (provider == "codex").then(|| {
                json!({
                    "chatgpt_account_id": format!("acct-{auth_index}"),
                    "plan_type": "plus",
                    "chatgpt_subscription_active_start": "2026-06-30T00:00:00Z",
                    "chatgpt_subscription_active_until": SUBSCRIPTION_UNTIL,
                })
            }),
        }
    }

    /// Set the codex subscription end (RFC 3339), keeping the rest of the `id_token`.
    pub fn subscription_until(mut self, until: &str) -> SimCredential {
        let mut token = self.id_token.take().unwrap_or_else(|| json!({}));
        if let Some(map) = token.as_object_mut() {
            map.insert("chatgpt_subscription_active_until".to_owned(), json!(until));
        }
        self.id_token = Some(token);
        self
    }

    /// The entry as CPA's listing renders it.
    pub fn to_json(&self) -> Value {
        let mut entry = json!({
            "id": self.file_name,
            "auth_index": self.auth_index,
            "name": self.file_name,
            "type": self.provider,
            "provider": self.provider,
            "label": self.label,
            "status": self.status,
            "status_message": self.status_message,
            "disabled": self.disabled,
            "unavailable": self.unavailable,
            "runtime_only": false,
            "source": "file",
            "size": 4312,
            "email": self.email,
            "account_type": if self.email.is_empty() { "api_key" } else { "oauth" },
            "account": self.email,
            "created_at": "2026-07-30T09:12:44Z",
            "modtime": "2026-08-22T13:55:02Z",
            "updated_at": "2026-08-22T13:55:02Z",
            "last_refresh": "2026-08-22T13:55:02Z",
            "success": self.success,
            "failed": self.failed,
            "recent_requests": self.recent_requests(),
        });
        if let (Some(at), Some(map)) = (&self.next_retry_after, entry.as_object_mut()) {
            map.insert("next_retry_after".to_owned(), json!(at));
        }
        if let (Some(token), Some(map)) = (&self.id_token, entry.as_object_mut()) {
            map.insert("id_token".to_owned(), token.clone());
        }
        entry
    }

    /// 20 buckets of 10 minutes; all attempts are put in the newest one.
    fn recent_requests(&self) -> Value {
        let buckets: Vec<Value> = (0..RECENT_BUCKETS)
            .map(|i| {
                let newest = i + 1 == RECENT_BUCKETS;
                json!({
                    "time": RECENT_START_UNIX + 600 * i as u64,
                    "success": if newest { self.success } else { 0 },
                    "failed": if newest { self.failed } else { 0 },
                })
            })
            .collect();
        Value::Array(buckets)
    }
}

/// `{"files": [...]}`.
pub fn listing_json(credentials: &[SimCredential]) -> Value {
    json!({ "files": credentials.iter().map(SimCredential::to_json).collect::<Vec<_>>() })
}

/// `{"files": [...]}` with the fields the exporter reads only (see `SimConfig::compact_listing`).
pub fn compact_listing_json(credentials: &[SimCredential]) -> Value {
    let entry = |c: &SimCredential| {
        json!({
            "auth_index": c.auth_index,
            "name": c.file_name,
            "provider": c.provider,
            "status": c.status,
            "disabled": c.disabled,
            "unavailable": c.unavailable,
        })
    };
    json!({ "files": credentials.iter().map(entry).collect::<Vec<_>>() })
}

/// The credential and outcome of a usage record, as CPA counts them (`None` for anything that
/// is not a record with an `auth_index`). String-wrapped records are looked into.
pub fn attempt_of(element_json: &str) -> Option<(String, bool)> {
    #[derive(Deserialize)]
    struct Attempt {
        #[serde(default)]
        auth_index: String,
        #[serde(default)]
        failed: bool,
    }
    let attempt = serde_json::from_str::<Attempt>(element_json).or_else(|_| {
        let inner: String = serde_json::from_str(element_json)?;
        serde_json::from_str::<Attempt>(&inner)
    });
    attempt
        .ok()
        .filter(|a| !a.auth_index.is_empty())
        .map(|a| (a.auth_index, a.failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_look_like_cpas() {
        let mut c = SimCredential::new("codex", "0123456789abcdef", "alice@example.com");
        c.next_retry_after = Some("2026-08-22T14:40:00Z".to_owned());
        let v = listing_json(&[c]);
        let e = &v["files"][0];
        assert_eq!(e["name"], "codex-alice@example.com.json");
        assert_eq!(e["email"], "alice@example.com");
        assert_eq!(e["next_retry_after"], "2026-08-22T14:40:00Z");
        assert_eq!(e["recent_requests"].as_array().map(Vec::len), Some(20));
        let g = SimCredential::new("gemini-cli", "1", "bob@example.org");
        assert_eq!(g.file_name, "bob@example.org-acme-dev-3141.json");
    }

    #[test]
    fn attempts_are_read_from_objects_and_wrapped_strings() {
        let rec = r#"{"auth_index":"ab","failed":true,"timestamp":"x"}"#;
        assert_eq!(attempt_of(rec), Some(("ab".to_owned(), true)));
        let wrapped = serde_json::to_string(rec).unwrap();
        assert_eq!(attempt_of(&wrapped), Some(("ab".to_owned(), true)));
        assert_eq!(attempt_of(r#"{"refresh":true}"#), None);
        assert_eq!(attempt_of("not json"), None);
    }
}
