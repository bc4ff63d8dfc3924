//! Quota and rate-limit gauges: the latest header values per credential (API.md 2.2).

use super::sink::Sink;
use super::text::Type;
use super::Shared;
use crate::ingest::quota::{Field, Resource, Window};
use crate::metrics::LabelOptions;

pub use crate::families::name::quota::{
    LAST_OBSERVED, LIMIT, REMAINING, RESET, USED_RATIO, WINDOW,
};

struct Gauge {
    name: &'static str,
    help: &'static str,
    unit: Option<&'static str>,
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
        Gauge { name: USED_RATIO, help: "Share of the credential's quota window used (0..1), from the latest response headers", unit: None, by: "window", fields: |w| window(Field::UsedRatio)(w) },
        Gauge { name: WINDOW, help: "Length of the quota window", unit: Some("seconds"), by: "window", fields: |w| window(Field::WindowSeconds)(w) },
        Gauge { name: RESET, help: "When the quota window resets, Unix seconds", unit: Some("seconds"), by: "window", fields: |w| window(Field::ResetTimestamp)(w) },
        Gauge { name: REMAINING, help: "Remaining rate limit reported by the upstream (x-ratelimit-remaining-*)", unit: None, by: "resource", fields: |r| resource(r).map(Field::RateLimitRemaining) },
        Gauge { name: LIMIT, help: "Rate limit reported by the upstream (x-ratelimit-limit-*)", unit: None, by: "resource", fields: |r| resource(r).map(Field::RateLimitLimit) },
    ];
    for g in &gauges {
        let values: &[&str] = if g.by == "window" {
            &WINDOWS
        } else {
            &RESOURCES
        };
        sink.writer().family(g.name, g.help, g.unit, Type::Gauge);
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
                    w.gauge(g.name, &set, *value);
                }
            },
        )?;
    }
    sink.writer().family(
        LAST_OBSERVED,
        "When quota headers were last seen for the credential, Unix seconds",
        Some("seconds"),
        Type::Gauge,
    );
    sink.each(
        shared,
        |s| &s.quota,
        |w, credential, q| {
            if q.observed_at >= cutoff {
                let set = [
                    ("credential", shown(labels, credential)),
                    ("provider", q.provider.as_str()),
                ];
                w.gauge(LAST_OBSERVED, &set, q.observed_at);
            }
        },
    )
}
