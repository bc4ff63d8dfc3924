//! CPA's own state as gauges: its build, its usage settings, its credentials and its attempt
//! counts beside the exporter's. Rendered from a snapshot ([`CpaView`]) that the
//! settings/credentials poller and the drain loop update.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use super::sink::Sink;
use super::text::{gauge, Meta, Writer};
use crate::cpa::mgmt::{mask_keys, Credential, LeftOut, Status, UsageSettings};
use crate::ingest::cred_errors::CredentialState;
use crate::labels::sanitize;
use crate::metrics::reconcile::Reconciled;
use crate::metrics::LabelOptions;

use crate::families::meta::cpa::{
    CPA_INFO, CREDENTIAL_DISABLED, CREDENTIAL_INFO, CREDENTIAL_NEXT_RETRY, CREDENTIAL_STATUS,
    CREDENTIAL_UNAVAILABLE, QUEUE_RETENTION, STATISTICS_ENABLED, SUBSCRIPTION_END,
};
use crate::families::meta::errors::QUOTA_RECOVER;
use crate::families::meta::reconcile::{CREDENTIAL_ATTEMPTS, UNACCOUNTED};

/// The credential families, capped together at `series-limit` credentials: a listing is cut to
/// its first `series-limit` distinct credentials when read (see
/// [`crate::cpa::mgmt::decode_listing`]), so each family has at most one series per credential
/// (`cpa_credential_status`: one per state and credential).
const CAPPED: [Meta; 6] = [
    CREDENTIAL_INFO,
    CREDENTIAL_STATUS,
    CREDENTIAL_UNAVAILABLE,
    CREDENTIAL_DISABLED,
    CREDENTIAL_NEXT_RETRY,
    SUBSCRIPTION_END,
];

/// A family's `family` label in `cpa_exporter_series_overflow_total`: its name without `cpa_`.
fn family_id(meta: &Meta) -> &'static str {
    meta.name.strip_prefix("cpa_").unwrap_or(meta.name)
}

/// The `family` labels of the capped credential families.
pub fn capped_families() -> impl Iterator<Item = &'static str> {
    CAPPED.iter().map(family_id)
}

/// The credentials a read left out, per family: the series they would have had there.
pub fn left_out_by_family(left: &LeftOut) -> impl Iterator<Item = (&'static str, u64)> {
    let n = left.credentials;
    let per = [n, n, n, n, left.next_retry, left.subscription];
    capped_families().zip(per)
}

/// What is known about CPA right now. Each part is absent until first read.
#[derive(Debug, Default)]
pub struct CpaView {
    /// (version, commit) from the `X-CPA-*` headers.
    identity: Option<(String, String)>,
    settings: Option<UsageSettings>,
    /// Shared with the scrapes rendering it (see [`CpaView::snapshot`]).
    credentials: Option<Arc<Vec<Credential>>>,
    /// From the errors channel: `auth_index` -> when its exceeded quota is expected back.
    quota_recover: BTreeMap<String, f64>,
    /// CPA's attempt counts per credential, compared with the exporter's.
    reconciled: Option<Arc<Vec<Reconciled>>>,
}

/// What a scrape renders, taken under the view's lock at once and rendered without it: the
/// lock is never held while a chunk waits on the network.
pub struct Snapshot {
    identity: Option<(String, String)>,
    settings: Option<UsageSettings>,
    credentials: Option<Arc<Vec<Credential>>>,
    quota_recover: BTreeMap<String, f64>,
    reconciled: Option<Arc<Vec<Reconciled>>>,
}

impl CpaView {
    /// Record CPA's build; a response without `X-CPA-VERSION` changes nothing.
    pub fn set_identity(&mut self, version: Option<&str>, commit: Option<&str>) {
        if let Some(version) = version {
            self.identity = Some((
                sanitize(version).into_owned(),
                sanitize(commit.unwrap_or("unknown")).into_owned(),
            ));
        }
    }

    pub fn set_settings(&mut self, settings: UsageSettings) {
        self.settings = Some(settings);
    }

    /// Replace the listing: credentials no longer listed disappear from the next scrape.
    pub fn set_credentials(&mut self, credentials: Vec<Credential>) {
        self.credentials = Some(Arc::new(credentials));
        self.forget_recovered_quotas();
    }

    /// Replace the comparison with CPA's counts (credentials no longer counted disappear).
    pub fn set_reconciled(&mut self, reconciled: Vec<Reconciled>) {
        self.reconciled = Some(Arc::new(reconciled));
    }

    /// The parts a scrape renders; the listing and the comparison are shared, not copied.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            identity: self.identity.clone(),
            settings: self.settings,
            credentials: self.credentials.clone(),
            quota_recover: self.quota_recover.clone(),
            reconciled: self.reconciled.clone(),
        }
    }

    pub fn settings(&self) -> Option<UsageSettings> {
        self.settings
    }
}

/// CPA's build, settings and credentials, as far as known, shipped a chunk at a time (a
/// listing at `series-limit` is megabytes of text).
pub fn render(sink: &mut Sink, view: &Snapshot, opts: &LabelOptions) -> io::Result<()> {
    {
        let w = &mut sink.writer();
        if let Some((version, commit)) = &view.identity {
            w.declare(&CPA_INFO);
            let labels = [("version", version.as_str()), ("commit", commit.as_str())];
            w.gauge(CPA_INFO.name, &labels, 1i64);
        }
        if let Some(settings) = &view.settings {
            encode_settings(w, settings);
        }
    }
    if let Some(credentials) = &view.credentials {
        let shown = shown(credentials, opts);
        encode_credentials(sink, &shown)?;
        encode_quota_recover(sink, view, &shown)?;
    }
    if let Some(reconciled) = &view.reconciled {
        encode_reconciled(sink, reconciled, opts)?;
    }
    Ok(())
}

/// Write `line` for every item, shipping full chunks in between.
fn each<T>(
    sink: &mut Sink,
    items: &[T],
    mut line: impl FnMut(&mut Writer<'_>, &T),
) -> io::Result<()> {
    for item in items {
        line(&mut sink.writer(), item);
        sink.ship_if_full()?;
    }
    Ok(())
}

/// CPA's counts by outcome, and the unaccounted records of the credentials that join.
fn encode_reconciled(
    sink: &mut Sink,
    reconciled: &[Reconciled],
    opts: &LabelOptions,
) -> io::Result<()> {
    let shown: Vec<(String, String, &Reconciled)> = reconciled
        .iter()
        .map(|r| {
            let provider = if r.cpa.provider.is_empty() {
                "unknown".to_owned()
            } else {
                sanitize(&r.cpa.provider).into_owned()
            };
            (credential_label(&r.cpa.credential, opts), provider, r)
        })
        .collect();
    sink.writer().declare(&CREDENTIAL_ATTEMPTS);
    each(sink, &shown, |w, (credential, provider, r)| {
        for (outcome, n) in [("success", r.cpa.success), ("failed", r.cpa.failed)] {
            let labels = [
                ("credential", credential.as_str()),
                ("provider", provider.as_str()),
                ("outcome", outcome),
            ];
            w.counter(CREDENTIAL_ATTEMPTS.name, &labels, n);
        }
    })?;
    sink.writer().declare(&UNACCOUNTED);
    each(sink, &shown, |w, (credential, provider, r)| {
        if let Some(n) = r.unaccounted {
            let labels = [
                ("credential", credential.as_str()),
                ("provider", provider.as_str()),
            ];
            w.gauge(UNACCOUNTED.name, &labels, n);
        }
    })
}

fn encode_settings(w: &mut Writer, settings: &UsageSettings) {
    if let Some(enabled) = settings.statistics_enabled {
        gauge(w, &STATISTICS_ENABLED, if enabled { 1.0 } else { 0.0 });
    }
    gauge(w, &QUEUE_RETENTION, settings.retention.as_secs_f64());
}

/// One credential's label values, as shown.
struct Shown<'a> {
    credential: String,
    provider: String,
    name: String,
    c: &'a Credential,
}

/// Label values of every credential, unique by (credential, provider): the first entry wins if
/// two auth indexes are given the same display name.
fn shown<'a>(credentials: &'a [Credential], opts: &LabelOptions) -> Vec<Shown<'a>> {
    let mut out: BTreeMap<(String, String), Shown<'a>> = BTreeMap::new();
    for c in credentials {
        let credential = credential_label(&c.auth_index, opts);
        let provider = if c.provider.is_empty() {
            "unknown".to_owned()
        } else {
            sanitize(&c.provider).into_owned()
        };
        // Unmasking shows e-mails, never a key pasted into a label.
        let name = if opts.unmask_credential_names {
            mask_keys(&c.name.raw)
        } else {
            c.name.masked.clone()
        };
        out.entry((credential.clone(), provider.clone()))
            .or_insert(Shown {
                credential,
                provider,
                name: sanitize(&name).into_owned(),
                c,
            });
    }
    out.into_values().collect()
}

/// `auth_index`, or its configured display name.
pub fn credential_label(auth_index: &str, opts: &LabelOptions) -> String {
    let index = sanitize(auth_index);
    match opts.credential_names.get(index.as_ref()) {
        Some(name) => name.clone(),
        None => index.into_owned(),
    }
}

fn encode_credentials(sink: &mut Sink, shown: &[Shown<'_>]) -> io::Result<()> {
    sink.writer().declare(&CREDENTIAL_INFO);
    each(sink, shown, |w, s| {
        let labels = [
            ("credential", s.credential.as_str()),
            ("provider", s.provider.as_str()),
            ("name", s.name.as_str()),
        ];
        w.gauge(CREDENTIAL_INFO.name, &labels, 1i64);
    })?;
    sink.writer().declare(&CREDENTIAL_STATUS);
    each(sink, shown, |w, s| {
        for status in Status::ALL {
            let labels = [
                ("credential", s.credential.as_str()),
                ("provider", s.provider.as_str()),
                ("status", status.as_str()),
            ];
            w.gauge(
                CREDENTIAL_STATUS.name,
                &labels,
                i64::from(s.c.status == status),
            );
        }
    })?;
    encode_flag(sink, shown, &CREDENTIAL_UNAVAILABLE, |c| c.unavailable)?;
    encode_flag(sink, shown, &CREDENTIAL_DISABLED, |c| c.disabled)?;
    sink.writer().declare(&CREDENTIAL_NEXT_RETRY);
    each(sink, shown, |w, s| {
        if let Some(t) = s.c.next_retry_after {
            let labels = [
                ("credential", s.credential.as_str()),
                ("provider", s.provider.as_str()),
            ];
            w.gauge(CREDENTIAL_NEXT_RETRY.name, &labels, t);
        }
    })?;
    encode_subscriptions(sink, shown)
}

/// Only credentials whose listing entry carries a subscription end (codex `id_token`).
fn encode_subscriptions(sink: &mut Sink, shown: &[Shown<'_>]) -> io::Result<()> {
    sink.writer().declare(&SUBSCRIPTION_END);
    each(sink, shown, |w, s| {
        if let Some(sub) = &s.c.subscription {
            let plan = if sub.plan_type.is_empty() {
                "unknown".to_owned()
            } else {
                sanitize(&sub.plan_type).into_owned()
            };
            let labels = [
                ("credential", s.credential.as_str()),
                ("provider", s.provider.as_str()),
                ("plan_type", plan.as_str()),
            ];
            w.gauge(SUBSCRIPTION_END.name, &labels, sub.active_until);
        }
    })
}

fn encode_flag(
    sink: &mut Sink,
    shown: &[Shown<'_>],
    meta: &Meta,
    flag: impl Fn(&Credential) -> bool,
) -> io::Result<()> {
    sink.writer().declare(meta);
    each(sink, shown, |w, s| {
        let labels = [
            ("credential", s.credential.as_str()),
            ("provider", s.provider.as_str()),
        ];
        w.gauge(meta.name, &labels, i64::from(flag(s.c)));
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cpa::mgmt::Name;
    use crate::metrics::text::Format;

    fn credential(index: &str, status: Status) -> Credential {
        Credential {
            auth_index: index.to_owned(),
            provider: "codex".to_owned(),
            name: Name {
                raw: "codex-alice@example.com.json".to_owned(),
                masked: "codex-a***@example.com.json".to_owned(),
            },
            status,
            disabled: false,
            unavailable: true,
            next_retry_after: Some(1_787_400_000.0),
            success: 1,
            failed: 0,
            subscription: Some(crate::cpa::mgmt::Subscription {
                active_until: 1_798_761_600.0,
                plan_type: "plus".to_owned(),
            }),
        }
    }

    fn scrape(labels: LabelOptions, fill: impl FnOnce(&mut CpaView)) -> String {
        let mut view = CpaView::default();
        fill(&mut view);
        let mut out = Vec::new();
        let mut sink = Sink::new(Format::Text004, &mut out);
        render(&mut sink, &view.snapshot(), &labels).unwrap();
        sink.finish().unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn nothing_is_rendered_until_known() {
        assert_eq!(scrape(LabelOptions::default(), |_| {}), "");
    }

    #[test]
    fn gauges_render_with_masked_names_and_display_names() {
        let mut opts = LabelOptions::default();
        opts.credential_names
            .insert("bb22".to_owned(), "team-b".to_owned());
        let text = scrape(opts, |v| {
            v.set_identity(Some("v8.0.3"), None);
            v.set_settings(UsageSettings {
                statistics_enabled: Some(false),
                retention: Duration::from_secs(60),
            });
            v.set_credentials(vec![
                credential("aa11", Status::Error),
                credential("bb22", Status::Active),
            ]);
        });
        for line in [
            r#"cpa_info{version="v8.0.3",commit="unknown"} 1"#,
            "cpa_usage_statistics_enabled 0",
            "cpa_usage_queue_retention_seconds 60",
            r#"cpa_credential_info{credential="aa11",provider="codex",name="codex-a***@example.com.json"} 1"#,
            r#"cpa_credential_status{credential="aa11",provider="codex",status="error"} 1"#,
            r#"cpa_credential_status{credential="aa11",provider="codex",status="active"} 0"#,
            r#"cpa_credential_status{credential="team-b",provider="codex",status="active"} 1"#,
            r#"cpa_credential_unavailable{credential="team-b",provider="codex"} 1"#,
            r#"cpa_credential_disabled{credential="aa11",provider="codex"} 0"#,
            r#"cpa_credential_next_retry_timestamp_seconds{credential="aa11",provider="codex"} 1787400000"#,
            r#"cpa_credential_subscription_end_timestamp_seconds{credential="team-b",provider="codex",plan_type="plus"} 1798761600"#,
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("alice"));
    }

    #[test]
    fn cpas_counts_render_by_outcome_and_unaccounted_only_where_joined() {
        use crate::metrics::reconcile::{CpaCount, Reconciled};
        let mut opts = LabelOptions::default();
        opts.credential_names
            .insert("bb22".to_owned(), "team-b".to_owned());
        let counted = |credential: &str, provider: &str, unaccounted: Option<u64>| Reconciled {
            cpa: CpaCount {
                credential: credential.to_owned(),
                provider: provider.to_owned(),
                success: 12,
                failed: 3,
                joined: unaccounted.is_some(),
            },
            unaccounted,
        };
        let text = scrape(opts, |v| {
            v.set_reconciled(vec![
                counted("aa11", "codex", Some(0)),
                counted("bb22", "", Some(7)),
                counted("cc33", "fakeup", None),
            ])
        });
        for line in [
            r#"cpa_credential_attempts_total{credential="aa11",provider="codex",outcome="success"} 12"#,
            r#"cpa_credential_attempts_total{credential="aa11",provider="codex",outcome="failed"} 3"#,
            r#"cpa_credential_attempts_total{credential="cc33",provider="fakeup",outcome="success"} 12"#,
            r#"cpa_exporter_unaccounted_records{credential="aa11",provider="codex"} 0"#,
            r#"cpa_exporter_unaccounted_records{credential="team-b",provider="unknown"} 7"#,
            "# TYPE cpa_credential_attempts_total counter",
            "# TYPE cpa_exporter_unaccounted_records gauge",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains(r#"cpa_exporter_unaccounted_records{credential="cc33""#));
    }

    #[test]
    fn a_label_that_looks_like_a_key_is_never_exported() {
        let body = br#"{"files":[
            {"auth_index":"aa11","type":"codex","label":"sk-proj-4fJk29sLqP0aZ8xYt7Wb3nR1"},
            {"auth_index":"bb22","type":"gemini","label":"AIzaSyD3m0Fake-KeyForTests_0123456789ab"},
            {"auth_index":"cc33","type":"claude","label":"prod sk-ant-api03-AbCdEf123456GhIjKl"},
            {"auth_index":"dd44","type":"codex","label":"3f9a1c7e5b2d4a6f8e0c1b3d5f7a9c2e4b6d8f0a"},
            {"auth_index":"ee55","type":"codex","label":"team-pro"},
            {"auth_index":"ff66","type":"gemini","name":"gemini-my-project-123456.json"}
        ]}"#;
        let listed = crate::cpa::mgmt::decode_credentials(body).unwrap();
        for unmask in [false, true] {
            let opts = LabelOptions {
                unmask_credential_names: unmask,
                ..LabelOptions::default()
            };
            let text = scrape(opts, |v| v.set_credentials(listed.clone()));
            for key in ["4fJk29sLqP0a", "AIzaSyD3m0", "AbCdEf123456", "3f9a1c7e5b2d"] {
                assert!(
                    !text.contains(key),
                    "{key} exported (unmask {unmask}):\n{text}"
                );
            }
            for line in [
                r#"cpa_credential_info{credential="aa11",provider="codex",name="***"} 1"#,
                r#"cpa_credential_info{credential="cc33",provider="claude",name="prod ***"} 1"#,
                r#"cpa_credential_info{credential="ee55",provider="codex",name="team-pro"} 1"#,
                r#"cpa_credential_info{credential="ff66",provider="gemini",name="gemini-my-project-123456.json"} 1"#,
            ] {
                assert!(text.contains(line), "{line} missing in\n{text}");
            }
        }
        // Not in a log line either: `Name`'s Debug form is the masked one.
        assert!(!format!("{listed:?}").contains("4fJk29sLqP0a"));
    }

    #[test]
    fn unmasking_is_a_switch() {
        let opts = LabelOptions {
            unmask_credential_names: true,
            ..LabelOptions::default()
        };
        let text = scrape(opts, |v| {
            v.set_credentials(vec![credential("aa11", Status::Active)])
        });
        assert!(
            text.contains(r#"name="codex-alice@example.com.json""#),
            "{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Credential states as CPA's errors channel reports them, between two listing reads
// ---------------------------------------------------------------------------------------------

impl CpaView {
    /// Apply the state an error event carries to the listed credential, so its gauges move as
    /// the failure happens; the next listing read replaces them again. Returns `false` when the
    /// credential is not in the listing (or none was read): nothing is shown for it then.
    pub fn apply_error_state(&mut self, auth_index: &str, state: &CredentialState) -> bool {
        // A scrape rendering the listing right now keeps the copy it has.
        let Some(c) = self
            .credentials
            .as_mut()
            .map(Arc::make_mut)
            .and_then(|list| list.iter_mut().find(|c| c.auth_index == auth_index))
        else {
            return false;
        };
        if let Some(status) = state.status {
            c.status = status;
        }
        if let Some(disabled) = state.disabled {
            c.disabled = disabled;
        }
        if let Some(unavailable) = state.unavailable {
            c.unavailable = unavailable;
            // The time belongs to the state it came with: an available credential has none.
            c.next_retry_after = state.next_retry_after.filter(|_| unavailable);
        }
        match (state.quota_exceeded, state.quota_recover_at) {
            (Some(true), Some(t)) => {
                self.quota_recover.insert(auth_index.to_owned(), t);
            }
            (Some(false), _) => {
                self.quota_recover.remove(auth_index);
            }
            _ => {}
        }
        true
    }

    /// A listing read: credentials gone, or available again, have no exceeded quota.
    fn forget_recovered_quotas(&mut self) {
        if self.quota_recover.is_empty() {
            return;
        }
        let listed: &[Credential] = self.credentials.as_deref().map_or(&[], Vec::as_slice);
        let unavailable: std::collections::HashSet<&str> = listed
            .iter()
            .filter(|c| c.unavailable)
            .map(|c| c.auth_index.as_str())
            .collect();
        self.quota_recover
            .retain(|index, _| unavailable.contains(index.as_str()));
    }
}

/// Only listed credentials whose quota recovery is still ahead: a past time says nothing.
fn encode_quota_recover(sink: &mut Sink, view: &Snapshot, shown: &[Shown<'_>]) -> io::Result<()> {
    sink.writer().declare(&QUOTA_RECOVER);
    if view.quota_recover.is_empty() {
        return Ok(());
    }
    let now = crate::time::unix_now();
    each(sink, shown, |w, s| {
        if let Some(&t) = view
            .quota_recover
            .get(&s.c.auth_index)
            .filter(|t| **t > now)
        {
            let labels = [
                ("credential", s.credential.as_str()),
                ("provider", s.provider.as_str()),
            ];
            w.gauge(QUOTA_RECOVER.name, &labels, t);
        }
    })
}

#[cfg(test)]
mod error_state_tests {
    use super::*;
    use crate::cpa::mgmt::Name;
    use crate::metrics::text::Format;

    fn listed(index: &str) -> Credential {
        Credential {
            auth_index: index.to_owned(),
            provider: "codex".to_owned(),
            name: Name::default(),
            status: Status::Active,
            disabled: false,
            unavailable: false,
            next_retry_after: None,
            success: 0,
            failed: 0,
            subscription: None,
        }
    }

    fn scrape(view: &CpaView) -> String {
        let mut out = Vec::new();
        let mut sink = Sink::new(Format::Text004, &mut out);
        render(&mut sink, &view.snapshot(), &LabelOptions::default()).unwrap();
        sink.finish().unwrap();
        String::from_utf8(out).unwrap()
    }

    fn cooling(until: f64) -> CredentialState {
        CredentialState {
            status: Some(Status::Error),
            disabled: Some(false),
            unavailable: Some(true),
            next_retry_after: Some(until),
            quota_exceeded: Some(true),
            quota_recover_at: Some(until),
        }
    }

    #[test]
    fn an_error_event_moves_the_gauges_until_the_next_listing() {
        // Whole seconds: the writer and `{}` may spell a fraction differently.
        let until = (crate::time::unix_now() + 60.0).floor();
        let mut view = CpaView::default();
        view.set_credentials(vec![listed("aa11")]);
        assert!(view.apply_error_state("aa11", &cooling(until)));
        let text = scrape(&view);
        for line in [
            r#"cpa_credential_status{credential="aa11",provider="codex",status="error"} 1"#
                .to_owned(),
            r#"cpa_credential_unavailable{credential="aa11",provider="codex"} 1"#.to_owned(),
            format!(
                r#"cpa_credential_next_retry_timestamp_seconds{{credential="aa11",provider="codex"}} {until}"#
            ),
            format!(
                r#"cpa_credential_quota_recover_timestamp_seconds{{credential="aa11",provider="codex"}} {until}"#
            ),
        ] {
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        // The listing is the authority again once read.
        view.set_credentials(vec![listed("aa11")]);
        let text = scrape(&view);
        assert!(text.contains(r#"status="active"} 1"#), "{text}");
        assert!(
            text.contains(r#"cpa_credential_unavailable{credential="aa11",provider="codex"} 0"#)
        );
        assert!(
            !text.contains("cpa_credential_quota_recover_timestamp_seconds{"),
            "{text}"
        );
    }

    #[test]
    fn unlisted_credentials_and_past_recoveries_show_nothing() {
        let mut view = CpaView::default();
        assert!(!view.apply_error_state("aa11", &cooling(1.0)));
        view.set_credentials(vec![listed("aa11")]);
        assert!(!view.apply_error_state("zz99", &cooling(1.0)));
        assert!(view.apply_error_state("aa11", &cooling(1.0)));
        let text = scrape(&view);
        assert!(
            !text.contains("cpa_credential_quota_recover_timestamp_seconds{"),
            "{text}"
        );
        assert!(!text.contains("zz99"));
    }
}
