//! How stored label sets are shown (drop, aliases): a rendering choice, never a storage one.

use std::collections::HashMap;

/// How stored label sets are shown. Applied when rendering, so changing it never loses counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelOptions {
    pub drop: Vec<&'static str>,
    /// `sha256:<12 hex>` -> display alias.
    pub api_key_aliases: HashMap<String, String>,
    /// `auth_index` -> display name, for the `credential` label.
    pub credential_names: HashMap<String, String>,
    /// Show credential file names with their e-mail part unmasked in `cpa_credential_info`.
    pub unmask_credential_names: bool,
}

impl LabelOptions {
    /// Whether stored label sets render as they are (no drop, no renaming).
    pub fn is_identity(&self) -> bool {
        self.drop.is_empty() && self.api_key_aliases.is_empty() && self.credential_names.is_empty()
    }
}
