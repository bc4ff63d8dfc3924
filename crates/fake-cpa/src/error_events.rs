//! The events CPA publishes on RESP `SUBSCRIBE errors` (`sdk/cliproxy/auth/error_events.go`),
//! one per failed upstream attempt, built here from a failed usage record and the fake's state
//! of its credential.
//!
//! Shape and field order are those the real v7.2.140 sent (captured with an upstream answering
//! 429 and 500): `code` and `retryable` are left out when empty (as for every OpenAI-compatible
//! failure seen), so are `status_message`, `next_retry_after`, `quota` and its empty fields.
//! Strings are escaped as Go's `encoding/json` does (`<`, `>`, `&` as `\u003c`...).
//!
//! Where the fake differs: real CPA sets the credential's status to `error` (message = the
//! body) on every failure, so its events always say `error`; the fake reports its credential as
//! listed (tests set the state they want, and the listing agrees with the events). A record whose
//! `auth_index` is not listed gets what the real one sent under the README's test config
//! (`disable-cooling: true`): status `error`, not unavailable, and for a 429 a model quota of
//! `{"exceeded":false,"reason":"quota"}`.

use serde::Serialize;
use serde_json::Value;

use super::credentials::{SimCredential, SimQuota};

/// CPA's body when the error carries no text.
const NO_BODY: &str = "request failed";
/// CPA's status when the error carries none.
const NO_STATUS: u64 = 500;
/// Status of a credential or model right after a failure.
const STATUS_ERROR: &str = "error";
/// The quota reason CPA gives a 429.
const QUOTA_REASON: &str = "quota";
const TOO_MANY_REQUESTS: u64 = 429;

#[derive(Serialize)]
struct Event<'a> {
    timestamp: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    provider: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    model: &'a str,
    #[serde(skip_serializing_if = "String::is_empty")]
    auth_id: String,
    auth_index: &'a str,
    status_code: u64,
    body: &'a str,
    auth_status: AuthStatus<'a>,
}

#[derive(Serialize)]
struct AuthStatus<'a> {
    status: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    status_message: &'a str,
    disabled: bool,
    unavailable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_retry_after: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<Quota<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<ModelStatus<'a>>,
}

#[derive(Serialize)]
struct ModelStatus<'a> {
    name: &'a str,
    status: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    status_message: &'a str,
    unavailable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_retry_after: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<Quota<'a>>,
}

#[derive(Serialize)]
struct Quota<'a> {
    exceeded: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_recover_at: Option<&'a str>,
    #[serde(skip_serializing_if = "is_zero")]
    backoff_level: u32,
}

/// A string field, trimmed as CPA does; "" when absent.
fn text(v: Option<&Value>) -> &str {
    v.and_then(Value::as_str).unwrap_or("").trim()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// CPA leaves out a quota with nothing set.
fn quota(q: &SimQuota) -> Option<Quota<'_>> {
    let empty = !q.exceeded && q.reason.is_empty() && q.next_recover_at.is_none();
    (!empty || q.backoff_level > 0).then(|| Quota {
        exceeded: q.exceeded,
        reason: &q.reason,
        next_recover_at: q.next_recover_at.as_deref(),
        backoff_level: q.backoff_level,
    })
}

/// The auth id the event names: the credential's file name, or for an unlisted `auth_index` a
/// file-like name made from it (real CPA: the auth file name, or an id such as
/// `openai-compatibility:<name>:<hash>` for keys from its config).
pub fn auth_id(provider: &str, auth_index: &str, credential: Option<&SimCredential>) -> String {
    match credential {
        Some(c) => c.file_name.clone(),
        None if auth_index.is_empty() => String::new(),
        None => {
            let provider = if provider.is_empty() {
                "fakeup"
            } else {
                provider
            };
            format!("{provider}-{auth_index}.json")
        }
    }
}

/// The `errors` event for a usage record, `None` unless it is a failed record. `now` stands in
/// for a missing `timestamp` (real CPA stamps the event when it publishes it, a few ms after
/// the record's own timestamp; the fake reuses the record's, so tests can predict it).
pub fn from_record(
    record: &Value,
    credential: Option<&SimCredential>,
    now: &str,
) -> Option<String> {
    if record.get("failed").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let provider = text(record.get("provider"));
    let model = text(record.get("model"));
    let auth_index = text(record.get("auth_index"));
    let fail = record.get("fail");
    let status_code = fail
        .and_then(|f| f.get("status_code"))
        .and_then(Value::as_u64)
        .filter(|s| *s > 0)
        .unwrap_or(NO_STATUS);
    let body = match text(fail.and_then(|f| f.get("body"))) {
        "" => NO_BODY,
        body => body,
    };
    let timestamp = match text(record.get("timestamp")) {
        "" => now,
        ts => ts,
    };
    let unlisted_quota = SimQuota {
        reason: QUOTA_REASON.to_owned(),
        ..SimQuota::default()
    };
    let model_quota = match credential {
        Some(c) => c.quota.as_ref().and_then(quota),
        None if status_code == TOO_MANY_REQUESTS => quota(&unlisted_quota),
        None => None,
    };
    let model_status = (!model.is_empty()).then(|| ModelStatus {
        name: model,
        status: STATUS_ERROR,
        status_message: body,
        unavailable: credential.is_some_and(|c| c.unavailable),
        next_retry_after: credential.and_then(|c| c.next_retry_after.as_deref()),
        quota: model_quota,
    });
    let auth_status = match credential {
        Some(c) => AuthStatus {
            status: &c.status,
            status_message: c.status_message.trim(),
            disabled: c.disabled,
            unavailable: c.unavailable,
            next_retry_after: c.next_retry_after.as_deref(),
            quota: c.quota.as_ref().and_then(quota),
            model: model_status,
        },
        None => AuthStatus {
            status: STATUS_ERROR,
            status_message: body,
            disabled: false,
            unavailable: false,
            next_retry_after: None,
            quota: None,
            model: model_status,
        },
    };
    let event = Event {
        timestamp,
        provider,
        model,
        auth_id: auth_id(provider, auth_index, credential),
        auth_index,
        status_code,
        body,
        auth_status,
    };
    serde_json::to_string(&event)
        .ok()
        .map(|json| go_escape(&json))
}

/// Go's `encoding/json` escapes these even inside strings; they occur in JSON text only there.
fn go_escape(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        match ch {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            _ => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BODY_429: &str = r#"{"error": {"message": "Rate limit reached for fake", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}"#;

    fn failed(status: u64, body: &str) -> Value {
        json!({
            "timestamp": "2026-12-07T21:18:34.454997335Z",
            "auth_index": "57b8ed21a304e3d0", "failed": true,
            "fail": { "status_code": status, "body": body },
            "provider": "openai-compatible-fakeup", "model": "fake-429",
        })
    }

    /// Byte for byte what the real v7.2.140 published for a 429 under the README's config
    /// (`disable-cooling: true`), but for `auth_id` (a config key there) and its later timestamp.
    #[test]
    fn an_unlisted_429_reads_like_the_real_one() {
        let event = from_record(&failed(429, BODY_429), None, "now").expect("failed record");
        let body = serde_json::to_string(BODY_429).unwrap();
        let expected = format!(
            concat!(
                r#"{{"timestamp":"2026-12-07T21:18:34.454997335Z","provider":"openai-compatible-fakeup","#,
                r#""model":"fake-429","auth_id":"openai-compatible-fakeup-57b8ed21a304e3d0.json","#,
                r#""auth_index":"57b8ed21a304e3d0","status_code":429,"body":{b},"#,
                r#""auth_status":{{"status":"error","status_message":{b},"disabled":false,"#,
                r#""unavailable":false,"model":{{"name":"fake-429","status":"error","#,
                r#""status_message":{b},"unavailable":false,"#,
                r#""quota":{{"exceeded":false,"reason":"quota"}}}}}}}}"#
            ),
            b = body
        );
        assert_eq!(event, expected);
    }

    #[test]
    fn a_500_has_no_quota_and_an_empty_failure_gets_cpas_defaults() {
        let event = from_record(&failed(500, "boom"), None, "now").expect("failed");
        assert!(!event.contains("quota"), "{event}");
        let bare = json!({"failed": true, "auth_index": "ab"});
        let event: Value =
            serde_json::from_str(&from_record(&bare, None, "T").expect("failed")).expect("json");
        assert_eq!(event["status_code"], 500);
        assert_eq!(event["body"], "request failed");
        assert_eq!(event["timestamp"], "T");
        assert_eq!(event["auth_id"], "fakeup-ab.json");
        assert!(
            event["auth_status"].get("model").is_none(),
            "no model, no model state"
        );
    }

    #[test]
    fn a_listed_credential_lends_its_state() {
        let mut c = SimCredential::new("codex", "57b8ed21a304e3d0", "alice@example.com");
        c.status = "error".to_owned();
        c.unavailable = true;
        c.next_retry_after = Some("2026-12-07T21:22:09.1142999Z".to_owned());
        c.quota = Some(SimQuota {
            exceeded: true,
            reason: "quota".to_owned(),
            next_recover_at: c.next_retry_after.clone(),
            backoff_level: 1,
        });
        let event = from_record(&failed(429, "<limit & more>"), Some(&c), "now").expect("failed");
        assert!(
            event.contains(r#""body":"\u003climit \u0026 more\u003e""#),
            "{event}"
        );
        let v: Value = serde_json::from_str(&event).expect("json");
        assert_eq!(v["auth_id"], "codex-alice@example.com.json");
        let status = &v["auth_status"];
        assert_eq!(status["status"], "error");
        assert!(status.get("status_message").is_none());
        assert_eq!(status["unavailable"], true);
        assert_eq!(status["next_retry_after"], "2026-12-07T21:22:09.1142999Z");
        let quota = json!({"exceeded": true, "reason": "quota",
            "next_recover_at": "2026-12-07T21:22:09.1142999Z", "backoff_level": 1});
        assert_eq!(status["quota"], quota);
        assert_eq!(status["model"]["quota"], quota);
        assert_eq!(status["model"]["status_message"], "<limit & more>");
    }

    #[test]
    fn only_failed_records_make_events() {
        let ok = json!({"failed": false, "auth_index": "ab"});
        assert_eq!(from_record(&ok, None, "now"), None);
        assert_eq!(from_record(&json!({"refresh": true}), None, "now"), None);
    }
}
