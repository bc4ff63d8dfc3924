//! Per-key budgets as gauges: the limit, the spend of the current period and its end.

use crate::families::label;
use crate::families::meta::budget::{BUDGET, PERIOD_END, SPENT};
use crate::metrics::LabelOptions;
use crate::store::budget::Budgets;

use super::text::Writer;

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
    w.declare(&BUDGET);
    for &(key, period, usd, _, _) in &rows {
        w.gauge(
            BUDGET.name,
            &[(label::API_KEY, key), ("period", period)],
            usd,
        );
    }
    w.declare(&SPENT);
    for &(key, period, _, spent, _) in &rows {
        w.gauge(
            SPENT.name,
            &[(label::API_KEY, key), ("period", period)],
            spent,
        );
    }
    w.declare(&PERIOD_END);
    for &(key, period, _, _, end) in &rows {
        w.gauge(
            PERIOD_END.name,
            &[(label::API_KEY, key), ("period", period)],
            end as f64,
        );
    }
}
