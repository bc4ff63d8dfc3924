//! Subscriptions: `SUBSCRIBE usage` (or `errors`) on a RESP connection of its own, read by a
//! thread that only parses and hands payloads on (`shared/cpa/API.md` 1.2).
//!
//! While any subscriber is connected CPA publishes each record to the subscribers and queues
//! nothing, so beside another collector that subscribes a queue-popping exporter sees nothing.
//! CPA drops a subscriber that falls 256 messages behind, and what it missed is gone: the reader
//! therefore never waits for anything but the socket and room in its [`Feed`], whose consumer
//! (the drain loop) commits on another thread. Records are published or queued, never both, so
//! after every (re)subscription the queue is drained once with `LPOP` (see
//! [`crate::cpa::source`]) and nothing is counted twice.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::resp::{Conn, OwnedReply, ProtocolError, RespClient, RespError, Token};
use crate::cpa::split::Sink;

/// Largest reply accepted to `SUBSCRIBE` (`*3 subscribe <channel> :1`).
const CONFIRM_LIMIT: usize = 4096;
/// A quiet subscription is pinged this often; a ping unanswered by the next one ends it (a
/// half-open connection would otherwise look like a quiet CPA forever).
pub const PING_EVERY: Duration = Duration::from_secs(30);
/// A subscription that CPA refuses (a CPA before v7.0.7 does not know `SUBSCRIBE`) is tried
/// again this often; meanwhile the queue is popped as over RESP.
const REFUSED_RETRY: Duration = Duration::from_secs(300);

/// How long a stopping reader waits for CPA's answer to `UNSUBSCRIBE` (CPA answers at once;
/// shutdown must not wait for a CPA that does not).
const UNSUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

/// A pub/sub channel of CPA's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// One usage record per upstream attempt, and control payloads.
    Usage,
    /// One event per failed upstream attempt, with the credential's state after it.
    Errors,
}

impl Channel {
    pub fn name(self) -> &'static str {
        match self {
            Channel::Usage => "usage",
            Channel::Errors => "errors",
        }
    }
}

/// What a subscription connection carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Push<'a> {
    /// A message on the channel: a usage record, a control payload or an error event.
    Message(&'a [u8]),
    /// A message over the element limit, read past without being kept.
    Oversize,
    /// The answer to a keepalive `PING`.
    Pong,
    /// The answer to `UNSUBSCRIBE`: CPA sends nothing more and closes the connection.
    Unsubscribed,
}

/// An authenticated connection subscribed to one channel; CPA accepts only `PING`,
/// `UNSUBSCRIBE` and `QUIT` on it.
pub struct Subscription {
    conn: Conn,
    channel: Channel,
    timeout: Duration,
}

impl RespClient {
    /// Open a connection of its own, `AUTH`, then `SUBSCRIBE <channel>` and its confirmation.
    pub async fn subscribe(&self, channel: Channel) -> Result<Subscription, RespError> {
        let mut conn = self.open().await?;
        let timeout = self.timeout();
        let confirm = async {
            conn.send(&[b"SUBSCRIBE", channel.name().as_bytes()])
                .await?;
            conn.value(CONFIRM_LIMIT).await
        };
        let reply = tokio::time::timeout(timeout, confirm)
            .await
            .map_err(|_| RespError::Timeout)??;
        match reply {
            OwnedReply::Array(Some(items)) if matches!(items.first(), Some(OwnedReply::Bulk(Some(k))) if k.eq_ignore_ascii_case(b"subscribe")) => {
                Ok(Subscription {
                    conn,
                    channel,
                    timeout,
                })
            }
            OwnedReply::Error(msg) => Err(RespError::Refused(self.sanitize(&msg))),
            _ => Err(ProtocolError::UnexpectedReply.into()),
        }
    }
}

impl Subscription {
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// Wait up to `quiet` for CPA to send something. `Ok(false)`: nothing came. Cancel-safe.
    pub async fn wait(&mut self, quiet: Duration) -> Result<bool, RespError> {
        match tokio::time::timeout(quiet, self.conn.readable()).await {
            Err(_) => Ok(false),
            Ok(r) => r.map(|()| true),
        }
    }

    /// Send a keepalive `PING` (answered by a [`Push::Pong`]).
    pub async fn ping(&mut self) -> Result<(), RespError> {
        tokio::time::timeout(self.timeout, self.conn.send(&[b"PING"]))
            .await
            .map_err(|_| RespError::Timeout)?
    }

    /// Send `UNSUBSCRIBE` (answered by a [`Push::Unsubscribed`] after what CPA had already
    /// written).
    pub async fn unsubscribe(&mut self) -> Result<(), RespError> {
        tokio::time::timeout(self.timeout, self.conn.send(&[b"UNSUBSCRIBE"]))
            .await
            .map_err(|_| RespError::Timeout)?
    }

    /// The next push, read whole within the exchange timeout once it has started to arrive.
    pub async fn next(&mut self) -> Result<Push<'_>, RespError> {
        let timeout = self.timeout;
        let channel = self.channel;
        tokio::time::timeout(timeout, read_push(&mut self.conn, channel))
            .await
            .map_err(|_| RespError::Timeout)?
    }
}

/// `*3 message <channel> <payload>` or `*2 pong <arg>`; anything else is not CPA's pub/sub.
async fn read_push(conn: &mut Conn, channel: Channel) -> Result<Push<'_>, RespError> {
    let items = match conn.token().await? {
        Token::Array(Some(n)) => n,
        Token::Error(msg) => {
            let text = String::from_utf8_lossy(msg).chars().take(160).collect();
            return Err(RespError::Refused(text));
        }
        _ => return Err(ProtocolError::UnexpectedReply.into()),
    };
    let kind = match conn.token().await? {
        Token::Bulk(Some(k)) if k.eq_ignore_ascii_case(b"message") => "message",
        Token::Bulk(Some(k)) if k.eq_ignore_ascii_case(b"pong") => "pong",
        Token::Bulk(Some(k)) if k.eq_ignore_ascii_case(b"unsubscribe") => "unsubscribe",
        _ => return Err(ProtocolError::UnexpectedReply.into()),
    };
    match (kind, items) {
        ("unsubscribe", 3) => {
            for _ in 0..2 {
                match conn.token().await? {
                    Token::Bulk(_) | Token::Integer(_) => {}
                    _ => return Err(ProtocolError::UnexpectedReply.into()),
                }
            }
            Ok(Push::Unsubscribed)
        }
        ("pong", 2) => {
            match conn.token().await? {
                Token::Bulk(_) | Token::Oversize(_) => {}
                _ => return Err(ProtocolError::UnexpectedReply.into()),
            }
            Ok(Push::Pong)
        }
        ("message", 3) => {
            let ours = matches!(conn.token().await?, Token::Bulk(Some(c)) if c == channel.name().as_bytes());
            if !ours {
                return Err(ProtocolError::UnexpectedReply.into());
            }
            match conn.token().await? {
                Token::Bulk(Some(payload)) => Ok(Push::Message(payload)),
                Token::Oversize(_) => Ok(Push::Oversize),
                _ => Err(ProtocolError::UnexpectedReply.into()),
            }
        }
        _ => Err(ProtocolError::UnexpectedReply.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// The feed between the reader thread and its consumer
// ---------------------------------------------------------------------------------------------

/// What a subscription reader has been through, for the exporter's own metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Status {
    /// Subscribed now.
    pub subscribed: bool,
    /// Subscriptions CPA confirmed since start (each one is followed by a queue drain).
    pub subscriptions: u64,
    /// Subscriptions that ended without the exporter ending them (CPA dropped a slow
    /// subscriber, restarted, or the connection broke).
    pub drops: u64,
    /// Seconds from such an end to the next confirmed subscription: records published then
    /// went to other subscribers only, or (with none) were queued and drained afterwards.
    pub gap_seconds: f64,
    /// `{"refresh":true}` control payloads seen: CPA's credentials changed.
    pub refreshes: u64,
    /// The last subscription attempt was refused for the key (the reader waits for the drain
    /// loop to see the key accepted before it logs in again).
    pub key_refused: bool,
}

/// A bounded buffer of payloads from the reader thread to the consumer, and the reader's
/// status. The reader waits for room (and stops reading the socket) only when the consumer is
/// behind by `max_bytes`; CPA then holds 256 more before it drops the subscriber.
#[derive(Debug)]
pub struct Feed {
    state: Mutex<FeedState>,
    room: Notify,
    arrived: Notify,
    max_bytes: usize,
    stop: AtomicBool,
    stopped: Notify,
    /// The key was accepted on another connection: the reader may log in.
    vouched: AtomicBool,
    vouch: Notify,
}

#[derive(Debug, Default)]
struct FeedState {
    /// Payloads in arrival order; `None` for one over the element limit.
    items: VecDeque<Option<Vec<u8>>>,
    bytes: usize,
    status: Status,
}

impl Feed {
    pub fn new(max_bytes: usize) -> Feed {
        Feed {
            state: Mutex::new(FeedState::default()),
            room: Notify::new(),
            arrived: Notify::new(),
            max_bytes,
            stop: AtomicBool::new(false),
            stopped: Notify::new(),
            vouched: AtomicBool::new(false),
            vouch: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Hand up to `max` payloads to `sink`, oldest first, without waiting. Returns how many
    /// and their bytes.
    pub fn take<K: Sink>(&self, max: usize, sink: &mut K) -> (usize, u64) {
        let mut taken = Vec::new();
        {
            let mut state = self.lock();
            let n = max.min(state.items.len());
            taken.extend(state.items.drain(..n));
            let bytes: usize = taken.iter().flatten().map(Vec::len).sum();
            state.bytes -= bytes.min(state.bytes);
        }
        self.room.notify_one();
        let mut bytes = 0u64;
        for item in &taken {
            match item {
                Some(payload) => {
                    bytes += payload.len() as u64;
                    sink.element(payload, None);
                }
                None => sink.oversize(),
            }
        }
        (taken.len(), bytes)
    }

    /// Wait until a payload is buffered (for a consumer without a poll loop of its own).
    pub async fn arrived(&self) {
        loop {
            let notified = self.arrived.notified();
            if !self.is_empty() || self.is_stopped() {
                return;
            }
            notified.await;
        }
    }

    /// Wait until a payload of `size` bytes fits (one payload always fits). Cancel-safe.
    async fn room_for(&self, size: usize) {
        loop {
            let room = self.room.notified();
            {
                let state = self.lock();
                if state.items.is_empty() || state.bytes + size <= self.max_bytes {
                    return;
                }
            }
            room.await;
        }
    }

    /// Buffer a payload now, room or not (after [`Feed::room_for`], or while stopping: what
    /// CPA already sent is kept).
    fn push_now(&self, item: Option<Vec<u8>>) {
        {
            let mut state = self.lock();
            state.bytes += item.as_ref().map_or(0, Vec::len);
            state.items.push_back(item);
        }
        self.arrived.notify_one();
    }

    #[cfg(test)]
    async fn push(&self, item: Option<Vec<u8>>) {
        self.room_for(item.as_ref().map_or(0, Vec::len)).await;
        self.push_now(item);
    }

    /// The key was accepted (a pop succeeded): the reader may log in.
    pub fn vouch(&self) {
        if !self.vouched.swap(true, Ordering::Relaxed) {
            self.vouch.notify_one();
        }
    }

    /// The key was refused: no login until it is accepted again.
    pub fn unvouch(&self) {
        self.vouched.store(false, Ordering::Relaxed);
    }

    /// Ask the reader to end (its connection closes, so CPA queues again if no one else
    /// subscribes); it ends within its exchange timeout.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.stopped.notify_waiters();
        self.room.notify_waiters();
        self.vouch.notify_waiters();
        self.arrived.notify_waiters();
    }

    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    async fn until_stopped(&self) {
        loop {
            let notified = self.stopped.notified();
            if self.is_stopped() {
                return;
            }
            notified.await;
        }
    }

    async fn until_vouched(&self) {
        loop {
            let notified = self.vouch.notified();
            if self.vouched.load(Ordering::Relaxed) || self.is_stopped() {
                return;
            }
            notified.await;
        }
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.lock().status);
    }
}

/// A control payload on the usage channel: not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// `{"support_refresh":true}`, sent at every subscription.
    SupportRefresh,
    /// `{"refresh":true}`: CPA's credentials changed.
    Refresh,
}

/// Whether a usage payload is one of CPA's control payloads. They are a few bytes; records are
/// hundreds, so the check costs nothing on the record path.
pub fn control(payload: &[u8]) -> Option<Control> {
    #[derive(serde::Deserialize)]
    struct Payload {
        #[serde(default)]
        refresh: bool,
        #[serde(default)]
        support_refresh: bool,
        timestamp: Option<serde::de::IgnoredAny>,
    }
    if payload.len() > 64 {
        return None;
    }
    match serde_json::from_slice::<Payload>(payload).ok()? {
        Payload {
            timestamp: Some(_), ..
        } => None,
        Payload { refresh: true, .. } => Some(Control::Refresh),
        Payload {
            support_refresh: true,
            ..
        } => Some(Control::SupportRefresh),
        _ => None,
    }
}

/// Hand a pushed payload on: usage records go to the feed; the usage channel's control payloads
/// are the subscription's own business (a refresh is counted), never records.
fn accept(feed: &Feed, usage: bool, payload: &[u8]) -> Option<Vec<u8>> {
    match usage.then(|| control(payload)).flatten() {
        Some(Control::Refresh) => {
            feed.update(|s| s.refreshes += 1);
            None
        }
        Some(Control::SupportRefresh) => None,
        None => Some(payload.to_vec()),
    }
}

/// Start the reader of `channel` on a thread and runtime of its own: the consumer's runtime
/// blocks on SQLite commits, and the socket must be read meanwhile.
pub fn spawn_reader(
    client: RespClient,
    channel: Channel,
    feed: Arc<Feed>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("subscribe-{}", channel.name()))
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run_reader(client, channel, feed)),
                Err(e) => warn!("cannot start the subscription reader's runtime: {e}"),
            }
        })
}

/// Subscribe, read until the subscription ends, subscribe again; until [`Feed::stop`].
pub async fn run_reader(client: RespClient, channel: Channel, feed: Arc<Feed>) {
    let mut failures = 0u32;
    let mut down_since: Option<Instant> = None;
    loop {
        if feed.is_stopped() {
            return;
        }
        feed.until_vouched().await;
        if feed.is_stopped() {
            return;
        }
        let attempt = tokio::select! {
            r = client.subscribe(channel) => r,
            () = feed.until_stopped() => return,
        };
        let wait = match attempt {
            Ok(mut sub) => {
                failures = 0;
                feed.update(|s| {
                    s.subscribed = true;
                    s.subscriptions += 1;
                    s.key_refused = false;
                    if let Some(since) = down_since.take() {
                        s.gap_seconds += since.elapsed().as_secs_f64();
                    }
                });
                info!(channel = channel.name(), "subscribed to CPA's channel");
                let end = read(&mut sub, &feed).await;
                feed.update(|s| s.subscribed = false);
                match end {
                    None => return,
                    Some(e) => {
                        feed.update(|s| s.drops += 1);
                        down_since = Some(Instant::now());
                        warn!(
                            channel = channel.name(),
                            "the subscription ended ({e}); subscribing again (records published meanwhile go to other subscribers, or are queued and drained after)"
                        );
                        Duration::ZERO
                    }
                }
            }
            Err(RespError::Auth(cause)) => {
                feed.unvouch();
                feed.update(|s| s.key_refused = true);
                warn!(
                    channel = channel.name(),
                    "cannot subscribe: {cause}; waiting until the key is accepted again"
                );
                Duration::ZERO
            }
            Err(e @ RespError::Refused(_)) => {
                warn!(
                    channel = channel.name(),
                    retry_in = %humantime::format_duration(REFUSED_RETRY),
                    "CPA refused the subscription ({e}); popping its queue meanwhile"
                );
                REFUSED_RETRY
            }
            Err(e) => {
                failures += 1;
                let wait = Duration::from_secs((1u64 << failures.min(5).saturating_sub(1)).min(30));
                debug!(channel = channel.name(), failures, "cannot subscribe: {e}");
                wait
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = feed.until_stopped() => return,
            }
        }
    }
}

/// Read pushes into the feed until the subscription fails (`Some`) or the feed stops (`None`).
async fn read(sub: &mut Subscription, feed: &Feed) -> Option<RespError> {
    let mut ping_pending = false;
    let usage = sub.channel() == Channel::Usage;
    loop {
        let arrived = tokio::select! {
            r = sub.wait(PING_EVERY) => r,
            () = feed.until_stopped() => return unsubscribe(sub, feed).await,
        };
        match arrived {
            Err(e) => return Some(e),
            Ok(false) if ping_pending => return Some(RespError::Timeout),
            Ok(false) => {
                if let Err(e) = sub.ping().await {
                    return Some(e);
                }
                ping_pending = true;
                continue;
            }
            Ok(true) => {}
        }
        let item = match sub.next().await {
            Err(e) => return Some(e),
            Ok(Push::Pong) => {
                ping_pending = false;
                continue;
            }
            Ok(Push::Unsubscribed) => return Some(ProtocolError::UnexpectedReply.into()),
            Ok(Push::Oversize) => None,
            Ok(Push::Message(payload)) => match accept(feed, usage, payload) {
                Some(record) => Some(record),
                None => continue,
            },
        };
        let size = item.as_ref().map_or(0, Vec::len);
        tokio::select! {
            () = feed.room_for(size) => feed.push_now(item),
            () = feed.until_stopped() => {
                feed.push_now(item);
                return unsubscribe(sub, feed).await;
            }
        }
    }
}

/// End a subscription on shutdown without losing what CPA already sent: closing the socket
/// would drop the messages in flight (CPA neither queues them nor sends them again), so ask CPA
/// to stop, keep every message that arrives before its answer, then close.
async fn unsubscribe(sub: &mut Subscription, feed: &Feed) -> Option<RespError> {
    let usage = sub.channel() == Channel::Usage;
    let rest = async {
        sub.unsubscribe().await?;
        loop {
            match sub.next().await? {
                Push::Message(payload) => {
                    if let Some(record) = accept(feed, usage, payload) {
                        feed.push_now(Some(record));
                    }
                }
                Push::Oversize => feed.push_now(None),
                Push::Pong => {}
                Push::Unsubscribed => return Ok::<(), RespError>(()),
            }
        }
    };
    match tokio::time::timeout(UNSUBSCRIBE_WAIT, rest).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(channel = sub.channel().name(), "unsubscribing: {e}"),
        Err(_) => debug!(
            channel = sub.channel().name(),
            "CPA did not answer UNSUBSCRIBE in time; closing"
        ),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_payloads_are_told_from_records() {
        assert_eq!(control(br#"{"refresh":true}"#), Some(Control::Refresh));
        assert_eq!(
            control(br#" { "refresh" : true } "#),
            Some(Control::Refresh)
        );
        assert_eq!(
            control(br#"{"support_refresh":true}"#),
            Some(Control::SupportRefresh)
        );
        assert_eq!(control(br#"{"refresh":false}"#), None);
        assert_eq!(control(br#"{"timestamp":"x","refresh":true}"#), None);
        assert_eq!(control(b"not json"), None);
        assert_eq!(control(b"{}"), None);
    }

    #[derive(Default)]
    struct Got(Vec<Option<Vec<u8>>>);

    impl Sink for Got {
        fn element(&mut self, bytes: &[u8], _: Option<usize>) {
            self.0.push(Some(bytes.to_vec()));
        }
        fn oversize(&mut self) {
            self.0.push(None);
        }
    }

    #[tokio::test]
    async fn the_feed_is_bounded_and_hands_out_in_order() {
        let feed = Arc::new(Feed::new(10));
        feed.push(Some(b"123456".to_vec())).await;
        feed.push(None).await;
        // Over the bound: waits until the consumer takes something.
        let f = feed.clone();
        let blocked = tokio::spawn(async move { f.push(Some(b"abcdef".to_vec())).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!blocked.is_finished(), "the reader waits for room");
        let mut got = Got::default();
        assert_eq!(feed.take(1, &mut got), (1, 6));
        blocked.await.unwrap();
        assert_eq!(feed.take(10, &mut got), (2, 6));
        assert_eq!(
            got.0,
            [Some(b"123456".to_vec()), None, Some(b"abcdef".to_vec())]
        );
        assert!(feed.is_empty());
    }

    #[test]
    fn stop_wakes_a_reader_on_another_runtime() {
        let feed = Arc::new(Feed::new(10));
        let f = feed.clone();
        let t = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(30)) => {}
                            () = f.until_stopped() => return,
                        }
                    }
                })
        });
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        feed.stop();
        t.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
