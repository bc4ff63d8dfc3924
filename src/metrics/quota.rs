//! Quota and rate-limit gauges: the latest header values per credential (API.md 2.2).

use super::sink::Sink;
use super::text::Meta;
use super::Shared;
use crate::ingest::quota::{Field, Resource, Window};
use crate::metrics::LabelOptions;

use crate::families::meta::quota::{LAST_OBSERVED, LIMIT, REMAINING, RESET, USED_RATIO, WINDOW};

struct Gauge {
    meta: Meta,
    /// The second label (`window` or `resource`) and the field it reads, per value of it.
    by: &'static str,
    fields: fn(&str) -> Option<Field>,
}

fn window(f: fn(Window) -> Field) -> impl Fn(&str) -> Option<Field> {
    move |label| Window::ALL.into_iter().find(|w| w.label() == label).map(f)
}

const WINDOWS: [&str; 4] = ["primary", "secondary", "5h", "7d"];
const RESOURCES: [&str; 2] = ["requests", "tokens"];

fn resource(label: &str) -> Option<Resource> {
    [Resource::Requests, Resource::Tokens]
        .into_iter()
        .find(|r| r.label() == label)
}

/// `auth_index`, or its configured display name.
fn shown<'a>(labels: &'a LabelOptions, credential: &'a str) -> &'a str {
    labels
        .credential_names
        .get(credential)
        .map_or(credential, String::as_str)
}

/// Render the quota families, a chunk of credentials at a time. Credentials silent for longer
/// than the retention are hidden.
pub fn encode(sink: &mut Sink, shared: &Shared, now: f64) -> std::io::Result<()> {
    let labels = &shared.view.labels;
    let cutoff = {
        let state = shared.committed.read();
        let cutoff = now - state.quota_retention.as_secs_f64();
        if !state.quota.values().any(|q| q.observed_at >= cutoff) {
            return Ok(());
        }
        cutoff
    };
    let gauges = [
        Gauge {
            meta: USED_RATIO,
            by: "window",
            fields: |w| window(Field::UsedRatio)(w),
        },
        Gauge {
            meta: WINDOW,
            by: "window",
            fields: |w| window(Field::WindowSeconds)(w),
        },
        Gauge {
            meta: RESET,
            by: "window",
            fields: |w| window(Field::ResetTimestamp)(w),
        },
        Gauge {
            meta: REMAINING,
            by: "resource",
            fields: |r| resource(r).map(Field::RateLimitRemaining),
        },
        Gauge {
            meta: LIMIT,
            by: "resource",
            fields: |r| resource(r).map(Field::RateLimitLimit),
        },
    ];
    for g in &gauges {
        let values: &[&str] = if g.by == "window" {
            &WINDOWS
        } else {
            &RESOURCES
        };
        sink.writer().declare(&g.meta);
        sink.each(
            shared,
            |s| &s.quota,
            |w, credential, q| {
                if q.observed_at < cutoff {
                    return;
                }
                for v in values {
                    let Some(value) = (g.fields)(v).and_then(|f| q.fields.get(&f)) else {
                        continue;
                    };
                    let set = [
                        ("credential", shown(labels, credential)),
                        ("provider", q.provider.as_str()),
                        (g.by, v),
                    ];
                    w.gauge(g.meta.name, &set, *value);
                }
            },
        )?;
    }
    sink.writer().declare(&LAST_OBSERVED);
    sink.each(
        shared,
        |s| &s.quota,
        |w, credential, q| {
            if q.observed_at >= cutoff {
                let set = [
                    ("credential", shown(labels, credential)),
                    ("provider", q.provider.as_str()),
                ];
                w.gauge(LAST_OBSERVED.name, &set, q.observed_at);
            }
        },
    )
}
