//! CPA's errors channel: `SUBSCRIBE errors` on a connection of its own, one event per failed
//! upstream attempt with the credential's state after it (`shared/cpa/API.md` 1.2).
//!
//! Each event counts in `cpa_credential_errors_total` and moves the credential gauges at once
//! (status, unavailable, disabled, next retry, quota recovery); the next credentials listing
//! read is the authority again. CPA never queues the channel: what is published while the
//! exporter is not subscribed is gone, so the counter is live only.
//!
//! Ban safety: the reader logs in only once the drain loop has seen the key accepted and the
//! drain loop itself subscribes (transport `subscribe`, or `auto` once it chose it). If the
//! reader's own login is refused, it logs in again only after the drain loop's auth backoff
//! (5 min doubling to 1 h), not at the next poll.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::cpa::resp::{RespClient, RespOptions, SetupError};
use crate::cpa::split::Sink;
use crate::cpa::subscribe::{self, Channel, Feed};
use crate::ingest::cred_errors::{self, MAX_EVENT_BYTES};
use crate::metrics::cred_errors::FAMILY;
use crate::metrics::Shared;
use crate::pipeline::backoff;

/// Bytes of events buffered between the reader and the consumer. Events are applied in
/// microseconds, so this only absorbs a burst while the runtime is busy.
const FEED_BYTES: usize = 2 * 1024 * 1024;

/// Events applied per turn, so a burst does not hold the runtime.
const TURN: usize = 256;

/// How often the key's state and the subscription status are looked at.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// The errors channel's reader thread and its consumer task.
pub struct ErrorsChannel {
    feed: Arc<Feed>,
    reader: Option<std::thread::JoinHandle<()>>,
    consumer: Option<JoinHandle<()>>,
}

/// Start the reader (it waits to be vouched for) and its consumer on the current runtime.
pub fn start(
    opts: RespOptions,
    shared: Arc<Shared>,
    series_limit: usize,
) -> Result<ErrorsChannel, StartError> {
    // Events are small; a larger element is skipped unread by the reader.
    let opts = RespOptions {
        max_reply_bytes: opts.max_reply_bytes.min(MAX_EVENT_BYTES),
        ..opts
    };
    let client = RespClient::new(opts)?;
    let feed = Arc::new(Feed::new(FEED_BYTES));
    let reader = subscribe::spawn_reader(client, Channel::Errors, feed.clone())?;
    let consumer = tokio::spawn(consume(feed.clone(), shared, series_limit));
    Ok(ErrorsChannel {
        feed,
        reader: Some(reader),
        consumer: Some(consumer),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up the errors channel: {0}")]
    Setup(#[from] SetupError),
    #[error("cannot start the errors channel's reader: {0}")]
    Thread(#[from] std::io::Error),
}

impl ErrorsChannel {
    /// Stop the reader (within its exchange timeout) and apply what it received.
    pub async fn stop(mut self) {
        self.feed.stop();
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        if let Some(consumer) = self.consumer.take() {
            let _ = consumer.await;
        }
    }
}

impl Drop for ErrorsChannel {
    fn drop(&mut self) {
        self.feed.stop();
    }
}

/// Vouch for the reader's login, apply events as they arrive; until the feed stops.
async fn consume(feed: Arc<Feed>, shared: Arc<Shared>, series_limit: usize) {
    let mut apply = Apply::new(shared.clone());
    let mut vouch = Vouch {
        series_limit,
        ..Vouch::default()
    };
    loop {
        vouch.look(&feed, &shared);
        feed.take(TURN, &mut apply);
        if feed.is_stopped() && feed.is_empty() {
            break;
        }
        if !feed.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            () = feed.arrived() => {}
            () = tokio::time::sleep(LOOK_EVERY) => {}
        }
    }
    shared.live.credential_errors.set_subscribed(false);
    debug!("errors channel stopped");
}

/// When the reader may log in.
#[derive(Default)]
struct Vouch {
    series_limit: usize,
    /// The reader's own logins refused in a row, and when it may try again.
    refusals: u32,
    retry_at: Option<Instant>,
    said_subscribed: bool,
}

impl Vouch {
    fn look(&mut self, feed: &Feed, shared: &Shared) {
        let status = feed.status();
        let live = &shared.live;
        live.credential_errors.set_subscribed(status.subscribed);
        if status.subscribed {
            self.refusals = 0;
            self.retry_at = None;
            if !std::mem::replace(&mut self.said_subscribed, true) {
                info!("reading CPA's errors channel: credential errors and states as they happen");
            }
        }
        if status.key_refused && self.retry_at.is_none() {
            // The reader unvouched itself; each refusal counts towards CPA's ban.
            self.refusals += 1;
            let wait = backoff::auth(self.refusals);
            self.retry_at = Some(Instant::now() + wait);
            warn!(
                retry_in = %humantime::format_duration(wait),
                "CPA refused the key on the errors channel"
            );
        }
        let accepted = live.key_accepted();
        if accepted == Some(false) {
            feed.unvouch();
            return;
        }
        // The drain loop subscribes too: CPA speaks RESP and pub/sub, and the key works.
        let usage_subscribes = live.subscription.get().is_some();
        if usage_subscribes {
            // Exported from here on, as the usage subscription's own metrics (`auto` may
            // settle on HTTP, and then there is no errors channel to speak of).
            live.credential_errors
                .enable(self.series_limit, &shared.view.labels);
        }
        let waited = self.retry_at.is_none_or(|t| Instant::now() >= t);
        if accepted == Some(true) && usage_subscribes && waited {
            if self.retry_at.take().is_some() {
                debug!("logging in to the errors channel again");
            }
            feed.vouch();
        }
    }
}

/// Applies each event to the counter and the credential gauges.
struct Apply {
    shared: Arc<Shared>,
    said_overflow: bool,
    said_invalid: bool,
    /// Credentials not in the listing whose events asked for a listing read (once each, at
    /// most the series limit of them).
    asked: HashSet<String>,
}

impl Apply {
    fn new(shared: Arc<Shared>) -> Apply {
        Apply {
            shared,
            said_overflow: false,
            said_invalid: false,
            asked: HashSet::new(),
        }
    }

    fn invalid(&mut self, why: &dyn std::fmt::Display) {
        if !std::mem::replace(&mut self.said_invalid, true) {
            warn!("an event on CPA's errors channel was not used: {why}");
        } else {
            debug!("an event on CPA's errors channel was not used: {why}");
        }
    }
}

impl Sink for Apply {
    fn element(&mut self, bytes: &[u8], _: Option<usize>) {
        let event = match cred_errors::decode(bytes) {
            Ok(e) => e,
            Err(e) => return self.invalid(&e),
        };
        let live = &self.shared.live;
        let (provider, index) = (event.provider.as_deref(), event.auth_index.as_deref());
        if live
            .credential_errors
            .record(provider, index, event.status_code)
        {
            live.series_overflow
                .get_or_create(&[("family", FAMILY)])
                .inc();
            if !std::mem::replace(&mut self.said_overflow, true) {
                warn!(
                    "cpa_credential_errors reached its series limit: new label sets are folded into one __other__ series (counted in cpa_exporter_series_overflow_total)"
                );
            }
        }
        let (Some(index), Some(state)) = (index, event.state) else {
            return;
        };
        let listed = self.shared.observed.get().apply_error_state(index, &state);
        let room = self.asked.len() < live.credential_errors.limit();
        if !listed && room && self.asked.insert(index.to_owned()) {
            // A credential the listing did not have (yet): read it again (debounced).
            live.credentials_changed.notify_one();
        }
    }

    fn oversize(&mut self) {
        self.invalid(&format_args!("it is over {MAX_EVENT_BYTES} bytes"));
    }
}
