//! One `/metrics` exposition, written in chunks while it is sent.
//!
//! Memory per scrape is a chunk (plus a series), not the exposition: the [`Sink`] ships its
//! buffer to the output whenever it passes [`CHUNK`] bytes. Stored series are walked a chunk at a
//! time, each time under a fresh read lock ([`Sink::each`]), so the state lock is never held while
//! the output blocks on the network, and the drain loop can apply a batch between two chunks.
//! Each series is read whole under the lock, so a histogram is always consistent in itself.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::Duration;

use super::sink::Sink;
use super::text::{gauge, Format, Type, Writer};
use super::{cpa_view, process, quota, Shared};
use crate::families::meta::store::{BUILD_INFO, LAST_RECORD, LAST_SUCCESS, SERIES, STORE_SIZE};
use crate::families::{label, Family, Kind};
use crate::series::{Exemplars, LabelValues, Value};
use crate::store::{Store, Stored};
use crate::time::unix_now;

/// More labels than any family has.
const MAX_LABELS: usize = 12;

/// Write the whole exposition to `out`, in chunks.
pub fn render(shared: &Shared, format: Format, out: &mut dyn Write) -> io::Result<()> {
    let mut sink = Sink::new(format, out);
    super::encode_live(&mut sink.writer(), &shared.live);
    sink.ship_if_full()?;
    // Taken under the view's lock, rendered without it.
    let cpa = shared.observed.get().snapshot();
    cpa_view::render(&mut sink, &cpa, &shared.view.labels)?;
    sink.ship_if_full()?;
    stored(&mut sink, shared)?;
    process::encode(&mut sink.writer());
    sink.writer().end();
    sink.finish()
}

/// The exposition as one string, for tests and benchmarks (the server streams instead).
pub fn render_to_string(shared: &Shared, format: Format) -> String {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = render(shared, format, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The value shown for a stored series: the one place a scrape reads it. A new series shows
/// zero for the hold, so `rate()` sees its first increment ([`Stored::shown_at`]).
fn shown(stored: &Stored, (now, hold): (f64, Duration)) -> Cow<'_, Value> {
    stored.shown_at(now, hold)
}

/// The stored families and the gauges about the store.
fn stored(sink: &mut Sink, shared: &Shared) -> io::Result<()> {
    {
        let mut w = sink.writer();
        w.declare(&BUILD_INFO);
        w.gauge(
            BUILD_INFO.name,
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                (
                    "revision",
                    option_env!("CPA_EXPORTER_REVISION").unwrap_or("unknown"),
                ),
            ],
            1i64,
        );
        if let Some(t) = shared.live.last_success() {
            gauge(&mut w, &LAST_SUCCESS, t);
        }
        gauge(
            &mut w,
            &STORE_SIZE,
            Store::size_bytes(&shared.view.db_path) as f64,
        );
        let state = shared.committed.read();
        if let Some(t) = state.last_record_timestamp {
            gauge(&mut w, &LAST_RECORD, t);
        }
        w.declare(&SERIES);
        for family in Family::ALL {
            w.gauge(
                SERIES.name,
                &[("family", family.id())],
                state.series_count(family) as i64,
            );
        }
        for (family, n) in crate::ingest::quota::FAMILIES
            .iter()
            .zip(state.quota_series())
        {
            w.gauge(SERIES.name, &[("family", *family)], n as i64);
        }
    }
    let now = unix_now();
    // The hold is judged on the store's clock, which creation times are written with: a wall
    // clock stepped back never holds again a series already shown.
    let clock = {
        let state = shared.committed.read();
        (state.clock.now(), state.new_series_hold)
    };
    for family in Family::ALL {
        stored_family(sink, shared, family, clock)?;
    }
    quota::encode(sink, shared, now)?;
    super::budget::encode(
        &mut sink.writer(),
        &shared.committed.read().budgets,
        &shared.view.labels,
        now,
    );
    Ok(())
}

/// The family's name as OpenMetrics declares it, and its unit.
fn name_and_unit(family: Family) -> (&'static str, Option<&'static str>) {
    let name = family.metric_name();
    let unit = if name.ends_with("_seconds") {
        Some("seconds")
    } else if name.ends_with("_bytes") {
        Some("bytes")
    } else {
        None
    };
    (name, unit)
}

/// The exemplars a series shows: none while it is held at zero, since they would name
/// records its shown counts do not hold yet.
/// `value` is what [`shown`] returned: the stored value itself unless the series is held.
fn shown_exemplars<'s>(stored: &'s Stored, value: &Value) -> Option<&'s Exemplars> {
    std::ptr::eq(value, &stored.value).then_some(&stored.exemplars)
}

fn write_value(
    w: &mut Writer,
    family: Family,
    labels: &[(&str, &str)],
    value: &Value,
    exemplars: Option<&Exemplars>,
) {
    let name = family.metric_name();
    match (value, family.kind()) {
        (Value::Counter(n), _) => match family.output_divisor() {
            Some(d) => w.counter(name, labels, *n as f64 / d),
            None => w.counter_with(name, labels, *n, exemplars.and_then(|e| e.get(0))),
        },
        (Value::Histogram(h), Kind::Histogram(bounds)) => {
            w.histogram(name, labels, bounds, &h.buckets, h.sum, h.count, exemplars)
        }
        (Value::Histogram(_), Kind::Counter) => {}
    }
}

/// Render one stored family. Label options that drop or rename labels merge series, which
/// needs the whole family at once: that projection is computed under the lock into a map of
/// its own (at most the family's series limit), then written out in chunks.
fn stored_family(
    sink: &mut Sink,
    shared: &Shared,
    family: Family,
    clock: (f64, Duration),
) -> io::Result<()> {
    let (name, unit) = name_and_unit(family);
    let ty = match family.kind() {
        Kind::Counter => Type::Counter,
        Kind::Histogram(_) => Type::Histogram,
    };
    sink.writer().family(name, family.help(), unit, ty);
    let names = family.labels();
    let opts = &shared.view.labels;
    if opts.is_identity() {
        return sink.each(
            shared,
            |s| &s.families[family as usize],
            |w, values: &LabelValues, stored| {
                let mut pairs = [("", ""); MAX_LABELS];
                for (slot, (name, value)) in pairs.iter_mut().zip(names.iter().zip(values.iter())) {
                    *slot = (name, value);
                }
                let n = names.len().min(MAX_LABELS);
                let value = shown(stored, clock);
                write_value(
                    w,
                    family,
                    &pairs[..n],
                    &value,
                    shown_exemplars(stored, &value),
                );
            },
        );
    }
    let kept: Vec<(usize, &str)> = names
        .iter()
        .enumerate()
        .filter(|(_, n)| !opts.drop.contains(n))
        .map(|(i, n)| (i, *n))
        .collect();
    let mut projected: BTreeMap<Vec<Box<str>>, (Value, Exemplars)> = BTreeMap::new();
    {
        let state = shared.committed.read();
        for (values, stored) in &state.families[family as usize] {
            let key: Vec<Box<str>> = kept
                .iter()
                .map(|&(i, name)| {
                    let value = &*values[i];
                    let alias = match name {
                        label::API_KEY => opts.api_key_aliases.get(value),
                        label::CREDENTIAL => opts.credential_names.get(value),
                        _ => None,
                    };
                    alias.map_or(value, String::as_str).into()
                })
                .collect();
            let value = shown(stored, clock);
            let exemplars = shown_exemplars(stored, &value);
            let (acc, ex) = projected
                .entry(key)
                .or_insert_with(|| (value.zeroed(), Exemplars::default()));
            acc.merge(&value);
            // Merged series show the latest record of each bucket among them.
            if let Some(e) = exemplars {
                ex.merge(e);
            }
        }
    }
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(kept.len());
    for (values, (value, exemplars)) in &projected {
        pairs.clear();
        pairs.extend(
            kept.iter()
                .map(|(_, n)| *n)
                .zip(values.iter().map(|v| &**v)),
        );
        write_value(&mut sink.writer(), family, &pairs, value, Some(exemplars));
        sink.ship_if_full()?;
    }
    Ok(())
}
