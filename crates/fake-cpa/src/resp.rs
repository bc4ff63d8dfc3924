//! The RESP side of the fake CPA's API port (`shared/cpa/API.md` 1.2), following CPA's own
//! handler: the first byte of a connection decides RESP or HTTP (and must arrive within 10 s);
//! `AUTH <key>` / `AUTH <user> <key>` checks the key through the same per-IP failure count and
//! ban as HTTP; any other command before AUTH is a failed login answered `-NOAUTH`;
//! `LPOP`/`RPOP usage [count]` pop the oldest records of the same queue as HTTP.
//!
//! `SUBSCRIBE usage` / `SUBSCRIBE errors` (one channel, any case) turn the connection into a
//! subscription for good, byte for byte as the real v7.2.140: `*3 subscribe <channel> :1`, then
//! on `usage` at once the control payload `{"support_refresh":true}`, then every message as
//! `*3 message <channel> <payload>` (the channel named as the client spelled it). While any usage
//! subscriber exists, records are published instead of queued (`pubsub.rs`); a subscriber whose
//! 256-message buffer is full is dropped: its connection writes out what was buffered and then
//! closes (only as fast as the client reads: one that never reads is never closed). On a
//! subscription only `PING [msg]` (`*2 pong <msg or nil>`), `UNSUBSCRIBE` (`*3 unsubscribe
//! <channel> :0`, then close, whatever its arguments) and `QUIT` (`+OK`, then close) are known;
//! anything else, `AUTH`, `LPOP` and a second `SUBSCRIBE` included, is `-ERR unknown command`.
//! Outside a subscription `PING`, `QUIT` and `UNSUBSCRIBE` are unknown commands too.
//!
//! Declared from `server.rs` as its child module (it shares the queue, the ban and the stats).
//! Not simulated: CPA's home mode.

use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{go_duration, raw_payload, Attempts, Fault, Shared};
use crate::pubsub::{Message, SUPPORT_REFRESH};

/// CPA waits this long for the first byte of a connection.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on what one command may hold (CPA's are a few short strings).
const MAX_LINE: u64 = 64 * 1024;
const MAX_ARGS: i64 = 1024;
const MAX_BULK: i64 = 1024 * 1024;
const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
const PROTOCOL_ERROR: &[u8] = b"-ERR protocol error\r\n";
/// CPA's pub/sub channel names (matched in any case).
const USAGE: &str = "usage";
const ERRORS: &str = "errors";

/// What the first byte of a connection says.
pub(super) enum Sniff {
    Resp,
    Http,
    Closed,
}

/// CPA's mux: RESP type bytes go to the RESP handler (when enabled), everything else to HTTP.
pub(super) async fn sniff(stream: &TcpStream, shared: &Shared) -> Sniff {
    let mut first = [0u8; 1];
    match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {
            let resp = matches!(first[0], b'*' | b'$' | b'+' | b'-' | b':');
            if resp && shared.lock().cfg.resp_enabled {
                Sniff::Resp
            } else {
                Sniff::Http
            }
        }
        _ => Sniff::Closed,
    }
}

/// Serve one RESP connection until the client leaves, a protocol error, or the fake stops.
pub(super) async fn serve(
    stream: TcpStream,
    ip: IpAddr,
    shared: std::sync::Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    shared.lock().stats.resp_connections += 1;
    tokio::select! {
        _ = session(stream, ip, &shared) => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

async fn session(stream: TcpStream, ip: IpAddr, shared: &Shared) -> io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut authed = false;
    loop {
        // Management switched off: CPA drops RESP connections without a word.
        if shared.lock().cfg.management_key.is_empty() {
            return Ok(());
        }
        let args = match read_command(&mut rd).await {
            Ok(args) => args,
            Err(ReadError::Closed) => return Ok(()),
            Err(ReadError::Protocol) => {
                wr.write_all(PROTOCOL_ERROR).await?;
                return Ok(());
            }
        };
        match shared.command(ip, &mut authed, &args) {
            Action::Reply(bytes) => wr.write_all(&bytes).await?,
            Action::Delayed(wait, bytes) => {
                tokio::time::sleep(wait).await;
                wr.write_all(&bytes).await?;
            }
            Action::Close => return Ok(()),
            Action::Subscribe(kind, name) => {
                // Registered before the confirmation is written, as CPA does: nothing published
                // in between is missed.
                let sub = Subscription::new(shared, kind);
                wr.write_all(&pubsub_frame(&[b"subscribe", name.as_bytes()], Some(1)))
                    .await?;
                return sub.stream(rd, wr, &name).await;
            }
        }
    }
}

enum Action {
    Reply(Vec<u8>),
    /// A `Fault::Delay`: the records are already popped.
    Delayed(Duration, Vec<u8>),
    /// A `Fault::ResetConnection`: nothing popped, no answer.
    Close,
    /// `SUBSCRIBE <channel>`, with the channel as the client spelled it (trimmed).
    Subscribe(Kind, String),
}

/// Which pub/sub channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Usage,
    Errors,
}

/// A registered subscriber; unregisters itself when the connection ends, however it ends.
struct Subscription<'s> {
    shared: &'s Shared,
    kind: Kind,
    id: u64,
    rx: mpsc::Receiver<Message>,
}

impl<'s> Subscription<'s> {
    fn new(shared: &'s Shared, kind: Kind) -> Subscription<'s> {
        let mut st = shared.lock();
        let (id, rx) = match kind {
            Kind::Usage => st.usage.subscribe(Some(SUPPORT_REFRESH)),
            Kind::Errors => st.errors.subscribe(None),
        };
        Subscription {
            shared,
            kind,
            id,
            rx,
        }
    }

    /// CPA's `streamRedisSubscription`: writes messages as they come and answers commands read
    /// by a reader of its own; ends when the channel is closed (dropped when full, management
    /// switched off), on EOF, a protocol error, `UNSUBSCRIBE` or `QUIT`.
    async fn stream(
        mut self,
        rd: BufReader<OwnedReadHalf>,
        mut wr: OwnedWriteHalf,
        name: &str,
    ) -> io::Result<()> {
        let (tx, mut commands) = mpsc::channel(1);
        let _reader = AbortOnDrop(tokio::spawn(read_commands(rd, tx)));
        loop {
            tokio::select! {
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { return Ok(()) };
                    wr.write_all(&pubsub_frame(&[b"message", name.as_bytes(), &msg.bytes], None))
                        .await?;
                    if msg.counted {
                        let mut st = self.shared.lock();
                        match self.kind {
                            Kind::Usage => st.stats.written += 1,
                            Kind::Errors => st.stats.error_written += 1,
                        }
                    }
                }
                command = commands.recv() => {
                    let args = match command {
                        None => return Ok(()),
                        Some(Err(ReadError::Protocol)) => {
                            return wr.write_all(PROTOCOL_ERROR).await;
                        }
                        Some(Err(ReadError::Closed)) => return Ok(()),
                        Some(Ok(args)) => args,
                    };
                    let (reply, keep_open) = subscribed_command(&args, name);
                    wr.write_all(&reply).await?;
                    if !keep_open {
                        return Ok(());
                    }
                }
            }
        }
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        match self.kind {
            Kind::Usage => st.usage.unsubscribe(self.id),
            Kind::Errors => st.errors.unsubscribe(self.id),
        }
        // What is still buffered is lost with the connection, as in CPA.
        let mut left = 0;
        while let Ok(msg) = self.rx.try_recv() {
            left += u64::from(msg.counted);
        }
        if self.kind == Kind::Usage {
            st.stats.discarded += left;
        }
    }
}

/// Aborts the reader task when the subscription ends (it holds the read half).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// CPA's `readRedisSubscriptionCommands`: forwards commands until EOF or an error.
async fn read_commands(
    mut rd: BufReader<OwnedReadHalf>,
    tx: mpsc::Sender<Result<Vec<Vec<u8>>, ReadError>>,
) {
    loop {
        let command = read_command(&mut rd).await;
        let last = command.is_err();
        if tx.send(command).await.is_err() || last {
            return;
        }
    }
}

/// CPA's `handleRedisSubscriptionCommand`: the reply, and whether the connection stays open.
fn subscribed_command(args: &[Vec<u8>], channel: &str) -> (Vec<u8>, bool) {
    let Some(first) = args.first() else {
        return (b"-ERR empty command\r\n".to_vec(), true);
    };
    let cmd = String::from_utf8_lossy(first).trim().to_ascii_uppercase();
    match cmd.as_str() {
        "PING" => {
            let payload = args.get(1).map(Vec::as_slice);
            let frame = match payload {
                Some(p) => pubsub_frame(&[b"pong", p], None),
                None => {
                    let mut out = b"*2\r\n".to_vec();
                    out.extend_from_slice(&bulk(b"pong"));
                    out.extend_from_slice(b"$-1\r\n");
                    out
                }
            };
            (frame, true)
        }
        "UNSUBSCRIBE" => (
            pubsub_frame(&[b"unsubscribe", channel.as_bytes()], Some(0)),
            false,
        ),
        "QUIT" => (b"+OK\r\n".to_vec(), false),
        other => (
            format!("-ERR unknown command '{}'\r\n", other.to_ascii_lowercase()).into_bytes(),
            true,
        ),
    }
}

/// A pub/sub array: the bulk strings, then the subscriber count when there is one.
fn pubsub_frame(parts: &[&[u8]], count: Option<u32>) -> Vec<u8> {
    let len = parts.len() + usize::from(count.is_some());
    let mut out = format!("*{len}\r\n").into_bytes();
    for part in parts {
        out.extend_from_slice(&bulk(part));
    }
    if let Some(n) = count {
        out.extend_from_slice(format!(":{n}\r\n").as_bytes());
    }
    out
}

fn error(msg: &str) -> Action {
    Action::Reply(format!("-{msg}\r\n").into_bytes())
}

impl Shared {
    /// One command, as CPA's `handleRedisConnection` treats it.
    fn command(&self, ip: IpAddr, authed: &mut bool, args: &[Vec<u8>]) -> Action {
        let Some(first) = args.first() else {
            return error("ERR empty command");
        };
        let cmd = String::from_utf8_lossy(first).trim().to_ascii_uppercase();
        if cmd != "AUTH" && !*authed {
            // CPA checks an empty key here: a failed login toward the ban.
            return match self.resp_authenticate(ip, "") {
                Err(msg) if msg.starts_with("IP banned") => error(&format!("ERR {msg}")),
                _ => Action::Reply(NOAUTH.to_vec()),
            };
        }
        match cmd.as_str() {
            "AUTH" => {
                let key = match args.len() {
                    2 => &args[1],
                    3 => &args[2],
                    _ => {
                        return match self.resp_authenticate(ip, "") {
                            Err(msg) if msg.starts_with("IP banned") => {
                                error(&format!("ERR {msg}"))
                            }
                            _ => error("ERR wrong number of arguments for 'auth' command"),
                        };
                    }
                };
                match self.resp_authenticate(ip, &String::from_utf8_lossy(key)) {
                    Ok(()) => {
                        *authed = true;
                        Action::Reply(b"+OK\r\n".to_vec())
                    }
                    Err(msg) => error(&format!("ERR {msg}")),
                }
            }
            "LPOP" | "RPOP" => self.resp_pop(&cmd, args),
            "SUBSCRIBE" => subscribe(args),
            other => error(&format!(
                "ERR unknown command '{}'",
                other.to_ascii_lowercase()
            )),
        }
    }
}

/// `SUBSCRIBE <channel>`: exactly one channel, `usage` or `errors` in any case.
fn subscribe(args: &[Vec<u8>]) -> Action {
    if args.len() != 2 {
        return error("ERR wrong number of arguments for 'subscribe' command");
    }
    let name = String::from_utf8_lossy(&args[1]).trim().to_owned();
    let kind = if name.eq_ignore_ascii_case(USAGE) {
        Kind::Usage
    } else if name.eq_ignore_ascii_case(ERRORS) {
        Kind::Errors
    } else {
        return error(&format!("ERR unsupported channel '{name}'"));
    };
    Action::Subscribe(kind, name)
}

impl Shared {
    /// CPA's management key check (banned, remote, missing, invalid), shared with HTTP. A
    /// success is one bcrypt compare in CPA and is counted in `resp_auths`.
    fn resp_authenticate(&self, ip: IpAddr, key: &str) -> Result<(), String> {
        let now = Instant::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let attempts = st.attempts.entry(ip).or_default();
        if let Some(until) = attempts.banned_until {
            if now < until {
                st.stats.banned_requests += 1;
                return Err(format!(
                    "IP banned due to too many failed attempts. Try again in {}",
                    go_duration(until - now)
                ));
            }
            *attempts = Attempts::default();
        }
        let remote = st.cfg.clients_are_remote || !ip.to_canonical().is_loopback();
        if remote && !st.cfg.allow_remote {
            return Err("remote management disabled".to_owned());
        }
        let msg = if key.is_empty() {
            "missing management key"
        } else if key == st.cfg.management_key {
            st.attempts.remove(&ip);
            st.stats.resp_auths += 1;
            return Ok(());
        } else {
            "invalid management key"
        };
        st.record_failure(ip, now);
        Err(msg.to_owned())
    }

    /// `LPOP|RPOP usage [count]`: both pop the oldest.
    fn resp_pop(&self, cmd: &str, args: &[Vec<u8>]) -> Action {
        if args.len() != 2 && args.len() != 3 {
            return error(&format!(
                "ERR wrong number of arguments for '{}' command",
                cmd.to_ascii_lowercase()
            ));
        }
        let channel = String::from_utf8_lossy(&args[1]).trim().to_owned();
        if !channel.eq_ignore_ascii_case("usage") {
            return error(&format!("ERR unsupported channel '{channel}'"));
        }
        let (count, has_count) = match args.get(2) {
            None => (1, false),
            Some(raw) => (
                String::from_utf8_lossy(raw)
                    .trim()
                    .parse::<i64>()
                    .unwrap_or(0),
                true,
            ),
        };
        if count <= 0 {
            return error("ERR value is not an integer or out of range");
        }
        let mut st = self.lock();
        let delay = match st.fault.clone() {
            Some(Fault::Status(code)) => {
                return error(&format!("ERR simulated fault {code}"));
            }
            Some(Fault::ResetConnection) => return Action::Close,
            Some(Fault::Delay(d)) => Some(d),
            None => None,
        };
        st.expire(Instant::now());
        let items = st.queue.pop(usize::try_from(count).unwrap_or(usize::MAX));
        st.stats.popped += items.len() as u64;
        st.stats.resp_pops += 1;
        drop(st);
        let reply = if has_count {
            array_of_bulk(&items)
        } else {
            match items.first() {
                Some(item) => bulk(raw_payload(item).as_bytes()),
                None => b"$-1\r\n".to_vec(),
            }
        };
        match delay {
            Some(d) => Action::Delayed(d, reply),
            None => Action::Reply(reply),
        }
    }
}

fn bulk(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    out
}

fn array_of_bulk(items: &[String]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", items.len()).into_bytes();
    for item in items {
        out.extend_from_slice(&bulk(raw_payload(item).as_bytes()));
    }
    out
}

enum ReadError {
    /// EOF, a socket error, or a line cut short: CPA just closes.
    Closed,
    /// Not an array of strings: CPA answers `-ERR protocol error` and closes.
    Protocol,
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> ReadError {
        ReadError::Closed
    }
}

/// CPA's `readRESPArray`: `*N` then N bulk strings (or `+`/`:` lines).
async fn read_command<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Vec<Vec<u8>>, ReadError> {
    if r.read_u8().await? != b'*' {
        return Err(ReadError::Protocol);
    }
    let count = atoi(&read_line(r).await?)?;
    if !(0..=MAX_ARGS).contains(&count) {
        return Err(ReadError::Protocol);
    }
    let mut args = Vec::new();
    for _ in 0..count {
        let arg = match r.read_u8().await? {
            b'$' => {
                let len = atoi(&read_line(r).await?)?;
                if len > MAX_BULK {
                    return Err(ReadError::Protocol);
                }
                match usize::try_from(len) {
                    Err(_) => Vec::new(),
                    Ok(len) => {
                        let mut buf = vec![0u8; len + 2];
                        r.read_exact(&mut buf).await?;
                        if !buf.ends_with(b"\r\n") {
                            return Err(ReadError::Protocol);
                        }
                        buf.truncate(len);
                        buf
                    }
                }
            }
            b'+' | b':' => read_line(r).await?,
            _ => return Err(ReadError::Protocol),
        };
        args.push(arg);
    }
    Ok(args)
}

/// One line without its `\n` (and `\r`), at most `MAX_LINE` bytes.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::new();
    (&mut *r)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await?;
    if line.pop() != Some(b'\n') {
        return Err(ReadError::Closed);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

/// Go's `strconv.Atoi`.
fn atoi(line: &[u8]) -> Result<i64, ReadError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ReadError::Protocol)
}
