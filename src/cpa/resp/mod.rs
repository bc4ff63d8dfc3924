//! RESP transport: one persistent connection to CPA's API port, `AUTH` as the very first command,
//! then `LPOP usage <count>` on every poll (`shared/cpa/API.md` 1.2).
//!
//! Each authenticated HTTP poll costs CPA one bcrypt comparison; over RESP the key is checked
//! once per connection and a pop costs nothing. The client is a deliberately small RESP2 subset:
//! stock Redis clients open with `HELLO`, `PING` or `CLIENT SETINFO`, and CPA counts any command
//! before `AUTH` as a failed login toward its IP ban.
//!
//! Replies are parsed strictly and within limits: [`parse_reply`] is a pure function that never
//! panics, whatever the bytes. The key is written to the socket and nowhere else: errors carry a
//! classification, never the text CPA sent in answer to `AUTH`.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::{classify_auth_message, AuthCause, PopError, Popped, Via};
use crate::cpa::split::Sink;
use crate::secret::Secret;

pub mod decode;

pub use decode::{
    encode_command, parse_reply, Decoder, OwnedReply, Parsed, ProtocolError, ReadError, Reply,
    Token, MAX_DEPTH, MAX_LINE,
};

/// Largest reply accepted to `AUTH` (CPA answers `+OK` or a one-line error).
const AUTH_REPLY_LIMIT: usize = 64 * 1024;
/// Longest piece of CPA's error text kept in a `LPOP` error.
const MAX_ERROR_TEXT: usize = 160;
/// The one queue CPA serves (`LPOP` on any other key: `-ERR unsupported channel`).
const USAGE_KEY: &[u8] = b"usage";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A failed RESP exchange, with the detail transport selection needs.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// Connect, TLS or socket failure (the OS or TLS reason, never data).
    #[error("{0}")]
    Io(String),
    #[error("CPA did not answer within the timeout")]
    Timeout,
    #[error("{}", if *.during_auth {
        "CPA closed the RESP connection without answering AUTH (management disabled, or a CPA whose API port does not speak RESP)"
    } else {
        "CPA closed the RESP connection"
    })]
    Closed { during_auth: bool },
    /// The port answered the first command in something other than RESP (an HTTP 400, a TLS
    /// alert): a CPA without RESP, such as v7.1.17.
    #[error("CPA's API port does not speak RESP (it answered like HTTP or TLS, as v7.1.17 does): set CPA_TRANSPORT=http (or auto), or an https URL if CPA serves TLS")]
    NotResp,
    /// `-ERR unknown command` in answer to AUTH.
    #[error("CPA's RESP endpoint does not know AUTH: set CPA_TRANSPORT=http (or auto)")]
    Unsupported,
    /// `-ERR redis usage output disabled in home mode`.
    #[error("CPA runs in home mode, which serves no usage queue")]
    HomeMode,
    #[error("{0}")]
    Auth(AuthCause),
    /// A `-ERR` in answer to LPOP, sanitized.
    #[error("CPA refused LPOP: {0}")]
    Refused(String),
    /// Malformed, or RESP3 (still RESP: `auto` does not switch to HTTP for it).
    #[error("{}", protocol_text(.0))]
    Protocol(ProtocolError),
}

/// A RESP3 answer is well-formed, just not what CPA sends: say so rather than "malformed".
fn protocol_text(e: &ProtocolError) -> String {
    match e {
        ProtocolError::Resp3(_) => format!(
            "CPA's API port answered with {e}: CPA speaks RESP2, so another server may be listening on its port"
        ),
        _ => format!("CPA's RESP reply is malformed: {e}"),
    }
}

impl RespError {
    /// Whether the answer to AUTH shows that this port does not speak RESP at all, so `auto`
    /// should use HTTP (none of these costs a failed login).
    pub fn means_no_resp(&self) -> bool {
        matches!(
            self,
            RespError::NotResp | RespError::Unsupported | RespError::Closed { during_auth: true }
        )
    }

    fn io(e: io::Error) -> RespError {
        // The innermost cause ("Connection refused (os error 111)") is what an operator can act
        // on; socket errors never contain the bytes written, so the key cannot leak through it.
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        RespError::Io(cause.to_string())
    }
}

impl From<ProtocolError> for RespError {
    fn from(e: ProtocolError) -> RespError {
        match e {
            ProtocolError::NotResp(_) => RespError::NotResp,
            other => RespError::Protocol(other),
        }
    }
}

impl From<RespError> for PopError {
    fn from(e: RespError) -> PopError {
        match e {
            RespError::Io(msg) => PopError::Unreachable(msg),
            RespError::Closed { .. } => PopError::Unreachable(e.to_string()),
            RespError::Timeout => PopError::Timeout,
            RespError::HomeMode => PopError::ManagementDisabled,
            RespError::Auth(cause) => PopError::Auth(cause),
            RespError::Protocol(ProtocolError::TooLarge(n)) => PopError::TooLarge(n),
            RespError::NotResp
            | RespError::Unsupported
            | RespError::Refused(_)
            | RespError::Protocol(_) => PopError::BadReply(e.to_string()),
        }
    }
}

/// The cause of a `-ERR` in answer to AUTH. CPA sends its HTTP error texts (`invalid management
/// key`, `IP banned ... Try again in 29m41s`, ...) after `ERR `; the text itself is not kept.
fn auth_refusal(msg: &[u8]) -> RespError {
    let text = String::from_utf8_lossy(msg).to_ascii_lowercase();
    let text = text.trim();
    let text = text.strip_prefix("err").map_or(text, str::trim_start);
    if text.contains("unknown command") {
        RespError::Unsupported
    } else if text.contains("home mode") {
        RespError::HomeMode
    } else if text.contains("remote management key not set") {
        RespError::Auth(AuthCause::RemoteManagementDisabled)
    } else {
        // Anything else CPA refuses AUTH with counts as a failed login: treat it as a wrong key
        // (status 401), so the ban-safe backoff applies.
        RespError::Auth(classify_auth_message(401, text))
    }
}

/// Printable, bounded CPA error text, with the key removed should CPA ever echo it.
fn sanitize(msg: &[u8], key: &Secret) -> String {
    let mut text: String = String::from_utf8_lossy(msg)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if !key.expose().is_empty() && text.contains(key.expose()) {
        text = text.replace(key.expose(), "<redacted>");
    }
    match text.char_indices().nth(MAX_ERROR_TEXT) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct RespOptions {
    /// CPA base URL (`http://host:port` or `https://host:port`); the path is ignored.
    pub base_url: String,
    pub key: Secret,
    /// Bound of each exchange (connect: at most 10 s of it).
    pub timeout: Duration,
    /// Largest element accepted (the same bound as for HTTP); larger ones are skipped unread
    /// and reported as oversize. The reply itself is streamed.
    pub max_reply_bytes: usize,
}

/// A CPA URL the RESP client cannot use.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("CPA URL `{0}` cannot be used for RESP: {1}")]
    Url(String, String),
    #[error("cannot set up TLS for RESP: {0}")]
    Tls(#[from] rustls::Error),
}

#[derive(Debug, Clone)]
enum Host {
    Name(String),
    Ip(IpAddr),
}

struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// An open, authenticated connection and its decoder.
pub(crate) struct Conn {
    io: Box<dyn Io>,
    dec: Decoder,
}

/// Pops CPA's usage queue over RESP, reconnecting (and re-authenticating) after any failure.
pub struct RespClient {
    host: Host,
    port: u16,
    tls: Option<Tls>,
    key: Secret,
    timeout: Duration,
    max_reply_bytes: usize,
    conn: Option<Conn>,
}

impl RespClient {
    pub fn new(opts: RespOptions) -> Result<RespClient, SetupError> {
        let bad = |why: &str| SetupError::Url(opts.base_url.clone(), why.to_owned());
        let url = reqwest::Url::parse(&opts.base_url).map_err(|e| bad(&e.to_string()))?;
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        // IPv6 literals come bracketed (`[::1]`).
        let host = match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host.to_owned()),
        };
        let tls = match url.scheme() {
            "https" => Some(Tls {
                connector: tls_connector()?,
                name: match &host {
                    Host::Name(n) => {
                        ServerName::try_from(n.clone()).map_err(|e| bad(&e.to_string()))?
                    }
                    Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
                },
            }),
            "http" => None,
            _ => return Err(bad("the scheme must be http or https")),
        };
        Ok(RespClient {
            host,
            port,
            tls,
            key: opts.key,
            timeout: opts.timeout,
            max_reply_bytes: opts.max_reply_bytes,
            conn: None,
        })
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// CPA's error text, printable, bounded and without the key.
    pub(crate) fn sanitize(&self, msg: &[u8]) -> String {
        sanitize(msg, &self.key)
    }

    /// Whether a connection is open and authenticated.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Pop up to `count` elements into `sink`, connecting and authenticating first when needed.
    pub async fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> Result<Popped, PopError> {
        self.try_pop(count, sink).await.map_err(PopError::from)
    }

    /// [`RespClient::pop`] with the RESP-level detail. On any error the connection is dropped;
    /// the next call reconnects. A kept connection that turns out dead (CPA restarted since the
    /// last poll) is replaced at once, once: a new connection costs one AUTH, never a failure.
    pub async fn try_pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> Result<Popped, RespError> {
        let reused = self.conn.is_some();
        let mut delivered = 0usize;
        match self.pop_once(count, sink, &mut delivered).await {
            // Only when nothing was popped on the dead connection: a retry is then harmless.
            Err(RespError::Io(_) | RespError::Closed { during_auth: false })
                if reused && delivered == 0 =>
            {
                debug!("the RESP connection to CPA went away; reconnecting");
                self.pop_once(count, sink, &mut delivered).await
            }
            other => other,
        }
    }

    async fn pop_once<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
        delivered: &mut usize,
    ) -> Result<Popped, RespError> {
        // Take the connection out: it goes back only after a clean exchange, so an error (or a
        // timeout, which drops this future's state) never leaves a half-read stream behind.
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.open().await?,
        };
        let exchange = conn.lpop(count, &self.key, sink, delivered);
        let bytes = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| RespError::Timeout)??;
        self.conn = Some(conn);
        Ok(Popped {
            bytes,
            via: Via::Resp,
            cpa_version: None,
            cpa_commit: None,
        })
    }

    /// Connect (TCP, then TLS for https) and send AUTH as the very first command.
    pub(crate) async fn open(&self) -> Result<Conn, RespError> {
        let connect_timeout = self.timeout.min(Duration::from_secs(10));
        let connect = async {
            match &self.host {
                Host::Name(name) => TcpStream::connect((name.as_str(), self.port)).await,
                Host::Ip(ip) => TcpStream::connect((*ip, self.port)).await,
            }
        };
        let tcp = tokio::time::timeout(connect_timeout, connect)
            .await
            .map_err(|_| RespError::Timeout)?
            .map_err(RespError::io)?;
        // Commands are one small write each; do not let Nagle hold them.
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let handshake = tls.connector.connect(tls.name.clone(), tcp);
                Box::new(
                    tokio::time::timeout(connect_timeout, handshake)
                        .await
                        .map_err(|_| RespError::Timeout)?
                        .map_err(RespError::io)?,
                )
            }
        };
        let mut conn = Conn::new(io, self.max_reply_bytes);
        conn.auth(&self.key, self.timeout).await?;
        debug!(
            port = self.port,
            tls = self.tls.is_some(),
            "RESP connection to CPA authenticated"
        );
        Ok(conn)
    }
}

impl From<ReadError> for RespError {
    fn from(e: ReadError) -> RespError {
        match e {
            ReadError::Io(e) => RespError::io(e),
            ReadError::Closed => RespError::Closed { during_auth: false },
            ReadError::Protocol(p) => p.into(),
        }
    }
}

impl Conn {
    pub(crate) fn new(io: Box<dyn Io>, max_element: usize) -> Conn {
        Conn {
            io,
            dec: Decoder::new(max_element),
        }
    }

    async fn auth(&mut self, key: &Secret, timeout: Duration) -> Result<(), RespError> {
        let command = encode_command(&[b"AUTH", key.expose().as_bytes()]);
        let reply = self
            .request(&command, timeout, AUTH_REPLY_LIMIT)
            .await
            .map_err(|e| match e {
                RespError::Closed { .. } => RespError::Closed { during_auth: true },
                other => other,
            })?;
        match reply {
            OwnedReply::Simple(s) if s.eq_ignore_ascii_case(b"OK") => Ok(()),
            OwnedReply::Error(msg) => Err(auth_refusal(&msg)),
            _ => Err(RespError::Protocol(ProtocolError::UnexpectedReply)),
        }
    }

    /// Write one command.
    pub(crate) async fn send(&mut self, args: &[&[u8]]) -> Result<(), RespError> {
        self.io
            .write_all(&encode_command(args))
            .await
            .map_err(RespError::io)?;
        self.io.flush().await.map_err(RespError::io)
    }

    /// `LPOP usage <count>`, handing each element to `sink` as it arrives: only the element
    /// being read is held (a larger one than the decoder's limit is read past and reported as
    /// oversize). Returns the bytes of the elements. `delivered` counts elements handed over,
    /// which stay popped whatever happens next.
    async fn lpop<K: Sink + Send>(
        &mut self,
        count: usize,
        key: &Secret,
        sink: &mut K,
        delivered: &mut usize,
    ) -> Result<u64, RespError> {
        let count = count.max(1).to_string();
        self.send(&[b"LPOP", USAGE_KEY, count.as_bytes()]).await?;
        self.dec.reset();
        let elements = match self.dec.next(&mut self.io).await? {
            Token::Array(n) => n.unwrap_or_default(),
            Token::Bulk(None) => 0,
            Token::Bulk(Some(bytes)) => {
                sink.element(bytes, None);
                *delivered += 1;
                let len = bytes.len() as u64;
                return self.end_of_reply(len);
            }
            Token::Oversize(len) => {
                sink.oversize();
                *delivered += 1;
                return self.end_of_reply(len as u64);
            }
            Token::Error(msg) => return Err(pop_refusal(msg, key)),
            Token::Simple(_) | Token::Integer(_) => {
                return Err(ProtocolError::UnexpectedReply.into())
            }
        };
        let mut total = 0u64;
        for _ in 0..elements {
            match self.dec.next(&mut self.io).await? {
                Token::Bulk(Some(bytes)) => {
                    sink.element(bytes, None);
                    total += bytes.len() as u64;
                }
                Token::Oversize(len) => {
                    sink.oversize();
                    total += len as u64;
                }
                _ => return Err(ProtocolError::UnexpectedReply.into()),
            }
            *delivered += 1;
        }
        self.end_of_reply(total)
    }

    /// One command, one reply: anything after it is not CPA speaking.
    fn end_of_reply(&mut self, bytes: u64) -> Result<u64, RespError> {
        if !self.dec.at_boundary() || self.dec.has_unread() {
            return Err(ProtocolError::TrailingBytes.into());
        }
        // A large element grew the buffer: give the memory back between polls.
        self.dec.reset();
        Ok(bytes)
    }

    /// Write one command and read its reply (at most `max_bytes`), both within `timeout`.
    async fn request(
        &mut self,
        command: &[u8],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<OwnedReply, RespError> {
        let exchange = async {
            self.io.write_all(command).await.map_err(RespError::io)?;
            self.io.flush().await.map_err(RespError::io)?;
            self.dec.reset();
            let reply = self.dec.value(&mut self.io, max_bytes).await?;
            // One command, one reply: anything after it is not CPA speaking.
            if self.dec.has_unread() {
                return Err(ProtocolError::TrailingBytes.into());
            }
            Ok(reply)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RespError::Timeout)?
    }

    /// The next whole value CPA pushes (subscriptions), of at most `max_bytes`.
    pub(crate) async fn value(&mut self, max_bytes: usize) -> Result<OwnedReply, RespError> {
        Ok(self.dec.value(&mut self.io, max_bytes).await?)
    }

    /// Wait until CPA has sent something. Cancel-safe: nothing is consumed.
    pub(crate) async fn readable(&mut self) -> Result<(), RespError> {
        Ok(self.dec.readable(&mut self.io).await?)
    }

    /// The next token of what CPA pushes.
    pub(crate) async fn token(&mut self) -> Result<Token<'_>, RespError> {
        Ok(self.dec.next(&mut self.io).await?)
    }
}

/// The cause of a `-ERR` in answer to LPOP.
fn pop_refusal(msg: &[u8], key: &Secret) -> RespError {
    let lower = String::from_utf8_lossy(msg).to_ascii_lowercase();
    if lower.starts_with("noauth") {
        // CPA forgot the connection's AUTH: a fresh connection authenticates again.
        RespError::Closed { during_auth: false }
    } else if lower.contains("banned") {
        auth_refusal(msg)
    } else {
        RespError::Refused(sanitize(msg, key))
    }
}

fn tls_connector() -> Result<TlsConnector, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const MAX: usize = 1 << 20;

    fn complete(buf: &[u8]) -> Reply<'_> {
        match parse_reply(buf, MAX) {
            Ok(Parsed::Complete(r, len)) => {
                assert_eq!(len, buf.len());
                r
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_what_cpa_sends() {
        assert_eq!(complete(b"+OK\r\n"), Reply::Simple(b"OK"));
        assert_eq!(
            complete(b"-ERR invalid management key\r\n"),
            Reply::Error(b"ERR invalid management key")
        );
        assert_eq!(complete(b"*0\r\n"), Reply::Array(Some(vec![])));
        assert_eq!(complete(b"*-1\r\n"), Reply::Array(None));
        assert_eq!(complete(b"$-1\r\n"), Reply::Bulk(None));
        assert_eq!(complete(b":-7\r\n"), Reply::Integer(-7));
        assert_eq!(
            complete(b"*2\r\n$7\r\n{\"a\":1}\r\n$0\r\n\r\n"),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"{\"a\":1}")),
                Reply::Bulk(Some(b""))
            ]))
        );
        // Binary-safe: CR and LF inside a bulk string are data.
        assert_eq!(complete(b"$4\r\na\r\nb\r\n"), Reply::Bulk(Some(b"a\r\nb")));
    }

    #[test]
    fn partial_replies_say_how_much_more_is_needed() {
        let full = b"*2\r\n$3\r\nabc\r\n$5\r\nhello\r\n";
        for cut in 0..full.len() {
            match parse_reply(&full[..cut], MAX) {
                Ok(Parsed::Incomplete(n)) => assert!(n > cut && n <= full.len(), "{cut}: {n}"),
                other => panic!("{cut}: {other:?}"),
            }
        }
        assert_eq!(parse_reply(b"$100\r\n", MAX), Ok(Parsed::Incomplete(108)));
    }

    #[test]
    fn garbage_and_abuse_are_refused() {
        use ProtocolError::*;
        let err = |b: &[u8]| parse_reply(b, 64).unwrap_err();
        assert_eq!(err(b"HTTP/1.1 400 Bad Request\r\n"), NotResp(b'H'));
        assert_eq!(err(b"*1\r\n?\r\n"), UnknownType(b'?'));
        assert_eq!(err(b"%1\r\n+a\r\n+b\r\n"), Resp3(b'%'));
        assert_eq!(err(b"*1\r\n,1.5\r\n"), Resp3(b','));
        assert_eq!(err(b"+OK\n"), BadLineEnd);
        assert_eq!(err(b"+OK\rX"), BadLineEnd);
        assert_eq!(err(b"$3\r\nabcXY"), BadBulkEnd);
        assert_eq!(err(b"$-2\r\n"), BadInteger);
        assert_eq!(err(b"$+3\r\n"), BadInteger);
        assert_eq!(err(b":12a\r\n"), BadInteger);
        assert_eq!(err(b":-\r\n"), BadInteger);
        assert_eq!(err(b"$999999999999999999\r\n"), TooLarge(64));
        assert_eq!(err(b"*1000\r\n"), TooLarge(64));
        assert_eq!(err(b"$60\r\n"), TooLarge(64));
        assert_eq!(err(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n"), TooDeep);
        let long = [b"+".as_slice(), &[b'a'; MAX_LINE + 1]].concat();
        assert_eq!(parse_reply(&long, MAX).unwrap_err(), LineTooLong);
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            encode_command(&[b"LPOP", b"usage", b"10"]),
            b"*3\r\n$4\r\nLPOP\r\n$5\r\nusage\r\n$2\r\n10\r\n"
        );
    }

    #[test]
    fn auth_errors_map_to_causes() {
        let cause = |m: &str| match auth_refusal(m.as_bytes()) {
            RespError::Auth(c) => Some(c),
            _ => None,
        };
        assert_eq!(
            cause("ERR invalid management key"),
            Some(AuthCause::WrongKey)
        );
        assert_eq!(
            cause("ERR missing management key"),
            Some(AuthCause::MissingKey)
        );
        assert_eq!(
            cause("ERR remote management disabled"),
            Some(AuthCause::RemoteManagementDisabled)
        );
        assert_eq!(
            cause("ERR IP banned due to too many failed attempts. Try again in 29m41s"),
            Some(AuthCause::IpBanned {
                retry_after: Some(Duration::from_secs(29 * 60 + 41))
            })
        );
        assert_eq!(cause("ERR something new"), Some(AuthCause::WrongKey));
        assert!(matches!(
            auth_refusal(b"ERR unknown command 'auth'"),
            RespError::Unsupported
        ));
        assert!(matches!(
            auth_refusal(b"ERR redis usage output disabled in home mode"),
            RespError::HomeMode
        ));
    }

    #[test]
    fn error_text_is_bounded_and_never_holds_the_key() {
        let key = Secret::new("sekrit-key");
        let s = sanitize(b"ERR odd sekrit-key\r\n\x07", &key);
        assert_eq!(s, "ERR odd <redacted>???");
        assert!(sanitize(&[b'x'; 1000], &key).len() <= MAX_ERROR_TEXT + 3);
    }

    #[test]
    fn urls_give_host_port_and_tls() {
        let client = |url: &str| {
            RespClient::new(RespOptions {
                base_url: url.into(),
                key: Secret::new("k"),
                timeout: Duration::from_secs(1),
                max_reply_bytes: MAX,
            })
        };
        let c = client("http://127.0.0.1:8317").unwrap();
        assert_eq!((c.port, c.tls.is_some()), (8317, false));
        let c = client("https://cpa.example.com").unwrap();
        assert_eq!((c.port, c.tls.is_some()), (443, true));
        let c = client("https://[::1]:9000").unwrap();
        assert!(matches!(c.host, Host::Ip(IpAddr::V6(_))));
        assert!(client("ftp://x").is_err());
    }

    /// A scripted server: answers each command with the next canned reply, records commands.
    async fn scripted(replies: Vec<&'static [u8]>) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
                s.write_all(reply).await.unwrap();
            }
            seen
        });
        (url, task)
    }

    /// What a pop handed over: payloads, `None` for an element over the limit.
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

    fn client(url: &str) -> RespClient {
        RespClient::new(RespOptions {
            base_url: url.into(),
            key: Secret::new("the-key"),
            timeout: Duration::from_secs(2),
            max_reply_bytes: MAX,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn auth_first_then_lpop_on_the_same_connection() {
        let (url, server) =
            scripted(vec![b"+OK\r\n", b"*2\r\n$1\r\n1\r\n$1\r\n2\r\n", b"*0\r\n"]).await;
        let mut c = client(&url);
        let mut got = Got::default();
        let p = c.try_pop(5, &mut got).await.unwrap();
        assert_eq!(got.0, [Some(b"1".to_vec()), Some(b"2".to_vec())]);
        assert_eq!(p.via, Via::Resp);
        let mut got = Got::default();
        c.try_pop(5, &mut got).await.unwrap();
        assert!(got.0.is_empty());
        let seen = server.await.unwrap();
        assert!(seen.starts_with(b"*2\r\n$4\r\nAUTH\r\n$7\r\nthe-key\r\n*3\r\n$4\r\nLPOP\r\n"));
    }

    /// A server that answers AUTH, then writes `reply` to LPOP a few bytes at a time.
    async fn trickling(reply: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"+OK\r\n").await.unwrap();
            let _ = s.read(&mut buf).await.unwrap();
            for piece in reply.chunks(7) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
            }
            let _ = s.read(&mut buf).await;
        });
        url
    }

    #[tokio::test]
    async fn elements_are_streamed_and_one_over_the_limit_is_skipped_not_fatal() {
        let big = "x".repeat(5000);
        let reply = format!(
            "*3\r\n$7\r\n{{\"a\":1}}\r\n${}\r\n{big}\r\n$1\r\n7\r\n",
            big.len()
        );
        let mut c = client(&trickling(reply.into_bytes()).await);
        c.max_reply_bytes = 1000;
        let mut got = Got::default();
        let p = c.try_pop(3, &mut got).await.unwrap();
        assert_eq!(
            got.0,
            [Some(br#"{"a":1}"#.to_vec()), None, Some(b"7".to_vec())]
        );
        assert_eq!(p.bytes, 7 + 5000 + 1);
        assert!(
            c.is_connected(),
            "the connection is kept after a skipped element"
        );
    }

    #[tokio::test]
    async fn elements_before_a_broken_reply_are_handed_over() {
        let reply = b"*3\r\n$1\r\na\r\n$1\r\nbXX".to_vec();
        let mut c = client(&trickling(reply).await);
        let mut got = Got::default();
        let e = c.try_pop(3, &mut got).await.unwrap_err();
        assert!(
            matches!(e, RespError::Protocol(ProtocolError::BadBulkEnd)),
            "{e}"
        );
        assert_eq!(got.0, [Some(b"a".to_vec())]);
        assert!(!c.is_connected());
    }

    #[tokio::test]
    async fn an_http_answer_means_no_resp() {
        let (url, _server) = scripted(vec![
            b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n",
        ])
        .await;
        let e = client(&url)
            .try_pop(1, &mut Got::default())
            .await
            .unwrap_err();
        assert!(e.means_no_resp(), "{e}");
    }

    #[tokio::test]
    async fn a_resp3_answer_is_named_as_such_and_is_still_resp() {
        let cases: [Vec<&'static [u8]>; 4] = [
            vec![b"%1\r\n+server\r\n+redis\r\n"],
            vec![b"_\r\n"],
            vec![b"|1\r\n+ttl\r\n:3\r\n+OK\r\n"],
            // AUTH in RESP2, then the pop's answer in RESP3.
            vec![b"+OK\r\n", b"~1\r\n$1\r\na\r\n"],
        ];
        for script in cases {
            let (url, _server) = scripted(script).await;
            let e = client(&url)
                .try_pop(1, &mut Got::default())
                .await
                .unwrap_err();
            let text = e.to_string();
            assert!(text.contains("RESP3"), "{text}");
            assert!(!text.contains("HTTP") && !text.contains("TLS"), "{text}");
            assert!(!e.means_no_resp(), "{text}");
        }
    }

    #[tokio::test]
    async fn a_refused_key_is_an_auth_error_without_the_key() {
        let (url, _server) = scripted(vec![b"-ERR invalid management key\r\n"]).await;
        let mut c = client(&url);
        let e = c.pop(1, &mut Got::default()).await.unwrap_err();
        assert!(matches!(e, PopError::Auth(AuthCause::WrongKey)), "{e}");
        assert!(!e.to_string().contains("the-key"));
        assert!(!c.is_connected());
    }

    #[tokio::test]
    async fn a_connection_closed_since_the_last_poll_is_replaced_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut auths = 0;
            for batch in [&b"*1\r\n$1\r\na\r\n"[..], b"*1\r\n$1\r\nb\r\n"] {
                let (mut s, _) = listener.accept().await.unwrap();
                for reply in [&b"+OK\r\n"[..], batch] {
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap();
                    auths += usize::from(buf[..n].starts_with(b"*2\r\n$4\r\nAUTH"));
                    s.write_all(reply).await.unwrap();
                }
                // CPA restarts: the connection closes between two polls.
            }
            auths
        });
        let mut c = client(&url);
        for want in [b"a", b"b"] {
            let mut got = Got::default();
            c.try_pop(1, &mut got).await.unwrap();
            assert_eq!(got.0, [Some(want.to_vec())]);
        }
        assert_eq!(server.await.unwrap(), 2, "one AUTH per connection");
    }

    #[tokio::test]
    async fn tls_to_a_plain_port_is_an_io_error() {
        let (url, _server) = scripted(vec![b"HTTP/1.1 400 Bad Request\r\n\r\n"]).await;
        let e = client(&url.replace("http://", "https://"))
            .try_pop(1, &mut Got::default())
            .await
            .unwrap_err();
        assert!(matches!(e, RespError::Io(_)), "{e}");
    }

    #[tokio::test]
    async fn unreachable_and_timeouts() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = client(&format!("http://127.0.0.1:{port}"))
            .pop(1, &mut Got::default())
            .await
            .unwrap_err();
        assert_eq!(e.result_label(), "unreachable");
        // A server that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let _hold = tokio::spawn(async move {
            let _conn = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let mut c = client(&url);
        c.timeout = Duration::from_millis(200);
        assert!(matches!(
            c.pop(1, &mut Got::default()).await,
            Err(PopError::Timeout)
        ));
    }
}
