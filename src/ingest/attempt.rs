//! One ingested record as an upstream attempt, in queue order: what the failover grouping reads,
//! and complete enough for a per-record event log written after the batch is committed.
//!
//! Label values are the sanitized ones the metrics carry (the client key as its one-way label),
//! shared between the attempts of one route, so building the list costs no string per record.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::tokens::Tokens;

/// The route of an attempt: the label values of `cpa_requests_total`, sanitized.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub provider: Box<str>,
    pub model: Box<str>,
    /// What the client asked for (`alias`, else `model`).
    pub requested_model: Box<str>,
    pub credential: Box<str>,
    /// The client key's label (alias-free one-way hash, `none` without a key), never the key.
    pub api_key: Box<str>,
    pub endpoint: Box<str>,
}

/// A record's `request_id`, at most [`RequestId::MAX`] bytes of it, held inline. CPA's are 8 hex
/// digits; only the event log and exemplars may show it, never a label or the database.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestId {
    len: u8,
    bytes: [u8; RequestId::MAX],
}

impl RequestId {
    pub const MAX: usize = 16;

    /// The first [`RequestId::MAX`] bytes of `id` (cut at a character boundary), control
    /// characters replaced by `?`.
    pub fn new(id: &str) -> RequestId {
        let mut out = RequestId::default();
        let mut buf = [0u8; 4];
        for c in id.chars() {
            let c = if c.is_control() { '?' } else { c };
            let enc = c.encode_utf8(&mut buf).as_bytes();
            let at = usize::from(out.len);
            if at + enc.len() > Self::MAX {
                break;
            }
            out.bytes[at..at + enc.len()].copy_from_slice(enc);
            out.len += enc.len() as u8;
        }
        out
    }

    pub fn as_str(&self) -> &str {
        // Only whole characters are ever copied in.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Printed in full only through [`RequestId::as_str`], so a `{:?}` in a log shows no id.
impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestId({} bytes)", self.len)
    }
}

/// One ingested upstream attempt (a usage record that was neither a duplicate nor invalid).
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// Start of the attempt, Unix seconds (`timestamp`, capped at the pop time); `None` when
    /// the record's timestamp is not a time.
    pub started: Option<f64>,
    /// The record's `request_id` as given (first 16 bytes); empty when absent.
    pub request_id: RequestId,
    /// Which inbound request the attempt belongs to: the first 64 bits of SHA-256 over the
    /// client key and the `request_id` ([`request_key`]); `None` without a `request_id`.
    pub request_key: Option<u64>,
    pub route: Arc<Route>,
    /// HTTP status: 200 for a success, the failure's status (500 when unknown) otherwise.
    pub status_code: u16,
    pub failed: bool,
    pub latency_seconds: Option<f64>,
    pub ttft_seconds: Option<f64>,
    /// The six non-overlapping buckets, in the order of [`crate::families::TOKEN_TYPES`].
    pub tokens: Tokens,
    /// Estimated cost in nano-USD; `None` when the model has no price.
    pub cost_nano_usd: Option<u64>,
}

impl Attempt {
    /// When the attempt ended (start + latency), Unix seconds.
    pub fn ended(&self) -> Option<f64> {
        self.started
            .map(|s| s + self.latency_seconds.unwrap_or(0.0))
    }
}

/// The grouping key of an inbound request: the first 64 bits of SHA-256 over the client key
/// (plaintext), a separator and the `request_id`. Without the client's key it cannot be turned
/// back into a `request_id`, so it may be stored; two clients' equal ids do not collide.
pub fn request_key(api_key: &str, request_id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(api_key.as_bytes());
    h.update([0u8]);
    h.update(request_id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_short_whole_and_printable() {
        assert_eq!(RequestId::new("a1b2c3d4").as_str(), "a1b2c3d4");
        assert_eq!(RequestId::new(&"x".repeat(40)).as_str(), "x".repeat(16));
        assert_eq!(RequestId::new(&"é".repeat(9)).as_str(), "é".repeat(8));
        assert_eq!(RequestId::new("a\nb").as_str(), "a?b");
        assert!(RequestId::new("").is_empty());
        assert!(!format!("{:?}", RequestId::new("a1b2c3d4")).contains("a1b2"));
    }

    #[test]
    fn request_keys_separate_clients_and_ids() {
        let k = request_key("sk-1", "a1b2c3d4");
        assert_eq!(k, request_key("sk-1", "a1b2c3d4"));
        assert_ne!(k, request_key("sk-2", "a1b2c3d4"));
        assert_ne!(k, request_key("sk-1", "a1b2c3d5"));
        // The separator keeps ("ab", "c") apart from ("a", "bc").
        assert_ne!(request_key("ab", "c"), request_key("a", "bc"));
    }
}
