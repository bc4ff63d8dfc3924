//! Slow management reads beside the drain loop: CPA's usage settings every few minutes, and its
//! credentials listing and API-key usage every 30 s (the listing every 5 min while the usage and
//! errors channels both report changes as they happen), compared with the exporter's own counts
//! ([`crate::metrics::reconcile`]) and published through [`crate::metrics::cpa_view::CpaView`].
//!
//! Ban safety: every call here is a bcrypt-checked login on CPA's side, and 5 failed logins ban
//! the IP for 30 minutes. So the poller calls nothing until the drain loop has seen the key
//! accepted, pauses while the drain loop sees it refused, and after a 401/403 of its own waits
//! like the drain loop does (5 min doubling to 1 h, or until a ban lifts).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::cpa::mgmt::{Call, Credential, KeyUsage, LeftOut, MgmtClient, MgmtError, UsageSettings};
use crate::cpa::ClientOptions;
use crate::metrics::cpa_view::left_out_by_family;
use crate::metrics::reconcile::{attempts_by_credential, cpa_counts, Reconciler};
use crate::metrics::Shared;
use crate::pipeline::backoff::{auth_wait, sleep_or_shutdown};

/// After CPA says its credentials changed, the listing is read this much later.
const REFRESH_DEBOUNCE: Duration = Duration::from_secs(2);

/// With both of CPA's channels subscribed, refresh notices and error events report credential
/// changes as they happen: the listing is then read this often only, as a safety net (each read
/// is a bcrypt check in CPA).
pub const SUBSCRIBED_CREDENTIALS_INTERVAL: Duration = Duration::from_secs(300);

/// How often the poller looks again while waiting for the drain loop to vouch for the key.
const KEY_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
pub struct PollerOptions {
    pub settings_interval: Duration,
    /// `None`: the credentials listing is not read.
    pub credentials_interval: Option<Duration>,
    /// The drain loop's idle wait, compared with CPA's queue retention until the drain loop
    /// reports the one of the transport it actually uses.
    pub idle_interval: Duration,
    /// `series-limit`: most credentials of a listing that are kept and exported.
    pub series_limit: usize,
}

/// Start the poller on CPA's management API (`client` carries the URL, key and timeout).
/// Stops when `shutdown` turns true; abort the handle to cancel a read in flight (reads are
/// not destructive).
pub fn spawn(
    client: ClientOptions,
    opts: PollerOptions,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, reqwest::Error> {
    let client = MgmtClient::new(client)?;
    Ok(tokio::spawn(run(client, shared, opts, shutdown)))
}

pub async fn run(
    mut client: MgmtClient,
    shared: Arc<Shared>,
    opts: PollerOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut poller = Poller::new(opts);
    loop {
        if *shutdown.borrow() {
            break;
        }
        let wait = poller.step(&mut client, &shared).await;
        tokio::select! {
            stop = sleep_or_shutdown(wait, &mut shutdown) => if stop {
                break;
            },
            () = shared.live.credentials_changed.notified() => {
                // A burst of changes (auth files rewritten one by one) makes one read.
                tokio::time::sleep(REFRESH_DEBOUNCE).await;
                poller.credentials_due_now();
            }
        }
    }
    debug!("management poller stopped");
}

/// What the warnings were last about, so each is logged once per change.
#[derive(Debug, Default)]
struct Said {
    statistics_enabled: Option<bool>,
    /// (retention, idle interval) the "poll interval too long" warning was given for.
    short_retention: Option<(Duration, Duration)>,
    /// Last failure kind per call (settings, credentials, API-key usage); `None` while it
    /// succeeds.
    failing: [Option<&'static str>; 3],
    credentials_read: bool,
    /// Whether a listing over `series-limit` was warned about.
    credentials_capped: bool,
    /// Unaccounted records last warned about: the next warning waits until they double.
    unaccounted: u64,
}

struct Poller {
    opts: PollerOptions,
    next_settings: Instant,
    next_credentials: Option<Instant>,
    /// The next listing read while both channels are subscribed (see
    /// [`SUBSCRIBED_CREDENTIALS_INTERVAL`]); `next_credentials` still wakes the poller to look.
    next_credentials_subscribed: Instant,
    auth_failures: u32,
    blocked_until: Option<Instant>,
    said: Said,
    reconciler: Reconciler,
    /// When to ask for the API-key usage again after CPA said it has no such route.
    api_keys_missing_until: Option<Instant>,
}

impl Poller {
    fn new(opts: PollerOptions) -> Poller {
        let now = Instant::now();
        Poller {
            opts,
            next_settings: now,
            next_credentials: opts.credentials_interval.map(|_| now),
            next_credentials_subscribed: now,
            auth_failures: 0,
            blocked_until: None,
            said: Said::default(),
            reconciler: Reconciler::default(),
            api_keys_missing_until: None,
        }
    }

    /// Read the credentials listing at the next step (CPA said they changed).
    fn credentials_due_now(&mut self) {
        if self.next_credentials.is_some() {
            self.next_credentials = Some(Instant::now());
            self.next_credentials_subscribed = Instant::now();
        }
    }

    /// Make whatever calls are due; returns how long to sleep before the next step.
    async fn step(&mut self, client: &mut MgmtClient, shared: &Shared) -> Duration {
        if shared.live.key_accepted() != Some(true) {
            return KEY_WAIT;
        }
        if self.is_blocked() {
            return self.until_next();
        }
        if Instant::now() >= self.next_settings {
            self.next_settings = Instant::now() + self.opts.settings_interval;
            let result = client.usage_settings().await;
            publish_identity(client, shared);
            if let Some(settings) = self.settled(Call::Settings, result) {
                shared.observed.get().set_settings(settings);
                let idle = shared.live.idle_interval();
                self.warn_about(settings, idle.unwrap_or(self.opts.idle_interval));
            }
        }
        if let (Some(next), Some(every)) = (self.next_credentials, self.opts.credentials_interval) {
            let slowed =
                channels_subscribed(shared) && Instant::now() < self.next_credentials_subscribed;
            if Instant::now() >= next && slowed {
                // Look again in `every`: the channels may be down by then.
                self.next_credentials = Some(Instant::now() + every);
            } else if Instant::now() >= next && !self.is_blocked() {
                self.next_credentials = Some(Instant::now() + every);
                self.next_credentials_subscribed =
                    Instant::now() + every.max(SUBSCRIBED_CREDENTIALS_INTERVAL);
                let result = client.credentials_within(self.opts.series_limit).await;
                publish_identity(client, shared);
                if let Some(listing) = self.settled(Call::Credentials, result) {
                    let list = listing.credentials;
                    self.note_credentials(list.len(), client);
                    self.note_left_out(&listing.left_out, shared);
                    if let Some(keys) = self.api_key_usage(client, shared).await {
                        self.reconcile(&list, &keys, shared);
                    }
                    shared.observed.get().set_credentials(list);
                }
            }
        }
        self.until_next()
    }

    /// CPA's API-key usage; empty when CPA has no such route (asked again a settings interval
    /// later), `None` when the read failed (the last comparison stays).
    async fn api_key_usage(
        &mut self,
        client: &mut MgmtClient,
        shared: &Shared,
    ) -> Option<Vec<KeyUsage>> {
        if self.is_blocked() {
            return None;
        }
        if self
            .api_keys_missing_until
            .is_some_and(|t| Instant::now() < t)
        {
            return Some(Vec::new());
        }
        let result = client.api_key_usage().await;
        publish_identity(client, shared);
        if let Err(MgmtError::RouteNotFound { .. }) = &result {
            self.api_keys_missing_until = Some(Instant::now() + self.opts.settings_interval);
            if self.said.failing[Call::ApiKeyUsage as usize]
                .replace("route_not_found")
                .is_none()
            {
                info!("CPA has no API-key usage route: only the credentials listing is compared with the exporter's counts");
            }
            return Some(Vec::new());
        }
        self.api_keys_missing_until = None;
        self.settled(Call::ApiKeyUsage, result)
    }

    /// Compare CPA's counts with the exporter's committed ones, read right after CPA's.
    fn reconcile(&mut self, listing: &[Credential], keys: &[KeyUsage], shared: &Shared) {
        let ours = attempts_by_credential(&shared.committed.read());
        let counts = cpa_counts(listing, keys, &ours);
        let reconciled = self.reconciler.observe(counts, &ours);
        let unaccounted: u64 = reconciled.iter().filter_map(|r| r.unaccounted).sum();
        debug!(
            credentials = reconciled.len(),
            unaccounted, "compared with CPA's counts"
        );
        self.say_unaccounted(unaccounted);
        shared.observed.get().set_reconciled(reconciled);
    }

    /// Warn when records go missing, then each time their number doubles (a steady loss logs
    /// a handful of lines, not one per read); say so once when none are missing again.
    fn say_unaccounted(&mut self, unaccounted: u64) {
        let before = self.said.unaccounted;
        if unaccounted == 0 && before > 0 {
            info!("no records are missing against CPA's counts any more (a restart of CPA or the exporter starts the comparison anew)");
        } else if unaccounted <= before.saturating_mul(2) {
            return;
        } else {
            warn!(
                unaccounted,
                "CPA counted attempts whose usage records never reached the exporter: another consumer of CPA's queue (or subscriber) takes them, or they expired; see cpa_exporter_unaccounted_records"
            );
        }
        self.said.unaccounted = unaccounted;
    }

    fn is_blocked(&self) -> bool {
        self.blocked_until.is_some_and(|t| Instant::now() < t)
    }

    fn until_next(&self) -> Duration {
        let mut next = self.next_settings;
        if let Some(c) = self.next_credentials {
            next = next.min(c);
        }
        if let Some(b) = self.blocked_until {
            next = next.max(b);
        }
        next.saturating_duration_since(Instant::now())
    }

    /// Log a failure once per change of its kind (a refused key every time: those are rare and
    /// each one counts towards CPA's ban) and start the auth backoff; pass a success through.
    fn settled<T>(&mut self, call: Call, result: Result<T, MgmtError>) -> Option<T> {
        let slot = call as usize;
        match result {
            Ok(v) => {
                if self.said.failing[slot].take().is_some() {
                    info!(
                        call = call.name(),
                        "CPA's {} can be read again",
                        call.name()
                    );
                }
                self.auth_failures = 0;
                self.blocked_until = None;
                Some(v)
            }
            Err(e) => {
                if let Some(cause) = e.auth() {
                    self.auth_failures += 1;
                    let wait = auth_wait(cause, self.auth_failures);
                    self.blocked_until = Some(Instant::now() + wait);
                    let retry_in = humantime::format_duration(wait).to_string();
                    error!(call = call.name(), retry_in, "{e}");
                } else if self.said.failing[slot] != Some(e.kind()) {
                    warn!(call = call.name(), "cannot read CPA's {}: {e}", call.name());
                } else {
                    debug!(call = call.name(), "cannot read CPA's {}: {e}", call.name());
                }
                self.said.failing[slot] = Some(e.kind());
                None
            }
        }
    }

    fn note_credentials(&mut self, count: usize, client: &MgmtClient) {
        let route = client.route().map_or("unknown", |r| r.name());
        if !self.said.credentials_read {
            self.said.credentials_read = true;
            let every = self
                .opts
                .credentials_interval
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_default();
            info!(
                route,
                credentials = count,
                every,
                "reading CPA's credentials listing"
            );
        } else {
            debug!(route, credentials = count, "credentials listing read");
        }
    }

    /// Count the credentials past `series-limit` as overflow of every credential family, at
    /// each read (as records are counted at each batch); warn once.
    fn note_left_out(&mut self, left: &LeftOut, shared: &Shared) {
        if left.credentials == 0 {
            return;
        }
        for (family, n) in left_out_by_family(left) {
            let set = [("family", family)];
            shared.live.series_overflow.get_or_create(&set).inc_by(n);
        }
        if !std::mem::replace(&mut self.said.credentials_capped, true) {
            warn!(
                series_limit = self.opts.series_limit,
                left_out = left.credentials,
                "CPA lists more credentials than series-limit: only the first ones are exported and compared with CPA's counts, the others are counted in cpa_exporter_series_overflow_total at each read"
            );
        }
    }

    fn warn_about(&mut self, settings: UsageSettings, idle: Duration) {
        self.say_statistics(settings.statistics_enabled);
        self.say_retention(settings.retention, idle);
    }

    fn say_statistics(&mut self, enabled: Option<bool>) {
        let before = self.said.statistics_enabled;
        if enabled.is_none() || enabled == before {
            return;
        }
        self.said.statistics_enabled = enabled;
        if enabled == Some(false) {
            warn!(
                "usage statistics are off in CPA (usage-statistics-enabled: false): CPA publishes no usage and the usage counters stay flat; set usage-statistics-enabled: true (v8: observability.usage.usage-statistics-enabled)"
            );
        } else if before == Some(false) {
            info!("usage statistics are on again in CPA");
        }
    }

    fn say_retention(&mut self, retention: Duration, idle: Duration) {
        if idle.saturating_mul(4) <= retention {
            if self.said.short_retention.take().is_some() {
                info!(
                    retention = %humantime::format_duration(retention),
                    poll_interval = %humantime::format_duration(idle),
                    "CPA's queue retention is now well above the idle poll interval"
                );
            }
            return;
        }
        if self.said.short_retention == Some((retention, idle)) {
            return;
        }
        self.said.short_retention = Some((retention, idle));
        warn!(
            retention = %humantime::format_duration(retention),
            poll_interval = %humantime::format_duration(idle),
            "the idle poll interval is longer than a quarter of CPA's queue retention: records can expire before they are popped; raise redis-usage-queue-retention-seconds in CPA or lower --poll-interval"
        );
    }
}

/// Both the usage and the errors channel are subscribed now.
fn channels_subscribed(shared: &Shared) -> bool {
    let live = &shared.live;
    live.credential_errors.subscribed() && live.subscription.get().is_some_and(|s| s.subscribed)
}

fn publish_identity(client: &MgmtClient, shared: &Shared) {
    let id = client.identity();
    shared
        .observed
        .get()
        .set_identity(id.version.as_deref(), id.commit.as_deref());
}
