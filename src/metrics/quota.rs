//! Quota and rate-limit gauges: the latest header values per credential (API.md 2.2).

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::config::LabelOptions;
use crate::ingest::quota::{Field, Resource, Window};
use crate::store::State;

pub const USED_RATIO: &str = "cpa_quota_used_ratio";
pub const WINDOW: &str = "cpa_quota_window";
pub const RESET: &str = "cpa_quota_reset_timestamp";
pub const REMAINING: &str = "cpa_ratelimit_remaining";
pub const LIMIT: &str = "cpa_ratelimit_limit";
pub const LAST_OBSERVED: &str = "cpa_quota_last_observed_timestamp";

struct Gauge {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
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

/// Render the quota families. Credentials silent for longer than the retention are hidden.
pub fn encode(
    enc: &mut DescriptorEncoder,
    state: &State,
    labels: &LabelOptions,
    now: f64,
) -> Result<(), std::fmt::Error> {
    let cutoff = now - state.quota_retention.as_secs_f64();
    let live: Vec<(&str, &crate::ingest::QuotaObservation)> = state
        .quota
        .iter()
        .filter(|(_, q)| q.observed_at >= cutoff)
        .map(|(c, q)| {
            let shown = labels
                .credential_names
                .get(c)
                .map_or(c.as_str(), String::as_str);
            (shown, q)
        })
        .collect();
    if live.is_empty() {
        return Ok(());
    }
    let gauges = [
        Gauge { name: USED_RATIO, help: "Share of the credential's quota window used (0..1), from the latest response headers", unit: None, by: "window", fields: |w| window(Field::UsedRatio)(w) },
        Gauge { name: WINDOW, help: "Length of the quota window", unit: Some(Unit::Seconds), by: "window", fields: |w| window(Field::WindowSeconds)(w) },
        Gauge { name: RESET, help: "When the quota window resets, Unix seconds", unit: Some(Unit::Seconds), by: "window", fields: |w| window(Field::ResetTimestamp)(w) },
        Gauge { name: REMAINING, help: "Remaining rate limit reported by the upstream (x-ratelimit-remaining-*)", unit: None, by: "resource", fields: |r| resource(r).map(Field::RateLimitRemaining) },
        Gauge { name: LIMIT, help: "Rate limit reported by the upstream (x-ratelimit-limit-*)", unit: None, by: "resource", fields: |r| resource(r).map(Field::RateLimitLimit) },
    ];
    for g in &gauges {
        let values: &[&str] = if g.by == "window" {
            &WINDOWS
        } else {
            &RESOURCES
        };
        let mut m = enc.encode_descriptor(g.name, g.help, g.unit.as_ref(), MetricType::Gauge)?;
        for (credential, q) in &live {
            for v in values {
                let Some(value) = (g.fields)(v).and_then(|f| q.fields.get(&f)) else {
                    continue;
                };
                let set = [
                    ("credential", *credential),
                    ("provider", q.provider.as_str()),
                    (g.by, v),
                ];
                m.encode_family(&set)?.encode_gauge(value)?;
            }
        }
    }
    let mut m = enc.encode_descriptor(
        LAST_OBSERVED,
        "When quota headers were last seen for the credential, Unix seconds",
        Some(&Unit::Seconds),
        MetricType::Gauge,
    )?;
    for (credential, q) in &live {
        let set = [
            ("credential", *credential),
            ("provider", q.provider.as_str()),
        ];
        m.encode_family(&set)?.encode_gauge(&q.observed_at)?;
    }
    Ok(())
}
