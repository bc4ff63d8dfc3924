//! `cpa-usage-exporter check`: diagnose a setup before running the exporter, one line per check.
//!
//! Ban safety: the key is tried exactly once (the settings read); when CPA refuses it, nothing
//! else authenticated is attempted. With the key accepted, the consumer check adds three calls
//! (two credentials reads and one pop) and the reconciliation one (the API-key usage), so a
//! full run costs CPA five bcrypt compares. Records the pop takes are committed to the state
//! database, as the exporter would.

use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{Config, Secret};
use crate::cpa::mgmt::{Credential, MgmtClient, MgmtError, UsageSettings, MAX_MGMT_BODY_BYTES};
use crate::cpa::{AuthCause, ClientOptions, HttpClient, PopError};
use crate::ingest::Batch;
use crate::metrics::reconcile::{attempts_by_credential, cpa_counts};
use crate::store::{State, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
            Level::Skip => "skip",
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub check: &'static str,
    pub detail: String,
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<4}  {:<12} {}",
            self.level.as_str(),
            self.check,
            self.detail
        )?;
        if let Some(fix) = &self.fix {
            write!(f, " -- fix: {fix}")?;
        }
        Ok(())
    }
}

fn finding(level: Level, check: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        level,
        check,
        detail: detail.into(),
        fix: None,
    }
}

fn failed(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        fix: Some(fix.into()),
        ..finding(Level::Fail, check, detail)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// How long to watch CPA's attempt counters for another consumer; zero skips that check.
    pub consumer_window: Duration,
}

/// Run every check, printing each line as it is known; returns the exit code (failure when any
/// check failed).
pub async fn run_cli(config: &Config, opts: CheckOptions) -> ExitCode {
    let mut out = std::io::stdout();
    let findings = run(config, opts, &mut out).await;
    if findings.iter().any(|f| f.level == Level::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Run every check, writing one line per check to `out`.
pub async fn run(config: &Config, opts: CheckOptions, out: &mut dyn Write) -> Vec<Finding> {
    let mut checker = Checker {
        out,
        findings: Vec::new(),
        authenticated: 0,
    };
    checker.all(config, opts).await;
    let n = checker.authenticated;
    let _ = writeln!(
        checker.out,
        "made {n} authenticated request{} to CPA (one bcrypt compare each; CPA bans an IP after 5 refused keys)",
        if n == 1 { "" } else { "s" }
    );
    checker.findings
}

struct Checker<'o> {
    out: &'o mut dyn Write,
    findings: Vec<Finding>,
    authenticated: u32,
}

/// Checks that need CPA and the key, skipped with one reason when an earlier check failed.
const CPA_CHECKS: [&str; 7] = [
    "version",
    "routes",
    "key",
    "statistics",
    "retention",
    "consumers",
    "reconcile",
];

impl Checker<'_> {
    fn say(&mut self, f: Finding) {
        let _ = writeln!(self.out, "{f}");
        self.findings.push(f);
    }

    fn skip_rest(&mut self, from: &str, why: &str) {
        let start = CPA_CHECKS.iter().position(|c| *c == from).unwrap_or(0);
        for check in &CPA_CHECKS[start..] {
            if !self.findings.iter().any(|f| f.check == *check) {
                self.say(finding(Level::Skip, check, why));
            }
        }
    }

    async fn all(&mut self, config: &Config, opts: CheckOptions) {
        let store = self.database(config);
        let key = self.key_present(config);
        let client_opts = |key: Secret, max_body_bytes| ClientOptions {
            base_url: config.cpa_url.clone(),
            key,
            api_version: config.api_version,
            timeout: config.http_timeout,
            max_body_bytes,
            proxy: config.cpa_proxy.clone(),
        };
        // /healthz needs no key; without one the client sends an empty bearer there.
        let any_key = key.clone().unwrap_or_else(|| Secret::new(""));
        let mut mgmt = match MgmtClient::new(client_opts(any_key, MAX_MGMT_BODY_BYTES)) {
            Ok(c) => c,
            Err(e) => {
                let fix = "check the CPA URL and the TLS setup";
                return self.say(failed(
                    "cpa",
                    format!("cannot build the HTTP client: {e}"),
                    fix,
                ));
            }
        };
        if !self.reachable(config, &mgmt).await {
            return self.skip_rest("version", "CPA is not reachable");
        }
        let Some(key) = key else {
            return self.skip_rest("version", "needs the management key");
        };
        let Some(settings) = self.settings(config, &mut mgmt).await else {
            return;
        };
        self.statistics(settings);
        self.retention(config, settings);
        if settings.statistics_enabled == Some(false) {
            return self.skip_rest(
                "consumers",
                "statistics are off, so nothing is queued to compare",
            );
        }
        let Some((mut store, mut state)) = store else {
            let why = "the state database cannot be opened, so no records are popped";
            return self.skip_rest("consumers", why);
        };
        let window = opts.consumer_window.min(settings.retention / 2);
        let mut listing = None;
        if window.is_zero() {
            self.say(finding(
                Level::Skip,
                "consumers",
                "turned off (--consumer-window 0s)",
            ));
        } else {
            match HttpClient::new(client_opts(key, config.max_response_bytes)) {
                Ok(pop) => {
                    listing = self
                        .consumers(config, &mut mgmt, pop, (&mut store, &mut state), window)
                        .await;
                }
                Err(e) => self.say(finding(
                    Level::Skip,
                    "consumers",
                    format!("no HTTP client: {e}"),
                )),
            }
        }
        self.reconcile(&mut mgmt, &state, listing).await;
    }

    /// CPA's attempt counts per credential since it started against what the state database
    /// ever counted for them: CPA counting more means records that never reached it.
    async fn reconcile(
        &mut self,
        mgmt: &mut MgmtClient,
        state: &State,
        listing: Option<Vec<Credential>>,
    ) {
        let listing = match listing {
            Some(l) => l,
            None => {
                self.authenticated += 1;
                match mgmt.credentials().await {
                    Ok(l) => l,
                    Err(e) => {
                        let why = format!("cannot read CPA's credentials listing: {e}");
                        return self.say(finding(Level::Skip, "reconcile", why));
                    }
                }
            }
        };
        self.authenticated += 1;
        let keys = match mgmt.api_key_usage().await {
            Ok(keys) => keys,
            Err(MgmtError::RouteNotFound { .. }) => Vec::new(),
            Err(e) => {
                let why = format!("cannot read CPA's API-key usage: {e}");
                return self.say(finding(Level::Skip, "reconcile", why));
            }
        };
        let ours = attempts_by_credential(state);
        let counts = cpa_counts(&listing, &keys, &ours);
        let (mut cpa_total, mut missing, mut short) = (0u64, 0u64, 0usize);
        let joined: Vec<_> = counts.iter().filter(|c| c.joined).collect();
        for c in &joined {
            let ours = ours.get(&c.credential).copied().unwrap_or(0);
            cpa_total += c.attempts();
            if c.attempts() > ours {
                missing += c.attempts() - ours;
                short += 1;
            }
        }
        let unjoined = counts.len() - joined.len();
        let detail = format!(
            "CPA counted {cpa_total} attempts on {} credentials since it started{}",
            joined.len(),
            if unjoined > 0 {
                format!(" ({unjoined} API keys without records here not compared)")
            } else {
                String::new()
            }
        );
        // Records the exporter could not decode have no credential here, yet CPA counted them.
        let invalid = invalid_records(state);
        let f = if missing == 0 {
            finding(
                Level::Ok,
                "reconcile",
                format!("{detail}: the state database counted at least as many for each"),
            )
        } else if missing <= invalid {
            finding(
                Level::Ok,
                "reconcile",
                format!("{detail}: {missing} of them are not in the state database as usage, no more than the {invalid} invalid records it counted"),
            )
        } else {
            Finding {
                fix: Some("if another collector pops CPA's queue, run this exporter with --transport subscribe or stop the other one; records still queued count here too (run the exporter and compare cpa_exporter_unaccounted_records)".to_owned()),
                ..finding(
                    Level::Warn,
                    "reconcile",
                    format!("{detail}: {missing} of them on {short} credentials never reached the state database (popped by another consumer, expired in the queue, or still queued)"),
                )
            }
        };
        self.say(f);
    }

    fn key_present(&mut self, config: &Config) -> Option<Secret> {
        if config.management_key.is_none() {
            self.say(failed(
                "key",
                "no management key is configured",
                "set CPA_MANAGEMENT_KEY_FILE / --management-key-file (or CPA_MANAGEMENT_KEY)",
            ));
        }
        config.management_key.clone()
    }

    /// Open the store and commit an empty transaction: proves the file is writable.
    fn database(&mut self, config: &Config) -> Option<(Store, State)> {
        let path = config.db.display().to_string();
        let fix = "point --db / CPA_EXPORTER_DB at a writable file on a persistent volume";
        // Opened as the exporter opens it (budgets and their spend too), so what `check` pops
        // is committed as the drain loop would.
        let (mut store, state) = match crate::app::open_store(config) {
            Ok(opened) => opened,
            Err(e) => {
                // Beside a running exporter: `check` commits what it pops, so it must not run.
                let fix = match e {
                    crate::store::StoreError::InUse { .. } => "stop the exporter using this database first (check commits what it pops), or point --db / CPA_EXPORTER_DB at another file",
                    _ => fix,
                };
                self.say(failed("database", format!("{path}: {e}"), fix));
                return None;
            }
        };
        let mut plan = store.plan(&state, &Batch::default());
        let now = store.now() as i64;
        if let Err(e) = store.commit(&mut plan, now) {
            self.say(failed(
                "database",
                format!("{path} is not writable: {e}"),
                fix,
            ));
            return None;
        }
        let series = state.total_series();
        let detail = format!("{path} opens and takes writes ({series} stored series)");
        self.say(finding(Level::Ok, "database", detail));
        Some((store, state))
    }

    async fn reachable(&mut self, config: &Config, mgmt: &MgmtClient) -> bool {
        let url = &config.cpa_url;
        match mgmt.healthz().await {
            Ok(true) => {
                self.say(finding(Level::Ok, "cpa", format!("{url} answers /healthz")));
                true
            }
            Ok(false) => {
                let detail = format!("{url} answers, but has no /healthz (CPA before v6.9.10?)");
                self.say(finding(Level::Warn, "cpa", detail));
                true
            }
            Err(e) => {
                let fix =
                    "check --cpa-url / CPA_URL and that CPA is running and reachable from here";
                self.say(failed("cpa", format!("{url}: {e}"), fix));
                false
            }
        }
    }

    /// The one authenticated attempt that proves the key; its answer also gives the version,
    /// the route family and the settings.
    async fn settings(&mut self, config: &Config, mgmt: &mut MgmtClient) -> Option<UsageSettings> {
        self.authenticated += 1;
        let result = mgmt.usage_settings().await;
        self.version(mgmt);
        self.routes(config, mgmt, &result);
        match result {
            Ok(settings) => {
                self.say(finding(Level::Ok, "key", "CPA accepted the management key"));
                Some(settings)
            }
            Err(e) => {
                self.say(key_failure(&e));
                self.skip_rest("statistics", "needs the settings read to succeed");
                None
            }
        }
    }

    fn version(&mut self, mgmt: &MgmtClient) {
        let id = mgmt.identity();
        match &id.version {
            Some(v) => {
                let commit = id.commit.as_deref().unwrap_or("unknown");
                self.say(finding(
                    Level::Ok,
                    "version",
                    format!("CPA {v} (commit {commit})"),
                ));
            }
            None => self.say(finding(
                Level::Warn,
                "version",
                "CPA sent no X-CPA-VERSION header (not CPA, or a build before management headers)",
            )),
        }
    }

    fn routes(
        &mut self,
        config: &Config,
        mgmt: &MgmtClient,
        result: &Result<UsageSettings, MgmtError>,
    ) {
        let f = match (mgmt.route(), result) {
            (Some(route), _) => {
                let family = match route.name() {
                    "v8" => "v8 (/v8/management/...)",
                    _ => "v0 (/v0/management/..., CPA before v8)",
                };
                finding(
                    Level::Ok,
                    "routes",
                    format!("management routes answer on {family}"),
                )
            }
            (None, Err(e @ MgmtError::RouteNotFound { .. })) => {
                let fix = match config.api_version {
                    crate::cpa::ApiVersion::Auto => {
                        "upgrade CPA (the queue needs v6.10.8 or newer)"
                    }
                    _ => "set --api-version auto",
                };
                failed("routes", e.to_string(), fix)
            }
            (None, _) => finding(Level::Skip, "routes", "no management route answered"),
        };
        self.say(f);
    }

    fn statistics(&mut self, settings: UsageSettings) {
        let f = match settings.statistics_enabled {
            Some(true) => finding(Level::Ok, "statistics", "usage-statistics-enabled is on"),
            Some(false) => failed(
                "statistics",
                "usage-statistics-enabled is off: CPA publishes no usage",
                "set usage-statistics-enabled: true in CPA's config (v8: observability.usage.usage-statistics-enabled)",
            ),
            None => finding(
                Level::Warn,
                "statistics",
                "CPA's config does not say whether usage statistics are on",
            ),
        };
        self.say(f);
    }

    fn retention(&mut self, config: &Config, settings: UsageSettings) {
        let idle = config.idle_interval(config.transport.is_resp());
        let retention = settings.retention;
        let detail = format!(
            "CPA keeps queued records {}, the idle poll interval is {}",
            humantime::format_duration(retention),
            humantime::format_duration(idle)
        );
        let fix = "raise redis-usage-queue-retention-seconds in CPA or lower --poll-interval";
        let f = if idle >= retention {
            failed(
                "retention",
                format!("{detail}: records expire before they are popped"),
                fix,
            )
        } else if idle.saturating_mul(4) > retention {
            Finding {
                fix: Some(fix.to_owned()),
                ..finding(
                    Level::Warn,
                    "retention",
                    format!("{detail}: less than a 4x margin"),
                )
            }
        } else {
            finding(Level::Ok, "retention", detail)
        };
        self.say(f);
    }

    /// Compare how many attempts CPA counted on its credentials over `window` with how many
    /// records the queue holds afterwards: a queue far emptier than the count says someone else
    /// pops it.
    async fn consumers(
        &mut self,
        config: &Config,
        mgmt: &mut MgmtClient,
        mut pop: HttpClient,
        (store, state): (&mut Store, &mut State),
        window: Duration,
    ) -> Option<Vec<Credential>> {
        self.authenticated += 1;
        let before = match mgmt.credentials().await {
            Ok(list) => attempts(&list),
            Err(e) => {
                let why = format!("cannot read CPA's credentials listing: {e}");
                self.say(finding(Level::Skip, "consumers", why));
                return None;
            }
        };
        tokio::time::sleep(window).await;
        self.authenticated += 1;
        let listing = match mgmt.credentials().await {
            Ok(list) => list,
            Err(e) => {
                let why = format!("cannot read CPA's credentials listing: {e}");
                self.say(finding(Level::Skip, "consumers", why));
                return None;
            }
        };
        let after = attempts(&listing);
        let Some(counted) = after.checked_sub(before).filter(|n| *n > 0) else {
            let why = format!(
                "CPA counted no upstream attempts in {}: cannot tell",
                humantime::format_duration(window)
            );
            self.say(finding(Level::Skip, "consumers", why));
            return Some(listing);
        };
        self.authenticated += 1;
        // Priced as the drain loop prices them: --prices-file and model-aliases apply.
        let pricing = match crate::app::load_pricing(config) {
            Ok(p) => p,
            Err(e) => {
                let why =
                    format!("the price table cannot be loaded, so no records are popped: {e}");
                self.say(finding(Level::Skip, "consumers", why));
                return Some(listing);
            }
        };
        let popped = pop_and_commit(&mut pop, config.batch_size, &pricing, store, state).await;
        let queued = match popped {
            Ok(n) => n,
            Err(e) => {
                let why = format!("the pop failed: {e}");
                self.say(finding(Level::Skip, "consumers", why));
                return Some(listing);
            }
        };
        let detail = format!(
            "CPA counted {counted} attempts in {}, the queue then held {queued} records (committed to the state database)",
            humantime::format_duration(window)
        );
        let f = if (queued as u64).saturating_mul(2) < counted {
            Finding {
                fix: Some("run one consumer per CPA: stop the other exporter, CPA-Manager's usage collector or any script popping the queue (if this exporter is already running, it is that consumer: stop it before `check`)".to_owned()),
                ..finding(Level::Warn, "consumers", format!("{detail}: another consumer apparently drains the queue"))
            }
        } else {
            finding(
                Level::Ok,
                "consumers",
                format!("{detail}: no other consumer seen"),
            )
        };
        self.say(f);
        Some(listing)
    }
}

/// The line for a failed settings read: the key, management switched off, or CPA's answer.
fn key_failure(e: &MgmtError) -> Finding {
    match e {
        // The cause's text says what to do.
        MgmtError::Http(PopError::Auth(cause)) => auth_failure(cause),
        MgmtError::Http(PopError::ManagementDisabled) => failed(
            "key",
            "CPA's management API is disabled (HTTP 404 with an empty body)",
            "set remote-management.secret-key in CPA's config",
        ),
        _ => failed(
            "key",
            format!("the settings read failed, so the key is unproven: {e}"),
            "fix the error above, then run check again",
        ),
    }
}

/// A refused key, said with the fix for its cause.
fn auth_failure(cause: &AuthCause) -> Finding {
    let (detail, fix) = match cause {
        AuthCause::WrongKey => (
            "CPA rejected the management key (wrong key)".to_owned(),
            "compare CPA_MANAGEMENT_KEY / --management-key-file with CPA's remote-management.secret-key",
        ),
        AuthCause::MissingKey => (
            "CPA received no management key".to_owned(),
            "set CPA_MANAGEMENT_KEY_FILE / --management-key-file",
        ),
        AuthCause::RemoteManagementDisabled => (
            "CPA refuses remote management".to_owned(),
            "set remote-management.allow-remote: true in CPA's config, or run the exporter on CPA's host or in its network namespace",
        ),
        AuthCause::IpBanned { .. } => (
            cause.to_string(),
            "fix the key, then wait for the ban to end (it also locks the admin UI out on this IP)",
        ),
        AuthCause::Other(_) => (
            cause.to_string(),
            "check that CPA_URL points at CPA itself, not a proxy in front of it",
        ),
    };
    failed("key", detail, fix)
}

/// Queue elements the state database counted as invalid (`cpa_exporter_records_total`).
fn invalid_records(state: &State) -> u64 {
    use crate::families::{outcome, Family};
    state.families[Family::Records as usize]
        .iter()
        .filter(|(labels, _)| labels.first().is_some_and(|o| &**o == outcome::INVALID))
        .map(|(_, stored)| match stored.value {
            crate::series::Value::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

/// Attempts CPA counted on listed credentials since it started.
fn attempts(list: &[Credential]) -> u64 {
    list.iter().map(|c| c.success + c.failed).sum()
}

#[derive(Debug, thiserror::Error)]
enum PopCommitError {
    #[error(transparent)]
    Pop(#[from] PopError),
    #[error("cannot commit the popped records (they are lost): {0}")]
    Store(#[from] crate::store::StoreError),
}

/// One pop, committed like the drain loop would; returns the number of elements it held.
async fn pop_and_commit(
    client: &mut HttpClient,
    count: usize,
    pricing: &crate::pricing::Pricing,
    store: &mut Store,
    state: &mut State,
) -> Result<usize, PopCommitError> {
    let (batch, popped) = crate::pipeline::drain::pop_batch(client, count, store, pricing).await;
    // What arrived is committed even when the pop failed part way: CPA removed those records.
    if batch.elements > 0 {
        let now = store.now() as i64;
        let wall = crate::time::unix_now() as i64;
        let mut plan = store.plan_batch_at(state, &batch, now, wall);
        store.commit(&mut plan, now)?;
        store.apply(state, plan);
    }
    popped?;
    Ok(batch.elements)
}
