//! The one RESP2 decoder: every byte CPA sends over RESP (the `AUTH` reply, `LPOP` replies,
//! pub/sub pushes) goes through [`next_token`], a pure function over a buffer that never panics,
//! whatever the bytes.
//!
//! A reply is read as a flat stream of tokens (an array is its header, then its items), so a
//! large reply is never held whole: [`Decoder`] reads a socket token by token, holding at most
//! one element, and reads past a bulk string over the element limit without keeping it.
//! [`parse_reply`] builds the tree of a whole reply from the same tokens, within a byte limit.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Arrays nested deeper than this are refused. CPA's replies and pushes nest at most 1 deep.
pub const MAX_DEPTH: usize = 4;
/// Longest status, error or integer line accepted.
pub const MAX_LINE: usize = 4096;
/// Read buffer kept between replies; a larger one (grown by a large element) is released.
const KEEP_BUFFER: usize = 1 << 20;

/// One token of a RESP2 stream, borrowing from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// `+OK`
    Simple(&'a [u8]),
    /// `-ERR ...`
    Error(&'a [u8]),
    /// `:42`
    Integer(i64),
    /// `$5\r\nhello`; `None` is the nil bulk string `$-1`.
    Bulk(Option<&'a [u8]>),
    /// A bulk string longer than the element limit: only its header was consumed (its `len`
    /// bytes and CRLF follow and are read past by [`Decoder`]).
    Oversize(usize),
    /// `*2`: an array header, its items follow as tokens; `None` is the nil array `*-1`.
    Array(Option<usize>),
}

/// What [`next_token`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// A token and the bytes it took.
    Token(Token<'a>, usize),
    /// More bytes are needed: try again once the buffer holds at least this many.
    Need(usize),
}

/// Why bytes are not acceptable RESP2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("the reply does not start like RESP (first byte {0:#04x})")]
    NotResp(u8),
    #[error("unknown RESP type byte {0:#04x}")]
    UnknownType(u8),
    /// A RESP3 type byte: RESP, but not the RESP2 CPA speaks.
    #[error("a RESP3 reply (type byte `{}`), an unexpected reply type", char::from(*.0))]
    Resp3(u8),
    #[error("a line is not terminated by CRLF")]
    BadLineEnd,
    #[error("a line is longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("an invalid integer or length")]
    BadInteger,
    #[error("a bulk string is not followed by CRLF")]
    BadBulkEnd,
    #[error("the reply exceeds {0} bytes")]
    TooLarge(usize),
    #[error("arrays nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("bytes follow the reply")]
    TrailingBytes,
    #[error("an unexpected reply type")]
    UnexpectedReply,
}

pub fn is_type_byte(b: u8) -> bool {
    matches!(b, b'+' | b'-' | b':' | b'$' | b'*')
}

/// The type bytes RESP3 adds (null, double, boolean, blob error, verbatim string, big number,
/// map, set, push, attribute). CPA answers in RESP2 only; a reply starting with one of these
/// comes from a server that speaks RESP3, not from one that does not speak RESP.
pub fn is_resp3_type_byte(b: u8) -> bool {
    matches!(
        b,
        b'_' | b',' | b'#' | b'!' | b'=' | b'(' | b'%' | b'~' | b'>' | b'|'
    )
}

/// The error for a byte where a type byte belongs.
fn not_a_type(b: u8) -> ProtocolError {
    if is_resp3_type_byte(b) {
        ProtocolError::Resp3(b)
    } else {
        ProtocolError::UnknownType(b)
    }
}

/// The token at the start of `buf`. Bulk strings up to `max_bulk` bytes come whole; a longer
/// one comes as [`Token::Oversize`] with only its header consumed. Never panics.
pub fn next_token(buf: &[u8], max_bulk: usize) -> Result<Next<'_>, ProtocolError> {
    let Some(&ty) = buf.first() else {
        return Ok(Next::Need(1));
    };
    if !is_type_byte(ty) {
        return Err(not_a_type(ty));
    }
    let Some((line, next)) = line(buf, 1)? else {
        return Ok(Next::Need(buf.len() + 1));
    };
    let token = match ty {
        b'+' => Token::Simple(line),
        b'-' => Token::Error(line),
        b':' => Token::Integer(parse_int(line)?),
        b'*' => Token::Array(parse_len(line)?),
        _ => match parse_len(line)? {
            None => Token::Bulk(None),
            Some(len) if len > max_bulk => Token::Oversize(len),
            Some(len) => {
                // `len <= max_bulk <= usize::MAX`, but `next + len + 2` may still overflow.
                let too_large = ProtocolError::TooLarge(max_bulk);
                let body_end = next.checked_add(len).ok_or(too_large.clone())?;
                let end = body_end.checked_add(2).ok_or(too_large)?;
                if buf.len() < end {
                    return Ok(Next::Need(end));
                }
                if &buf[body_end..end] != b"\r\n" {
                    return Err(ProtocolError::BadBulkEnd);
                }
                return Ok(Next::Token(Token::Bulk(Some(&buf[next..body_end])), end));
            }
        },
    };
    Ok(Next::Token(token, next))
}

/// The line starting at `start` and the position after its CRLF; `None` while incomplete.
fn line(buf: &[u8], start: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = buf.get(start..).unwrap_or_default();
    let window = &rest[..rest.len().min(MAX_LINE + 1)];
    match window.iter().position(|b| *b == b'\r' || *b == b'\n') {
        Some(i) if window[i] == b'\n' => Err(ProtocolError::BadLineEnd),
        Some(i) => match rest.get(i + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some((&rest[..i], start + i + 2))),
            Some(_) => Err(ProtocolError::BadLineEnd),
        },
        None if window.len() > MAX_LINE => Err(ProtocolError::LineTooLong),
        None => Ok(None),
    }
}

/// `:` integers: an optional `-` and 1 to 19 digits.
fn parse_int(line: &[u8]) -> Result<i64, ProtocolError> {
    let digits = line.strip_prefix(b"-").unwrap_or(line);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ProtocolError::BadInteger);
    }
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtocolError::BadInteger)
}

/// `$` and `*` lengths: `-1` (nil) or 1 to 18 digits.
fn parse_len(line: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if line == b"-1" {
        return Ok(None);
    }
    if line.is_empty() || line.len() > 18 || !line.iter().all(u8::is_ascii_digit) {
        return Err(ProtocolError::BadInteger);
    }
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or(ProtocolError::BadInteger)
}

// ---------------------------------------------------------------------------------------------
// Whole replies
// ---------------------------------------------------------------------------------------------

/// One RESP2 reply, borrowing from the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Integer(i64),
    Bulk(Option<&'a [u8]>),
    Array(Option<Vec<Reply<'a>>>),
}

/// One RESP2 reply, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedReply {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<OwnedReply>>),
}

impl Reply<'_> {
    pub fn to_owned_reply(&self) -> OwnedReply {
        match self {
            Reply::Simple(s) => OwnedReply::Simple(s.to_vec()),
            Reply::Error(s) => OwnedReply::Error(s.to_vec()),
            Reply::Integer(n) => OwnedReply::Integer(*n),
            Reply::Bulk(b) => OwnedReply::Bulk(b.map(<[u8]>::to_vec)),
            Reply::Array(items) => OwnedReply::Array(
                items
                    .as_ref()
                    .map(|items| items.iter().map(Reply::to_owned_reply).collect()),
            ),
        }
    }
}

/// The result of parsing a buffer that may hold only part of a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A whole reply and the number of bytes it took.
    Complete(Reply<'a>, usize),
    /// More bytes are needed: parse again once the buffer holds at least this many.
    Incomplete(usize),
}

/// Arrays being filled while a reply is assembled: the items so far and how many are missing.
struct Open<'a> {
    items: Vec<Reply<'a>>,
    missing: usize,
}

/// Parse one whole reply from the start of `buf` with [`next_token`]. A reply (or the bytes it
/// needs) larger than `max_bytes` is an error, so a caller that reads until
/// [`Parsed::Incomplete`] is satisfied never buffers more than `max_bytes`. Never panics.
pub fn parse_reply(buf: &[u8], max_bytes: usize) -> Result<Parsed<'_>, ProtocolError> {
    match buf.first() {
        None => return Ok(Parsed::Incomplete(1)),
        Some(&b) if is_resp3_type_byte(b) => return Err(ProtocolError::Resp3(b)),
        Some(&b) if !is_type_byte(b) => return Err(ProtocolError::NotResp(b)),
        Some(_) => {}
    }
    let too_large = ProtocolError::TooLarge(max_bytes);
    let mut open: Vec<Open<'_>> = Vec::new();
    let mut pos = 0usize;
    loop {
        let (token, used) = match next_token(&buf[pos..], max_bytes)? {
            Next::Need(n) => {
                let need = pos.checked_add(n).ok_or(too_large.clone())?;
                return if need > max_bytes {
                    Err(too_large)
                } else {
                    Ok(Parsed::Incomplete(need))
                };
            }
            Next::Token(token, used) => (token, used),
        };
        pos += used;
        if pos > max_bytes {
            return Err(too_large);
        }
        let mut done = match token {
            Token::Simple(s) => Reply::Simple(s),
            Token::Error(s) => Reply::Error(s),
            Token::Integer(n) => Reply::Integer(n),
            Token::Bulk(b) => Reply::Bulk(b),
            Token::Oversize(_) => return Err(too_large),
            Token::Array(None) => Reply::Array(None),
            Token::Array(Some(len)) => {
                if open.len() >= MAX_DEPTH {
                    return Err(ProtocolError::TooDeep);
                }
                // Every item takes at least 3 bytes (`+\r\n`): refuse impossible counts before
                // allocating anything for them.
                let least = len
                    .checked_mul(3)
                    .and_then(|n| n.checked_add(pos))
                    .ok_or(too_large.clone())?;
                if least > max_bytes {
                    return Err(too_large);
                }
                if len > 0 {
                    open.push(Open {
                        items: Vec::with_capacity(len.min(1024)),
                        missing: len,
                    });
                    continue;
                }
                Reply::Array(Some(Vec::new()))
            }
        };
        // Hand the finished value to the array around it, closing every array it completes.
        loop {
            let Some(parent) = open.last_mut() else {
                return Ok(Parsed::Complete(done, pos));
            };
            parent.items.push(done);
            parent.missing -= 1;
            if parent.missing > 0 {
                break;
            }
            let Some(full) = open.pop() else {
                break;
            };
            done = Reply::Array(Some(full.items));
        }
    }
}

/// A command as CPA reads it: an array of bulk strings.
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

/// Why reading a token from a socket failed.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// The peer closed the connection.
    Closed,
    Protocol(ProtocolError),
}

impl From<ProtocolError> for ReadError {
    fn from(e: ProtocolError) -> ReadError {
        ReadError::Protocol(e)
    }
}

/// Reads tokens from a socket through [`next_token`], holding at most one element (bulk strings
/// over `max_bulk` are read past in pieces and reported as [`Token::Oversize`]). Tracks where a
/// top-level value ends, so a caller knows whether bytes beyond a reply are CPA speaking out of
/// turn (`LPOP`) or the next push (`SUBSCRIBE`).
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    max_bulk: usize,
    /// Items still missing from each open array, outermost first.
    open: Vec<usize>,
    /// Bytes consumed since the decoder was made (oversize elements included).
    consumed: u64,
}

impl Decoder {
    pub fn new(max_bulk: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            max_bulk,
            open: Vec::new(),
            consumed: 0,
        }
    }

    /// Whether a whole top-level value has been read (nothing of one is pending).
    pub fn at_boundary(&self) -> bool {
        self.open.is_empty()
    }

    /// Whether bytes beyond the tokens read are buffered.
    pub fn has_unread(&self) -> bool {
        self.pos < self.buf.len()
    }

    /// Forget unread bytes and any value in progress, and give back a buffer grown by a large
    /// element (between two replies).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.open.clear();
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
    }

    /// Wait until at least one unread byte is buffered. Cancel-safe: nothing is consumed.
    pub async fn readable<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
    ) -> Result<(), ReadError> {
        if !self.has_unread() {
            self.fill(io, 1).await?;
        }
        Ok(())
    }

    /// The next token, reading from `io` as needed.
    pub async fn next<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
    ) -> Result<Token<'_>, ReadError> {
        loop {
            let first = self.buf.get(self.pos).copied();
            match next_token(&self.buf[self.pos..], self.max_bulk) {
                // The first byte of a value that is not RESP at all: HTTP or TLS answering.
                // (A RESP3 type byte is `Resp3`, which stays a protocol error.)
                Err(ProtocolError::UnknownType(_)) if self.open.is_empty() => {
                    return Err(ProtocolError::NotResp(first.unwrap_or_default()).into())
                }
                Err(e) => return Err(e.into()),
                Ok(Next::Need(n)) => self.fill(io, n).await?,
                Ok(Next::Token(Token::Oversize(len), used)) => {
                    self.pos += used;
                    self.skip(io, len).await?;
                    self.consumed += (used + len + 2) as u64;
                    count(&mut self.open, Token::Oversize(len))?;
                    return Ok(Token::Oversize(len));
                }
                Ok(Next::Token(..)) => break,
            }
        }
        // Parsed again to hand out a borrow (returning the first one from inside the loop that
        // also reads is what the borrow checker cannot follow); a header line is cheap.
        let start = self.pos;
        match next_token(&self.buf[start..], self.max_bulk)? {
            Next::Token(token, used) => {
                self.pos = start + used;
                self.consumed += used as u64;
                count(&mut self.open, token)?;
                Ok(token)
            }
            Next::Need(_) => Err(ProtocolError::UnexpectedReply.into()),
        }
    }

    /// Read until at least `need` unread bytes are buffered, first dropping the bytes used.
    async fn fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        need: usize,
    ) -> Result<(), ReadError> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        while self.buf.len() < need {
            let want = (need - self.buf.len()).clamp(4096, 1 << 20);
            self.buf.reserve(want);
            let n = io.read_buf(&mut self.buf).await.map_err(ReadError::Io)?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
        }
        Ok(())
    }

    /// Read past `len` bytes and the CRLF after them, keeping none of it.
    async fn skip<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        len: usize,
    ) -> Result<(), ReadError> {
        let mut left = len;
        while left > 0 {
            if !self.has_unread() {
                self.buf.clear();
                self.pos = 0;
                self.fill(io, 1).await?;
            }
            let have = (self.buf.len() - self.pos).min(left);
            self.pos += have;
            left -= have;
        }
        if self.buf.len() - self.pos < 2 {
            self.fill(io, 2).await?;
        }
        if &self.buf[self.pos..self.pos + 2] != b"\r\n" {
            return Err(ProtocolError::BadBulkEnd.into());
        }
        self.pos += 2;
        Ok(())
    }

    /// One whole value as a tree, of at most `max_bytes` (the `AUTH` reply, a subscription's
    /// confirmation).
    pub async fn value<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        max_bytes: usize,
    ) -> Result<OwnedReply, ReadError> {
        let mut open: Vec<(Vec<OwnedReply>, usize)> = Vec::new();
        let start = self.consumed;
        loop {
            let token = self.next(io).await?;
            let mut done = match token {
                Token::Simple(s) => OwnedReply::Simple(s.to_vec()),
                Token::Error(s) => OwnedReply::Error(s.to_vec()),
                Token::Integer(n) => OwnedReply::Integer(n),
                Token::Bulk(b) => OwnedReply::Bulk(b.map(<[u8]>::to_vec)),
                Token::Oversize(_) => return Err(ProtocolError::TooLarge(max_bytes).into()),
                Token::Array(None) => OwnedReply::Array(None),
                Token::Array(Some(0)) => OwnedReply::Array(Some(Vec::new())),
                Token::Array(Some(n)) => {
                    if n.saturating_mul(3) > max_bytes {
                        return Err(ProtocolError::TooLarge(max_bytes).into());
                    }
                    open.push((Vec::with_capacity(n.min(64)), n));
                    continue;
                }
            };
            if self.consumed - start > max_bytes as u64 {
                return Err(ProtocolError::TooLarge(max_bytes).into());
            }
            loop {
                let Some((items, missing)) = open.last_mut() else {
                    return Ok(done);
                };
                items.push(done);
                *missing -= 1;
                if *missing > 0 {
                    break;
                }
                let Some((items, _)) = open.pop() else {
                    break;
                };
                done = OwnedReply::Array(Some(items));
            }
        }
    }
}

/// Account a token read against the arrays it belongs to (`open`: items missing per array).
fn count(open: &mut Vec<usize>, token: Token<'_>) -> Result<(), ProtocolError> {
    if let Some(missing) = open.last_mut() {
        *missing = missing.saturating_sub(1);
    }
    if let Token::Array(Some(n)) = token {
        if n > 0 {
            if open.len() >= MAX_DEPTH {
                return Err(ProtocolError::TooDeep);
            }
            open.push(n);
        }
    }
    while open.last() == Some(&0) {
        open.pop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    /// Any reply, nested up to `MAX_DEPTH + 1` arrays (one level more than is accepted).
    fn any_reply() -> impl proptest::strategy::Strategy<Value = OwnedReply> {
        use proptest::prelude::*;
        let line = "[^\r\n]{0,24}".prop_map(String::into_bytes);
        let leaf = prop_oneof![
            line.clone().prop_map(OwnedReply::Simple),
            line.prop_map(OwnedReply::Error),
            any::<i64>().prop_map(OwnedReply::Integer),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(OwnedReply::Bulk),
            Just(OwnedReply::Array(None)),
        ];
        leaf.prop_recursive(MAX_DEPTH as u32 + 1, 48, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(|v| OwnedReply::Array(Some(v)))
        })
    }

    fn encode_reply(reply: &OwnedReply, out: &mut Vec<u8>) {
        match reply {
            OwnedReply::Simple(s) => out.extend([b"+", &s[..], b"\r\n"].concat()),
            OwnedReply::Error(s) => out.extend([b"-", &s[..], b"\r\n"].concat()),
            OwnedReply::Integer(n) => out.extend(format!(":{n}\r\n").into_bytes()),
            OwnedReply::Bulk(None) => out.extend(b"$-1\r\n"),
            OwnedReply::Bulk(Some(b)) => {
                out.extend(format!("${}\r\n", b.len()).into_bytes());
                out.extend(b);
                out.extend(b"\r\n");
            }
            OwnedReply::Array(None) => out.extend(b"*-1\r\n"),
            OwnedReply::Array(Some(items)) => {
                out.extend(format!("*{}\r\n", items.len()).into_bytes());
                for item in items {
                    encode_reply(item, out);
                }
            }
        }
    }

    /// Arrays nested in `reply` (0 for a scalar or a nil array).
    fn arrays_deep(reply: &OwnedReply) -> usize {
        match reply {
            OwnedReply::Array(Some(items)) => 1 + items.iter().map(arrays_deep).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// A reader that hands out its bytes in pieces of the given sizes (cycling), as a socket
    /// does.
    struct Pieces {
        bytes: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let size = self.sizes[self.turn % self.sizes.len()].max(1);
            self.turn += 1;
            let end = (self.at + size)
                .min(self.bytes.len())
                .min(self.at + buf.remaining());
            let at = self.at;
            buf.put_slice(&self.bytes[at..end]);
            self.at = end;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn pieces(bytes: Vec<u8>, sizes: Vec<usize>) -> Pieces {
        Pieces {
            bytes,
            at: 0,
            sizes,
            turn: 0,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_pop_reply_streams_element_by_element_and_skips_one_over_the_limit() {
        let big = "x".repeat(50_000);
        let wire = format!(
            "*3\r\n$7\r\n{{\"a\":1}}\r\n${}\r\n{big}\r\n$1\r\n7\r\n",
            big.len()
        );
        let mut io = pieces(wire.into_bytes(), vec![7, 3000]);
        let mut d = Decoder::new(1000);
        block_on(async {
            assert_eq!(d.next(&mut io).await.unwrap(), Token::Array(Some(3)));
            assert!(!d.at_boundary());
            assert_eq!(
                d.next(&mut io).await.unwrap(),
                Token::Bulk(Some(&br#"{"a":1}"#[..]))
            );
            assert_eq!(d.next(&mut io).await.unwrap(), Token::Oversize(50_000));
            assert!(
                d.buf.capacity() < 10_000,
                "the oversize element was not held"
            );
            assert_eq!(d.next(&mut io).await.unwrap(), Token::Bulk(Some(&b"7"[..])));
            assert!(d.at_boundary() && !d.has_unread());
        });
    }

    #[test]
    fn pushes_follow_each_other_and_http_is_not_resp() {
        let wire = b"*3\r\n$7\r\nmessage\r\n$5\r\nusage\r\n$2\r\n{}\r\n*2\r\n$4\r\npong\r\n$-1\r\n";
        let mut io = pieces(wire.to_vec(), vec![3, 11]);
        let mut d = Decoder::new(MAX);
        block_on(async {
            let first = d.value(&mut io, MAX).await.unwrap();
            let bulk = |s: &[u8]| OwnedReply::Bulk(Some(s.to_vec()));
            assert_eq!(
                first,
                OwnedReply::Array(Some(vec![bulk(b"message"), bulk(b"usage"), bulk(b"{}")]))
            );
            let second = d.value(&mut io, MAX).await.unwrap();
            assert_eq!(
                second,
                OwnedReply::Array(Some(vec![bulk(b"pong"), OwnedReply::Bulk(None)]))
            );
            assert!(matches!(d.next(&mut io).await, Err(ReadError::Closed)));
        });
        let mut io = pieces(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(), vec![64]);
        let mut d = Decoder::new(MAX);
        block_on(async {
            assert!(matches!(
                d.next(&mut io).await,
                Err(ReadError::Protocol(ProtocolError::NotResp(b'H')))
            ));
        });
    }

    proptest::proptest! {
        /// Every reply round-trips, at any cut the parser asks for more (never past the end),
        /// and bytes after a reply are left for the caller to refuse.
        #[test]
        fn any_reply_round_trips_or_is_refused_for_depth(
            reply in any_reply(),
            cut in proptest::prelude::any::<usize>(),
            trailing in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8),
        ) {
            let mut wire = Vec::new();
            encode_reply(&reply, &mut wire);
            let parsed = parse_reply(&wire, MAX);
            if arrays_deep(&reply) > MAX_DEPTH {
                proptest::prop_assert_eq!(parsed, Err(ProtocolError::TooDeep));
                return Ok(());
            }
            match parsed {
                Ok(Parsed::Complete(r, len)) => {
                    proptest::prop_assert_eq!(r.to_owned_reply(), reply.clone());
                    proptest::prop_assert_eq!(len, wire.len());
                }
                other => proptest::prop_assert!(false, "{:?}", other),
            }
            let cut = cut % wire.len();
            match parse_reply(&wire[..cut], MAX) {
                Ok(Parsed::Incomplete(n)) => proptest::prop_assert!(n > cut && n <= wire.len()),
                other => proptest::prop_assert!(false, "cut {}: {:?}", cut, other),
            }
            let mut longer = wire.clone();
            longer.extend(&trailing);
            match parse_reply(&longer, MAX) {
                Ok(Parsed::Complete(_, len)) => proptest::prop_assert_eq!(len, wire.len()),
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }

        /// The streaming decoder reads the same tree from a socket that hands out the bytes
        /// in any pieces, and knows where the reply ends (the trailing bytes stay unread).
        #[test]
        fn the_streaming_decoder_agrees_with_parse_reply_at_any_piece_sizes(
            reply in any_reply(),
            sizes in proptest::collection::vec(1usize..40, 1..6),
        ) {
            let mut wire = Vec::new();
            encode_reply(&reply, &mut wire);
            wire.extend_from_slice(b"+NEXT\r\n");
            let mut d = Decoder::new(MAX);
            let mut io = pieces(wire, sizes);
            let got = block_on(d.value(&mut io, MAX));
            if arrays_deep(&reply) > MAX_DEPTH {
                proptest::prop_assert!(matches!(got, Err(ReadError::Protocol(ProtocolError::TooDeep))), "{:?}", got);
                return Ok(());
            }
            proptest::prop_assert_eq!(got.unwrap(), reply);
            proptest::prop_assert!(d.at_boundary());
            let next = block_on(d.value(&mut io, MAX)).unwrap();
            proptest::prop_assert_eq!(next, OwnedReply::Simple(b"NEXT".to_vec()));
        }

        /// A reader that feeds the parser until it stops asking never holds more than the
        /// limit: the parser refuses instead of asking for more than `max_bytes`.
        #[test]
        fn the_parser_never_asks_for_more_than_the_limit(
            reply in any_reply(),
            max in 0usize..2048,
            cut in proptest::prelude::any::<usize>(),
        ) {
            let mut wire = Vec::new();
            encode_reply(&reply, &mut wire);
            let cut = cut % (wire.len() + 1);
            match parse_reply(&wire[..cut], max) {
                Ok(Parsed::Incomplete(n)) => proptest::prop_assert!(n <= max, "asked {} > {}", n, max),
                Ok(Parsed::Complete(..))
                | Err(ProtocolError::TooLarge(_))
                | Err(ProtocolError::TooDeep) => {}
                Err(e) => proptest::prop_assert!(false, "{}", e),
            }
        }

        #[test]
        fn the_parser_and_the_decoder_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            max in 0usize..300,
        ) {
            let _ = parse_reply(&bytes, 256);
            let mut d = Decoder::new(max);
            let mut io = pieces(bytes, vec![5]);
            block_on(async {
                for _ in 0..64 {
                    if d.next(&mut io).await.is_err() {
                        break;
                    }
                }
            });
        }

        #[test]
        fn arrays_of_bulk_strings_round_trip_at_any_cut(
            items in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48), 0..12),
            cut in proptest::prelude::any::<usize>(),
        ) {
            let args: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
            let wire = encode_command(&args);
            let expected = Reply::Array(Some(items.iter().map(|i| Reply::Bulk(Some(i.as_slice()))).collect()));
            proptest::prop_assert_eq!(parse_reply(&wire, MAX), Ok(Parsed::Complete(expected, wire.len())));
            let cut = cut % wire.len();
            match parse_reply(&wire[..cut], MAX) {
                Ok(Parsed::Incomplete(n)) => proptest::prop_assert!(n > cut && n <= wire.len()),
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }
}
