//! Label values derived from records: bounded, printable, and free of secrets.

use std::borrow::Cow;
use std::fmt::Write;

use sha2::{Digest, Sha256};

/// Longest label value kept, in bytes; longer values are cut at a character boundary.
pub const MAX_LABEL_BYTES: usize = 128;

/// Display form of a client API key: `sha256:` and the first 12 hex digits of its SHA-256,
/// CPA's own display form. One-way, so the key itself never reaches a label or the store.
pub fn api_key_label(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(19);
    out.push_str("sha256:");
    for b in &digest[..6] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Stable 64-bit id of an `event_id`, for the dedup window (the id itself is not stored).
pub fn event_id_hash(id: &str) -> u64 {
    let digest = Sha256::digest(id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Make a record string safe as a label value: control characters become `?`, length is capped.
pub fn sanitize(value: &str) -> Cow<'_, str> {
    let clean = value.len() <= MAX_LABEL_BYTES && !value.chars().any(char::is_control);
    if clean {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len().min(MAX_LABEL_BYTES));
    for c in value.chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > MAX_LABEL_BYTES {
            break;
        }
        out.push(c);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_become_short_one_way_hashes() {
        // sha256("sk-client-key-1") starts with these 12 hex digits.
        let label = api_key_label("sk-client-key-1");
        assert!(label.starts_with("sha256:"));
        assert_eq!(label.len(), 19);
        assert!(!label.contains("client"));
        assert_eq!(label, api_key_label("sk-client-key-1"));
    }

    #[test]
    fn control_characters_and_long_values_are_tamed() {
        assert_eq!(sanitize("gpt-5.4"), "gpt-5.4");
        assert_eq!(sanitize("a\nb\u{1f}c"), "a?b?c");
        let long = "é".repeat(100);
        let cut = sanitize(&long);
        assert!(cut.len() <= MAX_LABEL_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
