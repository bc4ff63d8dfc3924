//! Per-key budgets as gauges: the limit, the spend of the current period and its end.

use crate::families::label;
use crate::metrics::LabelOptions;
use crate::store::budget::{Budgets, BUDGET, PERIOD_END, SPENT};

use super::text::{Type, Writer};

/// Nothing is written when no budget is configured.
pub fn encode(w: &mut Writer, budgets: &Budgets, labels: &LabelOptions, now: f64) {
    if budgets.is_empty() {
        return;
    }
    let now = now.floor() as i64;
    let rows: Vec<(&str, &str, f64, f64, i64)> = budgets
        .current(now)
        .map(|(b, spent, end)| {
            let key = labels
                .api_key_aliases
                .get(&b.api_key)
                .map_or(b.api_key.as_str(), String::as_str);
            (key, b.period.as_str(), b.usd, spent, end)
        })
        .collect();
    w.family(
        BUDGET,
        "Configured spend limit of a client API key per UTC day or month (budgets in the config file)",
        None,
        Type::Gauge,
    );
    for &(key, period, usd, _, _) in &rows {
        w.gauge(BUDGET, &[(label::API_KEY, key), ("period", period)], usd);
    }
    w.family(
        SPENT,
        "Estimated spend of the key in the current UTC period, counted from cpa_cost_usd_total's cost since the period began (0 at its start)",
        None,
        Type::Gauge,
    );
    for &(key, period, _, spent, _) in &rows {
        w.gauge(SPENT, &[(label::API_KEY, key), ("period", period)], spent);
    }
    w.family(
        PERIOD_END,
        "When the key's current budget period ends (the spend starts again from 0), Unix seconds",
        Some("seconds"),
        Type::Gauge,
    );
    for &(key, period, _, _, end) in &rows {
        w.gauge(
            PERIOD_END,
            &[(label::API_KEY, key), ("period", period)],
            end as f64,
        );
    }
}
