//! Split CPA's queue response (a JSON array) into the texts of its elements, without decoding
//! them, so that one bad element never spoils its batch.
//!
//! serde_json's `Vec<&RawValue>` validates the whole body at once: a single raw control
//! character or a byte that is not UTF-8 in one element made the entire batch unreadable, and
//! the records in it, already removed from CPA's queue, were lost. This scanner only tracks
//! strings (quotes and backslash escapes) and brackets; it keeps no stack and never recurses, so
//! no nesting depth can exhaust it. Each element's text is then decoded on its own, and an
//! element that is broken, not UTF-8 or nested too deep is counted under its own reason.

/// Deepest nesting of objects and arrays accepted in one element. CPA's records nest at most 3
/// deep (`token_breakdown.input`, `response_headers.<name>`); deeper elements are not usage
/// records and are counted as `too_deep` without being decoded.
pub const MAX_ELEMENT_DEPTH: usize = 32;

/// One element of the array: its bytes as sent and how deeply it nests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawElement<'a> {
    pub bytes: &'a [u8],
    /// Greatest depth of objects and arrays inside the element (0 for a scalar).
    pub depth: usize,
}

/// Why a body is not a JSON array at all (nothing in it can be attributed to records).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("it does not start with `[`")]
    NotAnArray,
    #[error("it ends before the array is closed ({0} bytes)")]
    Truncated(usize),
    #[error("unexpected byte {byte:#04x} at offset {offset}")]
    Unexpected { byte: u8, offset: usize },
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while body.get(i).copied().is_some_and(is_ws) {
        i += 1;
    }
    i
}

/// The position after the closing quote of a string whose content starts at `i`.
fn skip_string(body: &[u8], mut i: usize) -> Result<usize, SplitError> {
    loop {
        let rest = body.get(i..).unwrap_or_default();
        match memchr::memchr2(b'"', b'\\', rest) {
            None => return Err(SplitError::Truncated(body.len())),
            Some(p) if rest[p] == b'"' => return Ok(i + p + 1),
            // A backslash escapes the byte after it (for `\u` the rest is plain hex digits).
            Some(p) => i += p + 2,
        }
    }
}

/// Bytes that matter inside an object or array: quotes and brackets.
const STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t
};

/// The next quote or bracket at or after `i` (the end of `body` if none).
fn next_structural(body: &[u8], i: usize) -> usize {
    let rest = body.get(i..).unwrap_or_default();
    i + rest
        .iter()
        .position(|&b| STRUCTURAL[usize::from(b)])
        .unwrap_or(rest.len())
}

/// Scan the value starting at `start` (not whitespace); returns where it ends and its depth.
fn scan_value(body: &[u8], start: usize) -> Result<(usize, usize), SplitError> {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut i = start;
    loop {
        if depth > 0 {
            i = next_structural(body, i);
        }
        let Some(&b) = body.get(i) else {
            // A scalar may end with the body; anything open may not (the caller sees the EOF).
            return if depth == 0 && i > start {
                Ok((i, deepest))
            } else {
                Err(SplitError::Truncated(body.len()))
            };
        };
        match b {
            b'"' => {
                i = skip_string(body, i + 1)?;
                if depth == 0 {
                    return Ok((i, deepest));
                }
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
                i += 1;
            }
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return Ok((i, deepest));
                }
            }
            // The end of a scalar at the top level.
            b'}' | b']' | b',' if depth == 0 && i > start => return Ok((i, deepest)),
            b if depth == 0 && is_ws(b) && i > start => return Ok((i, deepest)),
            b'}' | b']' | b',' if depth == 0 => {
                return Err(SplitError::Unexpected { byte: b, offset: i })
            }
            _ => i += 1,
        }
    }
}

/// The elements of a JSON array body, in order. Whether each element is valid JSON is left to
/// its decoder; only the array's own structure is checked here.
pub fn split_array(body: &[u8]) -> Result<Vec<RawElement<'_>>, SplitError> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'[') {
        return Err(SplitError::NotAnArray);
    }
    i = skip_ws(body, i + 1);
    let mut out = Vec::new();
    if body.get(i) == Some(&b']') {
        i += 1;
    } else {
        loop {
            let (end, depth) = scan_value(body, i)?;
            out.push(RawElement {
                bytes: &body[i..end],
                depth,
            });
            i = skip_ws(body, end);
            match body.get(i) {
                Some(b',') => {
                    i = skip_ws(body, i + 1);
                    if let Some(&b) = body.get(i).filter(|b| **b == b']' || **b == b',') {
                        return Err(SplitError::Unexpected { byte: b, offset: i });
                    }
                }
                Some(b']') => {
                    i += 1;
                    break;
                }
                Some(&byte) => return Err(SplitError::Unexpected { byte, offset: i }),
                None => return Err(SplitError::Truncated(body.len())),
            }
        }
    }
    i = skip_ws(body, i);
    match body.get(i) {
        None => Ok(out),
        Some(&byte) => Err(SplitError::Unexpected { byte, offset: i }),
    }
}

/// Greatest nesting depth of objects and arrays in `bytes`, strings skipped. Never fails: bytes
/// that are not JSON still get a number, and the decoder rejects them afterwards.
pub fn nesting(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut i = 0;
    loop {
        i = next_structural(bytes, i);
        let Some(&b) = bytes.get(i) else {
            break;
        };
        match b {
            b'"' => match skip_string(bytes, i + 1) {
                Ok(end) => {
                    i = end;
                    continue;
                }
                Err(_) => break,
            },
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            _ => depth = depth.saturating_sub(1),
        }
        i += 1;
    }
    deepest
}

/// Receives the elements of a queue response as they arrive, one at a time.
pub trait Sink {
    /// One whole element: its bytes as sent, and how deeply it nests when the transport knows
    /// (the HTTP splitter does; RESP payloads are measured by the receiver).
    fn element(&mut self, bytes: &[u8], depth: Option<usize>);
    /// An element larger than the per-element limit, skipped without being kept.
    fn oversize(&mut self);
}

/// What the incremental splitter expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Whitespace, then `[`.
    Open,
    /// The first element or `]`.
    FirstOrEnd,
    /// An element (after a comma).
    Next,
    /// The rest of the element being read.
    Element,
    /// `,` or `]` after an element.
    After,
    /// Only whitespace until the end.
    Done,
}

/// What kind of value the current element is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Container,
    Str,
    Scalar,
}

/// [`split_array`] over a body that arrives in pieces: each element is handed to a [`Sink`]
/// as soon as its last byte is in, and only the element being read is kept. An element whose
/// bytes exceed `max_element` is skipped (still scanned, never stored) and reported as
/// [`Sink::oversize`], so memory is bounded by the limit, not by the response.
#[derive(Debug)]
pub struct Splitter {
    expect: Expect,
    max_element: usize,
    /// Bytes of the current element that arrived in earlier pieces.
    held: Vec<u8>,
    /// Bytes of the current element so far, kept or not.
    len: usize,
    oversize: bool,
    shape: Shape,
    depth: usize,
    deepest: usize,
    in_string: bool,
    /// The previous piece ended on a backslash inside a string.
    escaped: bool,
    /// Bytes fed before the current piece (for error offsets).
    consumed: usize,
}

impl Splitter {
    pub fn new(max_element: usize) -> Splitter {
        Splitter {
            expect: Expect::Open,
            max_element,
            held: Vec::new(),
            len: 0,
            oversize: false,
            shape: Shape::Scalar,
            depth: 0,
            deepest: 0,
            in_string: false,
            escaped: false,
            consumed: 0,
        }
    }

    /// Feed the next piece of the body. After an error the splitter must not be fed again.
    pub fn feed(&mut self, piece: &[u8], sink: &mut impl Sink) -> Result<(), SplitError> {
        let mut i = 0;
        while i < piece.len() {
            match self.expect {
                Expect::Element => i = self.element(piece, i, sink),
                expect => {
                    i = skip_ws(piece, i);
                    let Some(&b) = piece.get(i) else { break };
                    let unexpected = SplitError::Unexpected {
                        byte: b,
                        offset: self.consumed + i,
                    };
                    match (expect, b) {
                        (Expect::Open, b'[') => {
                            self.expect = Expect::FirstOrEnd;
                            i += 1;
                        }
                        (Expect::Open, _) => return Err(SplitError::NotAnArray),
                        (Expect::FirstOrEnd, b']') | (Expect::After, b']') => {
                            self.expect = Expect::Done;
                            i += 1;
                        }
                        (Expect::After, b',') => {
                            self.expect = Expect::Next;
                            i += 1;
                        }
                        (Expect::FirstOrEnd | Expect::Next, b']' | b',' | b'}') => {
                            return Err(unexpected)
                        }
                        (Expect::FirstOrEnd | Expect::Next, _) => self.start(b),
                        (Expect::After | Expect::Done, _) => return Err(unexpected),
                        (Expect::Element, _) => unreachable!("handled above"),
                    }
                }
            }
        }
        self.consumed += piece.len();
        Ok(())
    }

    /// The body ended: it must have closed the array.
    pub fn finish(&self) -> Result<(), SplitError> {
        match self.expect {
            Expect::Done => Ok(()),
            Expect::Open => Err(SplitError::NotAnArray),
            _ => Err(SplitError::Truncated(self.consumed)),
        }
    }

    fn start(&mut self, first: u8) {
        self.expect = Expect::Element;
        self.len = 0;
        self.oversize = false;
        self.held.clear();
        self.shape = match first {
            b'{' | b'[' => Shape::Container,
            b'"' => Shape::Str,
            _ => Shape::Scalar,
        };
        (self.depth, self.deepest) = (0, 0);
        (self.in_string, self.escaped) = (false, false);
    }

    /// Read the current element from `piece[i..]`; returns where reading stopped.
    fn element(&mut self, piece: &[u8], i: usize, sink: &mut impl Sink) -> usize {
        let (end, done) = self.scan(piece, i);
        let part = &piece[i..end];
        self.len += part.len();
        if !self.oversize && self.len > self.max_element {
            self.oversize = true;
            self.held = Vec::new();
        }
        if done {
            self.expect = Expect::After;
            let depth = Some(self.deepest);
            if self.oversize {
                sink.oversize();
            } else if self.held.is_empty() {
                // The whole element is in this piece: no copy.
                sink.element(part, depth);
            } else {
                self.held.extend_from_slice(part);
                sink.element(&self.held, depth);
                self.held.clear();
            }
        } else if !self.oversize {
            self.held.extend_from_slice(part);
        }
        end
    }

    /// Scan the current element from `i`; returns where it ends (or the end of the piece) and
    /// whether it ended.
    fn scan(&mut self, piece: &[u8], mut i: usize) -> (usize, bool) {
        loop {
            if self.escaped {
                if i >= piece.len() {
                    return (i, false);
                }
                self.escaped = false;
                i += 1;
            }
            if self.in_string {
                let rest = piece.get(i..).unwrap_or_default();
                match memchr::memchr2(b'"', b'\\', rest) {
                    None => return (piece.len(), false),
                    Some(p) if rest[p] == b'"' => {
                        i += p + 1;
                        self.in_string = false;
                        if self.depth == 0 {
                            return (i, true);
                        }
                    }
                    Some(p) => {
                        i += p + 1;
                        self.escaped = true;
                    }
                }
                continue;
            }
            match self.shape {
                Shape::Scalar => {
                    let rest = piece.get(i..).unwrap_or_default();
                    // The first byte belongs to the scalar whatever it is.
                    let from = usize::from(self.len == 0);
                    return match rest
                        .iter()
                        .skip(from)
                        .position(|&b| is_ws(b) || matches!(b, b',' | b']' | b'}'))
                    {
                        Some(p) => (i + from + p, true),
                        None => (piece.len(), false),
                    };
                }
                Shape::Str | Shape::Container => {
                    i = next_structural(piece, i);
                    let Some(&b) = piece.get(i) else {
                        return (piece.len(), false);
                    };
                    i += 1;
                    match b {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => {
                            self.depth += 1;
                            self.deepest = self.deepest.max(self.depth);
                        }
                        _ => {
                            self.depth = self.depth.saturating_sub(1);
                            if self.depth == 0 {
                                return (i, true);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::value::RawValue;

    fn texts(body: &str) -> Vec<&str> {
        split_array(body.as_bytes())
            .unwrap()
            .iter()
            .map(|e| std::str::from_utf8(e.bytes).unwrap())
            .collect()
    }

    #[test]
    fn elements_of_every_kind() {
        assert_eq!(texts("[]"), Vec::<&str>::new());
        assert_eq!(texts(" [ ] \n"), Vec::<&str>::new());
        assert_eq!(
            texts(r#"[{"a":"x,]}\"y"}, "s\\", 12 , -1.5e3,true,null,[1,[2]]]"#),
            [
                r#"{"a":"x,]}\"y"}"#,
                r#""s\\""#,
                "12",
                "-1.5e3",
                "true",
                "null",
                "[1,[2]]"
            ]
        );
        let deep = format!("[{}{},1]", "[".repeat(100_000), "]".repeat(100_000));
        let split = split_array(deep.as_bytes()).unwrap();
        assert_eq!(split[0].depth, 100_000);
        assert_eq!(split[1].depth, 0);
    }

    #[test]
    fn a_broken_element_does_not_spoil_its_neighbours() {
        let body = b"[{\"model\":\"a\x07b\"},{\"model\":\"\xff\"},{\"ok\":1}]";
        let split = split_array(body).unwrap();
        assert_eq!(split.len(), 3);
        assert_eq!(split[2].bytes, br#"{"ok":1}"#);
    }

    #[test]
    fn bodies_that_are_not_arrays() {
        use SplitError::*;
        let err = |b: &str| split_array(b.as_bytes()).unwrap_err();
        assert_eq!(err(""), NotAnArray);
        assert_eq!(err(r#"{"error":"x"}"#), NotAnArray);
        assert!(matches!(err("[1,2"), Truncated(_)));
        assert!(matches!(err(r#"[{"a":"b"#), Truncated(_)));
        assert!(matches!(err(r#"[{"a":1}"#), Truncated(_)));
        assert!(matches!(err("[1,]"), Unexpected { byte: b']', .. }));
        assert!(matches!(err("[,1]"), Unexpected { byte: b',', .. }));
        assert!(matches!(err("[1] x"), Unexpected { byte: b'x', .. }));
        assert!(matches!(err("[1 2]"), Unexpected { byte: b'2', .. }));
    }

    #[test]
    fn nesting_skips_strings() {
        assert_eq!(nesting(br#"{"a":"[[[[","b":[{}]}"#), 3);
        assert_eq!(nesting(b"not json"), 0);
        assert_eq!(nesting(b"]]]{"), 1);
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".*".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".*", inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Collects what a [`Splitter`] hands out.
    #[derive(Default)]
    struct Collect(Vec<Option<(Vec<u8>, Option<usize>)>>);

    impl Sink for Collect {
        fn element(&mut self, bytes: &[u8], depth: Option<usize>) {
            self.0.push(Some((bytes.to_vec(), depth)));
        }
        fn oversize(&mut self) {
            self.0.push(None);
        }
    }

    fn split_in_pieces(body: &[u8], piece: usize, max: usize) -> Result<Collect, SplitError> {
        let mut s = Splitter::new(max);
        let mut out = Collect::default();
        for p in body.chunks(piece.max(1)) {
            s.feed(p, &mut out)?;
        }
        s.finish()?;
        Ok(out)
    }

    #[test]
    fn pieces_of_any_size_give_the_same_elements_and_big_ones_are_skipped() {
        let body = br#" [{"a":"x,]}\"y","b":[1,{"c":2}]}, "s\\", 12 , -1.5e3,true,null,[1,[2]]] "#;
        let whole = split_array(body).unwrap();
        for piece in 1..body.len() + 1 {
            let got = split_in_pieces(body, piece, 1 << 20).unwrap();
            let got: Vec<_> = got.0.into_iter().map(Option::unwrap).collect();
            assert_eq!(got.len(), whole.len(), "piece {piece}");
            for (g, w) in got.iter().zip(&whole) {
                assert_eq!(g.0, w.bytes, "piece {piece}");
                assert_eq!(g.1, Some(w.depth), "piece {piece}");
            }
        }
        // Over the limit: skipped and reported, neighbours intact.
        let big = format!(r#"[{{"a":1}},{{"body":"{}"}},7]"#, "x".repeat(5000));
        for piece in [1, 7, 4096, 1 << 20] {
            let got = split_in_pieces(big.as_bytes(), piece, 1000).unwrap().0;
            assert_eq!(got.len(), 3);
            assert_eq!(got[0].as_ref().unwrap().0, br#"{"a":1}"#);
            assert!(got[1].is_none());
            assert_eq!(got[2].as_ref().unwrap().0, b"7");
        }
    }

    #[test]
    fn pieces_that_are_not_arrays() {
        use SplitError::*;
        let err = |b: &str| split_in_pieces(b.as_bytes(), 3, 1 << 20).err().unwrap();
        assert_eq!(err(""), NotAnArray);
        assert_eq!(err(r#"{"error":"x"}"#), NotAnArray);
        assert!(matches!(err("[1,2"), Truncated(_)));
        assert!(matches!(err(r#"[{"a":"b"#), Truncated(_)));
        assert!(matches!(err("[1,]"), Unexpected { byte: b']', .. }));
        assert!(matches!(err("[,1]"), Unexpected { byte: b',', .. }));
        assert!(matches!(err("[1] x"), Unexpected { byte: b'x', .. }));
        assert!(matches!(err("[1 2]"), Unexpected { byte: b'2', .. }));
    }

    proptest! {
        /// Fed in pieces of any size, the streaming splitter finds what the whole-body one does.
        #[test]
        fn streaming_agrees_with_the_whole_body_splitter(
            items in prop::collection::vec(json_value(), 0..10),
            pretty in any::<bool>(),
            piece in 1usize..64,
        ) {
            let array = serde_json::Value::Array(items);
            let body = if pretty {
                serde_json::to_string_pretty(&array).unwrap()
            } else {
                serde_json::to_string(&array).unwrap()
            };
            let whole = split_array(body.as_bytes()).unwrap();
            let got = split_in_pieces(body.as_bytes(), piece, usize::MAX).unwrap().0;
            prop_assert_eq!(got.len(), whole.len());
            for (g, w) in got.iter().zip(&whole) {
                let g = g.as_ref().unwrap();
                prop_assert_eq!(&g.0[..], w.bytes);
                prop_assert_eq!(g.1, Some(w.depth));
            }
        }

        #[test]
        fn streaming_never_panics_on_array_like_bytes(
            parts in prop::collection::vec(prop_oneof![
                Just(&b"["[..]), Just(&b"]"[..]), Just(&b"{"[..]), Just(&b"}"[..]),
                Just(&b","[..]), Just(&b"\""[..]), Just(&b"\\"[..]), Just(&b" "[..]),
                Just(&b"1"[..]), Just(&b":"[..]), Just(&b"\xff"[..]),
            ], 0..64),
            piece in 1usize..9,
        ) {
            let body: Vec<u8> = std::iter::once(&b"["[..]).chain(parts).flatten().copied().collect();
            let _ = split_in_pieces(&body, piece, 16);
        }

        /// On valid JSON, the scanner finds exactly the elements serde_json finds.
        #[test]
        fn agrees_with_serde_json_on_valid_arrays(
            items in prop::collection::vec(json_value(), 0..10),
            pretty in any::<bool>(),
        ) {
            let array = serde_json::Value::Array(items);
            let body = if pretty {
                serde_json::to_string_pretty(&array).unwrap()
            } else {
                serde_json::to_string(&array).unwrap()
            };
            let expected: Vec<&RawValue> = serde_json::from_str(&body).unwrap();
            let got = split_array(body.as_bytes()).unwrap();
            prop_assert_eq!(got.len(), expected.len());
            for (g, e) in got.iter().zip(&expected) {
                prop_assert_eq!(g.bytes, e.get().as_bytes());
            }
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(elements) = split_array(&body) {
                for e in elements {
                    prop_assert!(e.bytes.len() <= body.len());
                }
            }
            let _ = nesting(&body);
        }

        #[test]
        fn never_panics_on_array_like_bytes(
            parts in prop::collection::vec(prop_oneof![
                Just(&b"["[..]), Just(&b"]"[..]), Just(&b"{"[..]), Just(&b"}"[..]),
                Just(&b","[..]), Just(&b"\""[..]), Just(&b"\\"[..]), Just(&b" "[..]),
                Just(&b"1"[..]), Just(&b":"[..]), Just(&b"\xff"[..]),
            ], 0..64),
        ) {
            let body: Vec<u8> = std::iter::once(&b"["[..]).chain(parts).flatten().copied().collect();
            let _ = split_array(&body);
            let _ = nesting(&body);
        }
    }
}
