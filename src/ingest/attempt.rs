//! One ingested record as an upstream attempt, in queue order: what the failover grouping reads,
//! and complete enough for a per-record event log written after the batch is committed.
//!
//! Label values are the sanitized ones the metrics carry (the client key as its one-way label),
//! shared between the attempts of one route, so building the list costs no string per record.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::series::RequestId;
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

/// One ingested upstream attempt (a usage record that was neither a duplicate nor invalid).
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// Start of the attempt, Unix seconds (`timestamp`, capped at the pop time); `None` when
    /// the record's timestamp is not a time.
    pub started: Option<f64>,
    /// The record's `request_id` in CPA's hex form; `None` when absent or not hex (it still
    /// groups through [`Attempt::request_key`]). Only the event log and exemplars show it.
    pub request_id: Option<RequestId>,
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
    fn request_keys_separate_clients_and_ids() {
        let k = request_key("sk-1", "a1b2c3d4");
        assert_eq!(k, request_key("sk-1", "a1b2c3d4"));
        assert_ne!(k, request_key("sk-2", "a1b2c3d4"));
        assert_ne!(k, request_key("sk-1", "a1b2c3d5"));
        // The separator keeps ("ab", "c") apart from ("a", "bc").
        assert_ne!(request_key("ab", "c"), request_key("a", "bc"));
    }
}
