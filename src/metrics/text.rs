//! Exposition formats: OpenMetrics 1.0 and Prometheus text 0.0.4, each written directly (no
//! crate writes 0.0.4, and converting one into the other would need the whole body in memory).
//!
//! The [`Writer`] appends to a byte buffer that the caller ships in chunks (see
//! [`super::render`]), so a scrape holds a chunk, never the whole exposition.

use crate::series::{Exemplar, Exemplars};

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Text004,
}

/// The quality a header list gives `wanted` (`None` when it is not listed): the q-value of
/// the most specific matching entry, as RFC 9110 says. `matches` tells how specific an entry
/// is for `wanted`: `Some(n)` with a higher `n` for a more specific match.
fn quality(header: &str, matches: impl Fn(&str) -> Option<u8>) -> Option<f32> {
    let mut best: Option<(u8, f32)> = None;
    for entry in header.split(',') {
        let mut parts = entry.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let Some(specificity) = matches(&name) else {
            continue;
        };
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
        if best.is_none_or(|(s, _)| specificity > s) {
            best = Some((specificity, q));
        }
    }
    best.map(|(_, q)| q)
}

impl Format {
    /// OpenMetrics only when the scraper asks for it with a quality above zero and at least
    /// that of text (as client_golang does); text 0.0.4 otherwise, also for `Accept` lists that
    /// allow neither (an exporter always answers something `curl` can read).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text004;
        };
        let om = quality(accept, |m| {
            (m == "application/openmetrics-text").then_some(2)
        })
        .unwrap_or(0.0);
        let text = quality(accept, |m| match m {
            "text/plain" => Some(2),
            "text/*" => Some(1),
            "*/*" => Some(0),
            _ => None,
        })
        .unwrap_or(0.0);
        if om > 0.0 && om >= text {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Text004 => TEXT_CONTENT_TYPE,
        }
    }
}

/// Whether `Accept-Encoding` allows gzip: listed (or `*`) with a quality above zero.
pub fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    accept_encoding
        .and_then(|a| {
            quality(a, |e| match e {
                "gzip" | "x-gzip" => Some(1),
                "*" => Some(0),
                _ => None,
            })
        })
        .is_some_and(|q| q > 0.0)
}

pub use crate::families::{Meta, Type};

/// A sample value, written the way Prometheus' parsers read it.
#[derive(Debug, Clone, Copy)]
pub enum Num {
    U(u64),
    I(i64),
    F(f64),
}

impl From<u64> for Num {
    fn from(v: u64) -> Num {
        Num::U(v)
    }
}

impl From<i64> for Num {
    fn from(v: i64) -> Num {
        Num::I(v)
    }
}

impl From<f64> for Num {
    fn from(v: f64) -> Num {
        Num::F(v)
    }
}

/// Writes exposition lines in one format into a byte buffer.
///
/// `name` arguments are the family name as OpenMetrics declares it: with a unit suffix
/// (`_seconds`), without `_total`. Counter samples get `_total`; in text 0.0.4 the counter's
/// `# HELP` and `# TYPE` name the `_total` samples too.
pub struct Writer<'a> {
    pub out: &'a mut Vec<u8>,
    pub format: Format,
}

impl Writer<'_> {
    /// The `# HELP`, `# TYPE` and `# UNIT` lines of a family from the table in `families`.
    pub fn declare(&mut self, meta: &Meta) {
        self.family(meta.name, meta.help, meta.unit, meta.ty);
    }

    /// `# HELP`, `# TYPE` and (OpenMetrics only) `# UNIT`.
    pub fn family(&mut self, name: &str, help: &str, unit: Option<&str>, ty: Type) {
        let total = ty == Type::Counter && self.format == Format::Text004;
        for (key, text) in [
            ("# HELP ", help),
            (
                "# TYPE ",
                match ty {
                    Type::Counter => "counter",
                    Type::Gauge => "gauge",
                    Type::Histogram => "histogram",
                },
            ),
        ] {
            self.out.extend_from_slice(key.as_bytes());
            self.out.extend_from_slice(name.as_bytes());
            if total {
                self.out.extend_from_slice(b"_total");
            }
            self.out.push(b' ');
            self.out.extend_from_slice(text.as_bytes());
            self.out.push(b'\n');
        }
        if let (Some(unit), Format::OpenMetrics) = (unit, self.format) {
            self.out.extend_from_slice(b"# UNIT ");
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(b' ');
            self.out.extend_from_slice(unit.as_bytes());
            self.out.push(b'\n');
        }
    }

    /// `name{labels} value` of a gauge.
    pub fn gauge(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Num>) {
        self.sample(name, "", labels, None, value.into());
        self.end_sample();
    }

    /// `name_total{labels} value` of a counter.
    pub fn counter(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Num>) {
        self.counter_with(name, labels, value, None);
    }

    /// A counter sample with, in OpenMetrics only, the exemplar of a recent record.
    pub fn counter_with(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Into<Num>,
        exemplar: Option<&Exemplar>,
    ) {
        self.sample(name, "_total", labels, None, value.into());
        self.exemplar(exemplar);
        self.end_sample();
    }

    /// A classic histogram from per-bucket (not cumulative) counts, the last one `+Inf`:
    /// `_sum`, `_count`, then the cumulative `_bucket`s, as prometheus-client writes them.
    /// In OpenMetrics a bucket carries the exemplar of its slot in `exemplars` (the record
    /// whose value fell in that bucket, not below it).
    #[allow(clippy::too_many_arguments)]
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
        buckets: &[u64],
        sum: f64,
        count: u64,
        exemplars: Option<&Exemplars>,
    ) {
        self.sample(name, "_sum", labels, None, Num::F(sum));
        self.end_sample();
        self.sample(name, "_count", labels, None, Num::U(count));
        self.end_sample();
        let mut cumulative = 0u64;
        let mut le = dtoa::Buffer::new();
        for (i, n) in buckets.iter().enumerate() {
            cumulative = cumulative.saturating_add(*n);
            let bound = match bounds.get(i) {
                Some(b) => le.format(*b),
                None => "+Inf",
            };
            self.sample(name, "_bucket", labels, Some(bound), Num::U(cumulative));
            self.exemplar(exemplars.and_then(|e| e.get(i)));
            self.end_sample();
        }
    }

    /// `# EOF`, the end of an OpenMetrics exposition; nothing in text 0.0.4.
    pub fn end(&mut self) {
        if self.format == Format::OpenMetrics {
            self.out.extend_from_slice(b"# EOF\n");
        }
    }

    /// A sample line up to its value, without the newline, so that an exemplar can follow.
    fn sample(
        &mut self,
        name: &str,
        suffix: &str,
        labels: &[(&str, &str)],
        le: Option<&str>,
        value: Num,
    ) {
        let out = &mut *self.out;
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(suffix.as_bytes());
        let le = le.map(|v| ("le", v));
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(le) {
            out.push(if first { b'{' } else { b',' });
            first = false;
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"=\"");
            escape_into(out, v);
            out.push(b'"');
        }
        if !first {
            out.push(b'}');
        }
        out.push(b' ');
        match value {
            Num::U(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
            Num::I(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
            Num::F(v) if v.is_nan() => out.extend_from_slice(b"NaN"),
            Num::F(v) if v.is_infinite() => {
                out.extend_from_slice(if v > 0.0 { b"+Inf" } else { b"-Inf" })
            }
            Num::F(v) => out.extend_from_slice(dtoa::Buffer::new().format(v).as_bytes()),
        }
    }

    /// ` # {request_id="…"} value timestamp` after a sample, in OpenMetrics only (text 0.0.4
    /// has no exemplars). The id is hex by construction, so it needs no escaping, and its 16
    /// characters at most keep the label set far below OpenMetrics' 128.
    fn exemplar(&mut self, exemplar: Option<&Exemplar>) {
        let (Some(e), Format::OpenMetrics) = (exemplar, self.format) else {
            return;
        };
        let mut f = dtoa::Buffer::new();
        let out = &mut *self.out;
        out.extend_from_slice(b" # {request_id=\"");
        out.extend_from_slice(e.request_id.as_str().as_bytes());
        out.extend_from_slice(b"\"} ");
        out.extend_from_slice(f.format(e.value).as_bytes());
        out.push(b' ');
        out.extend_from_slice(f.format(e.time).as_bytes());
    }

    fn end_sample(&mut self) {
        self.out.push(b'\n');
    }
}

/// A label value with `\`, `"` and newlines escaped (the same rules in both formats).
fn escape_into(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    let mut last = 0;
    for i in memchr::memchr3_iter(b'\\', b'"', b'\n', bytes) {
        out.extend_from_slice(&bytes[last..i]);
        out.extend_from_slice(match bytes[i] {
            b'\\' => b"\\\\",
            b'"' => b"\\\"",
            _ => b"\\n",
        });
        last = i + 1;
    }
    out.extend_from_slice(&bytes[last..]);
}

/// A gauge family of one sample without labels.
pub fn gauge(w: &mut Writer, meta: &Meta, value: f64) {
    w.declare(meta);
    w.gauge(meta.name, &[], value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(format: Format, f: impl FnOnce(&mut Writer)) -> String {
        let mut out = Vec::new();
        f(&mut Writer {
            out: &mut out,
            format,
        });
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn each_format_names_counters_and_units_its_own_way() {
        let both = |w: &mut Writer| {
            w.family("a_requests", "Requests.", None, Type::Counter);
            w.counter("a_requests", &[("x", "1")], 3u64);
            w.family("d_seconds", "Duration.", Some("seconds"), Type::Histogram);
            w.histogram("d_seconds", &[], &[0.5, 1.0], &[1, 0, 2], 4.5, 3, None);
            w.end();
        };
        assert_eq!(
            written(Format::OpenMetrics, both),
            "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 3\n\
             # HELP d_seconds Duration.\n# TYPE d_seconds histogram\n# UNIT d_seconds seconds\n\
             d_seconds_sum 4.5\nd_seconds_count 3\nd_seconds_bucket{le=\"0.5\"} 1\n\
             d_seconds_bucket{le=\"1.0\"} 1\nd_seconds_bucket{le=\"+Inf\"} 3\n# EOF\n"
        );
        assert_eq!(
            written(Format::Text004, both),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 3\n\
             # HELP d_seconds Duration.\n# TYPE d_seconds histogram\n\
             d_seconds_sum 4.5\nd_seconds_count 3\nd_seconds_bucket{le=\"0.5\"} 1\n\
             d_seconds_bucket{le=\"1.0\"} 1\nd_seconds_bucket{le=\"+Inf\"} 3\n"
        );
    }

    #[test]
    fn exemplars_follow_their_sample_in_openmetrics_and_never_appear_in_text() {
        let at = |id: &str, time: f64, value: f64| Exemplar {
            request_id: crate::series::RequestId::parse(id).unwrap(),
            time,
            value,
        };
        let mut hist = Exemplars::default();
        hist.note_observation(&[0.5, 1.0], at("a1b2c3d4", 1_787_409_543.5, 0.25));
        hist.note_observation(&[0.5, 1.0], at("0000beef", 1_787_409_544.0, 42.0));
        let both = |w: &mut Writer| {
            w.counter_with(
                "f",
                &[("code", "429")],
                2u64,
                Some(&at("c0ffee00", 1e9, 1.0)),
            );
            w.histogram("d", &[], &[0.5, 1.0], &[1, 0, 2], 42.75, 3, Some(&hist));
            w.end();
        };
        assert_eq!(
            written(Format::OpenMetrics, both),
            "f_total{code=\"429\"} 2 # {request_id=\"c0ffee00\"} 1.0 1000000000.0\n\
             d_sum 42.75\nd_count 3\n\
             d_bucket{le=\"0.5\"} 1 # {request_id=\"a1b2c3d4\"} 0.25 1787409543.5\n\
             d_bucket{le=\"1.0\"} 1\n\
             d_bucket{le=\"+Inf\"} 3 # {request_id=\"0000beef\"} 42.0 1787409544.0\n# EOF\n"
        );
        assert!(!written(Format::Text004, both).contains('#'));
    }

    #[test]
    fn label_values_are_escaped_and_odd_floats_spelled_out() {
        let text = written(Format::Text004, |w| {
            w.gauge("g", &[("v", "a\"b\\c\nd")], f64::INFINITY);
            w.gauge("g", &[], f64::NAN);
            w.gauge("g", &[], -1i64);
        });
        assert_eq!(text, "g{v=\"a\\\"b\\\\c\\nd\"} +Inf\ng NaN\ng -1\n");
    }

    #[test]
    fn openmetrics_only_when_asked_with_a_quality_above_zero() {
        assert_eq!(Format::negotiate(None), Format::Text004);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text004);
        // What Prometheus 2.x sends.
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text004
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0.2, text/plain;q=0.9")),
            Format::Text004
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text; q=0.5, */*;q=0.1")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn gzip_only_when_allowed() {
        assert!(accepts_gzip(Some("gzip")));
        assert!(accepts_gzip(Some("deflate, gzip;q=0.5")));
        assert!(accepts_gzip(Some("*")));
        assert!(!accepts_gzip(None));
        assert!(!accepts_gzip(Some("gzip;q=0")));
        assert!(!accepts_gzip(Some("gzip;q=0, *")));
        assert!(!accepts_gzip(Some("identity")));
    }
}
