//! Transport selection: pop CPA's queue over HTTP, over RESP, take records by subscription
//! (`subscribe`), or (`auto`) subscribe when CPA's API port speaks RESP.
//!
//! `auto` decides once, on the first poll that reaches CPA, and keeps the choice for the life of
//! the process:
//! - `+OK` to AUTH: `subscribe` (one AUTH per connection, no bcrypt check per pop, and records
//!   reach the exporter beside other collectors that subscribe);
//! - the port answers like HTTP, closes without a word, or does not know AUTH (a CPA without
//!   RESP, such as v7.1.17): HTTP, with one info line saying why, and the same poll goes on
//!   over HTTP at once (none of these answers costs a failed login);
//! - AUTH refused: RESP is kept and HTTP is **not** tried, which would be a second failed login
//!   toward CPA's ban; the drain loop's ban-safe backoff applies as for an HTTP 401;
//! - CPA unreachable or timing out: nothing is decided, the loop backs off as usual and the next
//!   poll probes again (an exporter that starts before CPA still ends up on RESP).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::resp::{RespClient, RespError, RespOptions, SetupError};
use super::subscribe::{self, Channel, Feed, Status};
use super::{ClientOptions, HttpClient, PopError, Popped, Via};
use crate::cpa::split::Sink;
use crate::cpa::{ApiVersion, Transport};
use crate::secret::Secret;

/// Anything that pops the usage queue (HTTP, RESP, scripted sources in tests).
pub trait Source {
    /// Pop up to `count` elements, handing each to `sink` as it arrives. Elements handed over
    /// before an error are popped records all the same.
    fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> impl Future<Output = Result<Popped, PopError>> + Send;

    /// The idle wait this source wants instead of `DrainOptions::poll_interval`, when it is
    /// only known at run time (the `auto` transport picks RESP or HTTP on its first poll).
    fn idle_interval(&self) -> Option<Duration> {
        None
    }

    /// The usage subscription's status, for a source that subscribes.
    fn subscription(&self) -> Option<Status> {
        None
    }

    /// Stop taking new records (shutdown); what was already received stays to be popped while
    /// [`Source::pending`] says so.
    fn close(&mut self) {}

    /// Records received and not yet handed out (a subscription's buffer).
    fn pending(&self) -> bool {
        false
    }
}

impl Source for HttpClient {
    fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> impl Future<Output = Result<Popped, PopError>> + Send {
        HttpClient::pop(self, count, sink)
    }
}

pub struct SourceOptions {
    pub base_url: String,
    pub key: Secret,
    pub transport: Transport,
    pub api_version: ApiVersion,
    pub timeout: Duration,
    pub max_body_bytes: usize,
    /// Idle wait between polls over HTTP and over RESP (see `Config::idle_interval`).
    pub http_idle: Duration,
    pub resp_idle: Duration,
    /// Proxy for HTTP requests to CPA (`--cpa-proxy`); the configuration forbids RESP with one.
    pub proxy: Option<Secret>,
}

/// The CPA client cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot build the HTTP client for CPA: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Resp(#[from] SetupError),
}

/// Bytes of published records buffered between the subscription reader and the drain loop
/// before the reader stops reading (CPA then holds 256 more before it drops the subscriber).
pub const SUBSCRIPTION_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Takes records by `SUBSCRIBE usage`, draining the queue with `LPOP` after every confirmed
/// subscription (records are published or queued, never both), and popping it on every poll
/// while no subscription is up.
pub struct SubscribeSource {
    lpop: RespClient,
    /// Kept until the reader starts: it logs in only after a pop saw the key accepted.
    reader_opts: Option<RespOptions>,
    reader: Option<std::thread::JoinHandle<()>>,
    feed: Arc<Feed>,
    /// The subscription (count of confirmed ones) whose queue drain has begun.
    drained_for: u64,
    /// The last drain pop came back full: more is queued.
    draining: bool,
    closed: bool,
}

impl SubscribeSource {
    pub fn new(opts: RespOptions) -> Result<SubscribeSource, SetupError> {
        Ok(SubscribeSource::from_client(
            RespClient::new(opts.clone())?,
            opts,
        ))
    }

    fn from_client(lpop: RespClient, opts: RespOptions) -> SubscribeSource {
        SubscribeSource {
            lpop,
            reader_opts: Some(opts),
            reader: None,
            feed: Arc::new(Feed::new(SUBSCRIPTION_BUFFER_BYTES)),
            drained_for: 0,
            draining: true,
            closed: false,
        }
    }

    pub async fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> Result<Popped, PopError> {
        self.try_pop(count, sink).await.map_err(PopError::from)
    }

    /// [`SubscribeSource::pop`] with the RESP-level detail.
    pub async fn try_pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> Result<Popped, RespError> {
        let (taken, bytes) = self.feed.take(count, sink);
        if taken > 0 || self.closed {
            return Ok(popped(bytes, Via::Subscription));
        }
        let status = self.feed.status();
        // A new subscription: what was queued while none was up waits in the queue.
        if status.subscriptions != self.drained_for {
            self.drained_for = status.subscriptions;
            self.draining = true;
        }
        if status.subscribed && !self.draining {
            return Ok(popped(0, Via::Subscription));
        }
        let mut counting = Counting { sink, n: 0 };
        let result = self.lpop.try_pop(count, &mut counting).await;
        match &result {
            Ok(_) => {
                self.draining = counting.n >= count;
                self.vouched();
            }
            Err(RespError::Auth(_)) => self.feed.unvouch(),
            Err(_) => {}
        }
        result
    }

    /// A pop saw the key accepted: the reader may log in (and is started the first time).
    fn vouched(&mut self) {
        self.feed.vouch();
        let Some(opts) = self.reader_opts.take() else {
            return;
        };
        let started = RespClient::new(opts)
            .map_err(|e| e.to_string())
            .and_then(|client| {
                subscribe::spawn_reader(client, Channel::Usage, self.feed.clone())
                    .map_err(|e| e.to_string())
            });
        match started {
            Ok(handle) => self.reader = Some(handle),
            Err(e) => {
                warn!("cannot start the subscription reader, popping the queue instead: {e}")
            }
        }
    }

    pub fn status(&self) -> Status {
        self.feed.status()
    }

    /// Stop the reader and wait for it: nothing arrives after this returns.
    pub fn close(&mut self) {
        self.closed = true;
        self.feed.stop();
        if let Some(reader) = self.reader.take() {
            // The reader ends within its exchange timeout.
            let _ = reader.join();
        }
    }

    pub fn pending(&self) -> bool {
        !self.feed.is_empty()
    }
}

impl Drop for SubscribeSource {
    fn drop(&mut self) {
        self.feed.stop();
    }
}

fn popped(bytes: u64, via: Via) -> Popped {
    Popped {
        bytes,
        via,
        cpa_version: None,
        cpa_commit: None,
    }
}

/// A sink that counts what it passes on.
struct Counting<'a, K> {
    sink: &'a mut K,
    n: usize,
}

impl<K: Sink> Sink for Counting<'_, K> {
    fn element(&mut self, bytes: &[u8], depth: Option<usize>) {
        self.n += 1;
        self.sink.element(bytes, depth);
    }
    fn oversize(&mut self) {
        self.n += 1;
        self.sink.oversize();
    }
}

enum Mode {
    Http(HttpClient),
    Resp(RespClient),
    Subscribe(Box<SubscribeSource>),
    /// Undecided: a RESP probe on the first poll that reaches CPA decides.
    Auto {
        resp: RespClient,
        resp_opts: RespOptions,
        http: HttpClient,
    },
    /// `auto` settled on HTTP.
    AutoHttp(HttpClient),
}

/// Pops the usage queue over the configured (or, for `auto`, detected) transport.
pub struct AnySource {
    /// `None` only while `auto` swaps its mode.
    mode: Option<Mode>,
    http_idle: Duration,
    resp_idle: Duration,
}

impl AnySource {
    pub fn new(opts: SourceOptions) -> Result<AnySource, BuildError> {
        let http = || {
            HttpClient::new(ClientOptions {
                base_url: opts.base_url.clone(),
                key: opts.key.clone(),
                api_version: opts.api_version,
                timeout: opts.timeout,
                max_body_bytes: opts.max_body_bytes,
                proxy: opts.proxy.clone(),
            })
        };
        let resp_opts = RespOptions {
            base_url: opts.base_url.clone(),
            key: opts.key.clone(),
            timeout: opts.timeout,
            max_reply_bytes: opts.max_body_bytes,
        };
        let mode = match opts.transport {
            Transport::Http => Mode::Http(http()?),
            Transport::Resp => Mode::Resp(RespClient::new(resp_opts)?),
            Transport::Subscribe => Mode::Subscribe(Box::new(SubscribeSource::new(resp_opts)?)),
            Transport::Auto => Mode::Auto {
                resp: RespClient::new(resp_opts.clone())?,
                resp_opts,
                http: http()?,
            },
        };
        Ok(AnySource {
            mode: Some(mode),
            http_idle: opts.http_idle,
            resp_idle: opts.resp_idle,
        })
    }

    /// The transport in use: `Auto` until `auto` has decided.
    pub fn transport(&self) -> Transport {
        match &self.mode {
            Some(Mode::Http(_) | Mode::AutoHttp(_)) => Transport::Http,
            Some(Mode::Resp(_)) => Transport::Resp,
            Some(Mode::Subscribe(_)) => Transport::Subscribe,
            Some(Mode::Auto { .. }) | None => Transport::Auto,
        }
    }

    /// Idle wait for the transport in use; HTTP's (the cheaper for CPA) while undecided.
    pub fn idle_interval(&self) -> Duration {
        match self.transport() {
            Transport::Resp | Transport::Subscribe => self.resp_idle,
            Transport::Http | Transport::Auto => self.http_idle,
        }
    }

    pub async fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> Result<Popped, PopError> {
        let (resp_idle, http_idle) = (self.resp_idle, self.http_idle);
        match self.mode.as_mut() {
            Some(Mode::Http(http) | Mode::AutoHttp(http)) => return http.pop(count, sink).await,
            Some(Mode::Resp(resp)) => return resp.pop(count, sink).await,
            Some(Mode::Subscribe(sub)) => return sub.pop(count, sink).await,
            Some(Mode::Auto { .. }) => {}
            None => return Err(PopError::BadReply("no transport".into())),
        }
        let Some(Mode::Auto {
            mut resp,
            resp_opts,
            mut http,
        }) = self.mode.take()
        else {
            return Err(PopError::BadReply("no transport".into()));
        };
        let probe = resp.try_pop(count, sink).await;
        match decide(&probe) {
            Some(Transport::Http) => {
                let reason = probe.err().map(|e| e.to_string()).unwrap_or_default();
                info!(
                    transport = "http",
                    poll_interval = %humantime::format_duration(http_idle),
                    reason,
                    "CPA does not speak RESP on its API port: using HTTP for the life of the process"
                );
                let result = http.pop(count, sink).await;
                self.mode = Some(Mode::AutoHttp(http));
                result
            }
            Some(_) => {
                if probe.is_ok() {
                    info!(
                        transport = "subscribe",
                        poll_interval = %humantime::format_duration(resp_idle),
                        "CPA speaks RESP: subscribing to its usage channel (and draining its queue after every subscription) over persistent connections, one AUTH each"
                    );
                } else {
                    warn!(
                        transport = "subscribe",
                        "CPA refused AUTH over RESP; staying on RESP and not trying HTTP, which would be a second failed login"
                    );
                }
                let mut sub = SubscribeSource::from_client(resp, resp_opts);
                if probe.is_ok() {
                    // The probe's pop was the first drain: the reader may log in now.
                    sub.vouched();
                }
                self.mode = Some(Mode::Subscribe(Box::new(sub)));
                probe.map_err(PopError::from)
            }
            None => {
                self.mode = Some(Mode::Auto {
                    resp,
                    resp_opts,
                    http,
                });
                probe.map_err(PopError::from)
            }
        }
    }

    fn subscribe_source(&self) -> Option<&SubscribeSource> {
        match &self.mode {
            Some(Mode::Subscribe(sub)) => Some(sub),
            _ => None,
        }
    }
}

/// What a first RESP attempt says about the transport; `None`: nothing yet (CPA unreachable).
fn decide(probe: &Result<Popped, RespError>) -> Option<Transport> {
    match probe {
        Ok(_) => Some(Transport::Resp),
        // No RESP on this port; none of these answers cost a failed login.
        Err(
            RespError::NotResp | RespError::Unsupported | RespError::Closed { during_auth: true },
        ) => Some(Transport::Http),
        // The port speaks RESP: CPA refused the key, runs in home mode, or refused the pop.
        Err(RespError::Auth(_) | RespError::HomeMode | RespError::Refused(_)) => {
            Some(Transport::Resp)
        }
        Err(
            RespError::Io(_)
            | RespError::Timeout
            | RespError::Closed { during_auth: false }
            | RespError::Protocol(_),
        ) => None,
    }
}

impl Source for AnySource {
    fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> impl std::future::Future<Output = Result<Popped, PopError>> + Send {
        AnySource::pop(self, count, sink)
    }

    fn idle_interval(&self) -> Option<Duration> {
        Some(AnySource::idle_interval(self))
    }

    fn subscription(&self) -> Option<Status> {
        self.subscribe_source().map(SubscribeSource::status)
    }

    fn close(&mut self) {
        if let Some(Mode::Subscribe(sub)) = self.mode.as_mut() {
            sub.close();
        }
    }

    fn pending(&self) -> bool {
        self.subscribe_source()
            .is_some_and(SubscribeSource::pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpa::resp::ProtocolError;
    use crate::cpa::{AuthCause, Via};

    fn ok() -> Result<Popped, RespError> {
        Ok(Popped {
            bytes: 0,
            via: Via::Resp,
            cpa_version: None,
            cpa_commit: None,
        })
    }

    #[test]
    fn auto_decides_once_and_never_retries_a_refused_key_over_http() {
        let d = |r: Result<Popped, RespError>| decide(&r);
        assert_eq!(d(ok()), Some(Transport::Resp));
        assert_eq!(d(Err(RespError::NotResp)), Some(Transport::Http));
        assert_eq!(d(Err(RespError::Unsupported)), Some(Transport::Http));
        assert_eq!(
            d(Err(RespError::Closed { during_auth: true })),
            Some(Transport::Http)
        );
        assert_eq!(
            d(Err(RespError::Auth(AuthCause::WrongKey))),
            Some(Transport::Resp)
        );
        assert_eq!(d(Err(RespError::Io("refused".into()))), None);
        assert_eq!(d(Err(RespError::Timeout)), None);
        assert_eq!(d(Err(RespError::Protocol(ProtocolError::BadLineEnd))), None);
    }
}
