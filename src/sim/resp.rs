//! The RESP side of the fake CPA's API port (`shared/cpa/API.md` 1.2), following CPA's own
//! handler: the first byte of a connection decides RESP or HTTP (and must arrive within 10 s);
//! `AUTH <key>` / `AUTH <user> <key>` checks the key through the same per-IP failure count and
//! ban as HTTP; any other command before AUTH is a failed login answered `-NOAUTH`;
//! `LPOP`/`RPOP usage [count]` pop the oldest records of the same queue as HTTP.
//!
//! Declared from `server.rs` as its child module (it shares the queue, the ban and the stats).
//! Not simulated: `SUBSCRIBE` push mode (the exporter never subscribes; it answers as an unknown
//! command) and CPA's home mode.

use std::borrow::Cow;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{go_duration, Attempts, Fault, Shared};

/// CPA waits this long for the first byte of a connection.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on what one command may hold (CPA's are a few short strings).
const MAX_LINE: u64 = 64 * 1024;
const MAX_ARGS: i64 = 1024;
const MAX_BULK: i64 = 1024 * 1024;
const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";

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
                wr.write_all(b"-ERR protocol error\r\n").await?;
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
        }
    }
}

enum Action {
    Reply(Vec<u8>),
    /// A `Fault::Delay`: the records are already popped.
    Delayed(Duration, Vec<u8>),
    /// A `Fault::ResetConnection`: nothing popped, no answer.
    Close,
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
            other => error(&format!(
                "ERR unknown command '{}'",
                other.to_ascii_lowercase()
            )),
        }
    }

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

/// The bytes CPA publishes, as RESP sends them. The queue holds each element as the JSON text of
/// the HTTP array, where CPA wraps a payload that is not JSON in a JSON string; over RESP the
/// payload goes out as published.
fn raw_payload(element_json: &str) -> Cow<'_, str> {
    match serde_json::from_str::<String>(element_json) {
        Ok(inner) if serde_json::from_str::<serde::de::IgnoredAny>(&inner).is_err() => {
            Cow::Owned(inner)
        }
        _ => Cow::Borrowed(element_json),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use crate::cpa::resp::{encode_command, parse_reply, OwnedReply, Parsed};
    use crate::sim::{FakeCpa, Fault, SimConfig};

    const KEY: &str = "sim-management-key";

    struct Client {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    impl Client {
        async fn connect(cpa: &FakeCpa) -> Client {
            let addr = cpa.url().trim_start_matches("http://").to_owned();
            Client {
                stream: TcpStream::connect(addr).await.expect("connect"),
                buf: Vec::new(),
            }
        }

        /// Send a command, return its reply (`None`: the connection closed).
        async fn call(&mut self, args: &[&str]) -> Option<OwnedReply> {
            let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            self.stream
                .write_all(&encode_command(&args))
                .await
                .expect("write");
            self.reply().await
        }

        async fn reply(&mut self) -> Option<OwnedReply> {
            loop {
                if let Ok(Parsed::Complete(reply, len)) = parse_reply(&self.buf, 1 << 20) {
                    let owned = reply.to_owned_reply();
                    self.buf.drain(..len);
                    return Some(owned);
                }
                let mut chunk = [0u8; 4096];
                let read =
                    tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk));
                match read.await.expect("reply in time") {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        }
    }

    fn err(text: &str) -> Option<OwnedReply> {
        Some(OwnedReply::Error(text.as_bytes().to_vec()))
    }

    fn bulks(items: &[&str]) -> Option<OwnedReply> {
        Some(OwnedReply::Array(Some(
            items
                .iter()
                .map(|i| OwnedReply::Bulk(Some(i.as_bytes().to_vec())))
                .collect(),
        )))
    }

    async fn start(cfg: SimConfig) -> FakeCpa {
        FakeCpa::start(cfg).await.expect("start")
    }

    #[tokio::test]
    async fn auth_first_and_noauth_counts_toward_the_shared_ban() {
        let cpa = start(SimConfig::default()).await;
        let mut c = Client::connect(&cpa).await;
        assert_eq!(
            c.call(&["PING"]).await,
            err("NOAUTH Authentication required.")
        );
        assert_eq!(
            c.call(&["HELLO", "3"]).await,
            err("NOAUTH Authentication required.")
        );
        assert_eq!(cpa.stats().auth_failures, 2, "NOAUTH is a failed login");
        assert_eq!(
            c.call(&["AUTH", "wrong"]).await,
            err("ERR invalid management key")
        );
        assert_eq!(
            c.call(&["AUTH"]).await,
            err("ERR wrong number of arguments for 'auth' command")
        );
        assert_eq!(cpa.stats().auth_failures, 4);
        // The connection stays usable after a refusal.
        assert_eq!(
            c.call(&["AUTH", "default", KEY]).await,
            Some(OwnedReply::Simple(b"OK".to_vec()))
        );
        let stats = cpa.stats();
        assert_eq!((stats.resp_auths, stats.resp_connections), (1, 1));
        // A success resets the count; five failures from this IP ban it for HTTP too.
        let mut other = Client::connect(&cpa).await;
        for _ in 0..5 {
            assert_eq!(
                other.call(&["PING"]).await,
                err("NOAUTH Authentication required.")
            );
        }
        match other.call(&["AUTH", KEY]).await {
            Some(OwnedReply::Error(e)) => {
                let e = String::from_utf8_lossy(&e).into_owned();
                assert!(
                    e.starts_with("ERR IP banned due to too many failed attempts. Try again in "),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        let http = reqwest::Client::new()
            .get(format!("{}/v0/management/usage-queue", cpa.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("http");
        assert_eq!(http.status(), 403, "the ban is shared with HTTP");
    }

    #[tokio::test]
    async fn lpop_and_rpop_pop_the_oldest_from_the_http_queue() {
        let cpa = start(SimConfig::default()).await;
        for e in [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#] {
            cpa.push_raw(e);
        }
        let mut c = Client::connect(&cpa).await;
        assert_eq!(
            c.call(&["AUTH", KEY]).await,
            Some(OwnedReply::Simple(b"OK".to_vec()))
        );
        assert_eq!(
            c.call(&["LPOP", "usage", "2"]).await,
            bulks(&[r#"{"n":1}"#, r#"{"n":2}"#])
        );
        assert_eq!(
            c.call(&["RPOP", "usage"]).await,
            Some(OwnedReply::Bulk(Some(br#"{"n":3}"#.to_vec())))
        );
        assert_eq!(
            c.call(&["LPOP", "usage"]).await,
            Some(OwnedReply::Bulk(None))
        );
        assert_eq!(c.call(&["lpop", "usage", "100"]).await, bulks(&[]));
        assert_eq!(
            c.call(&["LPOP", "errors", "2"]).await,
            err("ERR unsupported channel 'errors'")
        );
        assert_eq!(
            c.call(&["LPOP", "usage", "x"]).await,
            err("ERR value is not an integer or out of range")
        );
        assert_eq!(
            c.call(&["GET", "k"]).await,
            err("ERR unknown command 'get'")
        );
        let stats = cpa.stats();
        assert_eq!(
            (stats.popped, stats.resp_pops, stats.queue_requests),
            (3, 4, 0),
            "HTTP queue_requests count HTTP pops only"
        );
        assert_eq!((stats.resp_auths, stats.auth_failures), (1, 0));
    }

    #[tokio::test]
    async fn payloads_go_out_as_published() {
        let cpa = start(SimConfig::default()).await;
        // Not JSON: HTTP wraps it in a JSON string, RESP sends the bytes. A JSON string
        // payload (double-encoded record) is JSON, so it goes out as it is on both.
        cpa.push_raw("not json");
        cpa.push_raw(r#""{\"n\":2}""#);
        let mut c = Client::connect(&cpa).await;
        c.call(&["AUTH", KEY]).await;
        assert_eq!(
            c.call(&["LPOP", "usage", "5"]).await,
            bulks(&["not json", r#""{\"n\":2}""#])
        );
    }

    #[tokio::test]
    async fn disabled_resp_answers_like_http_and_disabled_management_closes() {
        let cpa = start(SimConfig {
            resp_enabled: false,
            ..SimConfig::default()
        })
        .await;
        let mut c = Client::connect(&cpa).await;
        c.stream
            .write_all(&encode_command(&[b"AUTH", KEY.as_bytes()]))
            .await
            .unwrap();
        let mut text = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.stream.read_to_end(&mut text)).await;
        assert!(
            text.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&text)
        );
        let stats = cpa.stats();
        assert_eq!((stats.resp_connections, stats.auth_failures), (0, 0));

        let cpa = start(SimConfig::default()).await;
        cpa.set_management_key("");
        let mut c = Client::connect(&cpa).await;
        assert_eq!(c.call(&["AUTH", KEY]).await, None);
    }

    #[tokio::test]
    async fn faults_apply_to_resp_pops() {
        let cpa = start(SimConfig::default()).await;
        cpa.push_raw("1");
        let mut c = Client::connect(&cpa).await;
        c.call(&["AUTH", KEY]).await;
        cpa.set_fault(Some(Fault::ResetConnection));
        assert_eq!(c.call(&["LPOP", "usage", "5"]).await, None);
        assert_eq!(cpa.stats().queued, 1, "a reset pops nothing");
        cpa.set_fault(Some(Fault::Delay(Duration::from_millis(50))));
        let mut c = Client::connect(&cpa).await;
        c.call(&["AUTH", KEY]).await;
        assert_eq!(c.call(&["LPOP", "usage", "5"]).await, bulks(&["1"]));
        cpa.set_fault(None);
        // Not an array: a protocol error, then the connection closes.
        c.stream.write_all(b"$4\r\nPING\r\n").await.unwrap();
        assert_eq!(c.reply().await, err("ERR protocol error"));
        assert_eq!(c.reply().await, None);
    }
}
