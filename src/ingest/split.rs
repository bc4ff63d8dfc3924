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

    proptest! {
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
