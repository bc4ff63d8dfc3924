//! `cpa_credential_errors_total`: failed upstream attempts per credential and status, counted
//! from CPA's `errors` channel as they happen ([`crate::pipeline::errors`]). Live only: it starts
//! again from zero when the exporter restarts (CPA does not queue the channel, so there is
//! nothing to catch up on), and a series appears with its first error (its label sets are not
//! known before).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use super::cpa_view::credential_label;
use super::text::Writer;
use super::LabelOptions;
use crate::families::label::{CREDENTIAL, PROVIDER, STATUS_CODE};
use crate::families::meta::errors::{CREDENTIAL_ERRORS, ERRORS_SUBSCRIBED};
use crate::families::OVERFLOW_VALUE;
use crate::labels::sanitize;

/// The `family` label of `cpa_exporter_series_overflow_total` for this counter.
pub const FAMILY: &str = "credential_errors";

/// The status CPA reports when it does not know one; anything non-HTTP reads as it too (as in
/// `cpa_requests_failed_total`).
const UNKNOWN_STATUS: u16 = 500;

/// Default series limit until [`CredentialErrors::set_limit`] (the store's default).
const DEFAULT_LIMIT: usize = 10_000;

/// (provider, `auth_index` or `none`, status code), all sanitized.
type Key = (String, String, String);

#[derive(Debug)]
pub struct CredentialErrors {
    /// Exported once the drain loop subscribes (transport subscribe, or auto once it chose to).
    enabled: AtomicBool,
    subscribed: AtomicBool,
    limit: AtomicUsize,
    /// How label sets are shown (set with [`CredentialErrors::enable`]).
    labels: OnceLock<LabelOptions>,
    counts: Mutex<BTreeMap<Key, u64>>,
}

impl Default for CredentialErrors {
    fn default() -> Self {
        CredentialErrors {
            enabled: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            limit: AtomicUsize::new(DEFAULT_LIMIT),
            labels: OnceLock::new(),
            counts: Mutex::new(BTreeMap::new()),
        }
    }
}

impl CredentialErrors {
    /// Export the family (and the channel's subscription gauge) from now on, with the series
    /// limit of the other families and their label options.
    pub fn enable(&self, series_limit: usize, labels: &LabelOptions) {
        if self.enabled.load(Ordering::Relaxed) {
            return;
        }
        self.limit.store(series_limit.max(1), Ordering::Relaxed);
        let _ = self.labels.set(labels.clone());
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn set_subscribed(&self, subscribed: bool) {
        self.subscribed.store(subscribed, Ordering::Relaxed);
    }

    /// Whether the errors channel is subscribed now.
    pub fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// The series limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Key, u64>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count one failed attempt. Past the series limit a new label set is counted in the
    /// `__other__` series; returns `true` then (the caller counts the overflow).
    pub fn record(
        &self,
        provider: Option<&str>,
        auth_index: Option<&str>,
        status: Option<u16>,
    ) -> bool {
        let status = status
            .filter(|s| (100..=599).contains(s))
            .unwrap_or(UNKNOWN_STATUS);
        let key = (
            provider.map_or("unknown".into(), |p| sanitize(p).into_owned()),
            auth_index.map_or("none".into(), |c| sanitize(c).into_owned()),
            status.to_string(),
        );
        let limit = self.limit.load(Ordering::Relaxed);
        let mut counts = self.lock();
        if let Some(n) = counts.get_mut(&key) {
            *n += 1;
            return false;
        }
        let other = || {
            (
                OVERFLOW_VALUE.to_owned(),
                OVERFLOW_VALUE.to_owned(),
                OVERFLOW_VALUE.to_owned(),
            )
        };
        // The `__other__` series takes the last slot, so the family never passes the limit.
        let has_other = counts.contains_key(&other());
        let full = counts.len() + usize::from(!has_other) >= limit;
        if full {
            *counts.entry(other()).or_insert(0) += 1;
            return true;
        }
        counts.insert(key, 1);
        false
    }

    /// The exported series, with display names and dropped labels applied.
    pub fn encode(&self, w: &mut Writer) {
        let Some(opts) = self
            .labels
            .get()
            .filter(|_| self.enabled.load(Ordering::Relaxed))
        else {
            return;
        };
        w.declare(&ERRORS_SUBSCRIBED);
        w.gauge(ERRORS_SUBSCRIBED.name, &[], i64::from(self.subscribed()));
        let shown = self.shown(opts);
        w.declare(&CREDENTIAL_ERRORS);
        let mut labels: Vec<(&str, &str)> = Vec::with_capacity(3);
        for (values, n) in &shown {
            labels.clear();
            labels.extend(values.iter().map(|(k, v)| (*k, v.as_str())));
            w.counter(CREDENTIAL_ERRORS.name, &labels, *n);
        }
    }

    fn shown(&self, opts: &LabelOptions) -> BTreeMap<Vec<(&'static str, String)>, u64> {
        let mut shown: BTreeMap<Vec<(&'static str, String)>, u64> = BTreeMap::new();
        for ((provider, credential, status), n) in self.lock().iter() {
            let credential = if credential == OVERFLOW_VALUE {
                credential.clone()
            } else {
                credential_label(credential, opts)
            };
            let labels = [
                (PROVIDER, provider.clone()),
                (CREDENTIAL, credential),
                (STATUS_CODE, status.clone()),
            ]
            .into_iter()
            .filter(|(name, _)| !opts.drop.contains(name))
            .collect();
            *shown.entry(labels).or_insert(0) += n;
        }
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::text::Format;

    fn scrape(errors: &CredentialErrors) -> String {
        let mut out = Vec::new();
        errors.encode(&mut Writer {
            out: &mut out,
            format: Format::Text004,
        });
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn nothing_is_exported_unless_the_channel_is_set_up() {
        let errors = CredentialErrors::default();
        errors.record(Some("codex"), Some("aa11"), Some(429));
        assert_eq!(scrape(&errors), "");
    }

    #[test]
    fn errors_count_per_provider_credential_and_status() {
        let mut opts = LabelOptions::default();
        opts.credential_names
            .insert("bb22".to_owned(), "team-b".to_owned());
        let errors = CredentialErrors::default();
        errors.enable(100, &opts);
        errors.set_subscribed(true);
        errors.record(Some("codex"), Some("aa11"), Some(429));
        errors.record(Some("codex"), Some("aa11"), Some(429));
        errors.record(Some("codex"), Some("bb22"), None);
        errors.record(None, None, Some(42));
        let text = scrape(&errors);
        for line in [
            "cpa_exporter_errors_subscribed 1",
            r#"cpa_credential_errors_total{provider="codex",credential="aa11",status_code="429"} 2"#,
            r#"cpa_credential_errors_total{provider="codex",credential="team-b",status_code="500"} 1"#,
            r#"cpa_credential_errors_total{provider="unknown",credential="none",status_code="500"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn past_the_limit_new_label_sets_fold_into_other() {
        let errors = CredentialErrors::default();
        errors.enable(3, &LabelOptions::default());
        assert!(!errors.record(Some("codex"), Some("a"), Some(429)));
        assert!(!errors.record(Some("codex"), Some("b"), Some(429)));
        assert!(errors.record(Some("codex"), Some("c"), Some(429)));
        assert!(errors.record(Some("codex"), Some("d"), Some(500)));
        // Known label sets still count as themselves.
        assert!(!errors.record(Some("codex"), Some("a"), Some(429)));
        let text = scrape(&errors);
        assert!(text.contains(
            r#"cpa_credential_errors_total{provider="__other__",credential="__other__",status_code="__other__"} 2"#
        ), "{text}");
        assert!(
            text.contains(r#"credential="a",status_code="429"} 2"#),
            "{text}"
        );
        assert_eq!(text.matches("cpa_credential_errors_total{").count(), 3);
    }

    #[test]
    fn a_dropped_credential_label_sums_the_credentials() {
        let opts = LabelOptions {
            drop: vec![CREDENTIAL],
            ..LabelOptions::default()
        };
        let errors = CredentialErrors::default();
        errors.enable(100, &opts);
        errors.record(Some("codex"), Some("a"), Some(429));
        errors.record(Some("codex"), Some("b"), Some(429));
        let text = scrape(&errors);
        assert!(
            text.contains(r#"cpa_credential_errors_total{provider="codex",status_code="429"} 2"#),
            "{text}"
        );
    }
}
