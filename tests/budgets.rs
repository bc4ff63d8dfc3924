//! Budgets and subscription ends against the fake CPA, with exact values: the budget gauges
//! carry the configured amounts under the key's shown label (alias or display hash), the spend
//! is the priced cost of the key's records in the current UTC period and survives a restart,
//! and a codex credential's `id_token` subscription end is exported without the account id.

mod common;

use std::ops::Not;
use std::time::Duration;

use common::*;
use cpa_usage_exporter::labels::api_key_label;
use fake_cpa::{FakeCpa, SimConfig, SimCredential};

const KEY: &str = "budget-test-key";

/// A priced record of `round-gpt` for client key `api_key`: 800 input, 200 cache read, 200
/// output and 100 reasoning tokens = 0.0047 USD at the prices below. Timed a second ago: spend
/// belongs to the period in which the request started.
fn record(api_key: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let at = fake_cpa::workload::rfc3339_nano(now - 1.0);
    format!(
        r#"{{"timestamp":"{at}","provider":"codex","model":"round-gpt",
            "auth_index":"feedfacefeedface","api_key":"{api_key}","failed":false,
            "tokens":{{"input_tokens":1000,"cached_tokens":200,"cache_read_tokens":200,
            "output_tokens":300,"reasoning_tokens":100,"total_tokens":1300}}}}"#
    )
}

fn next_utc_midnight() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (now / 86_400 + 1) as f64 * 86_400.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_and_subscription_gauges_have_exact_values() {
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.into(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    cpa.set_credentials(vec![
        SimCredential::new("codex", "aa11aa11aa11aa11", "alice@example.com")
            .subscription_until("2026-12-24T00:00:00Z"),
        SimCredential::new("claude", "bb22bb22bb22bb22", "bob@example.com"),
    ]);
    for _ in 0..3 {
        cpa.push_raw(&record("sk-team-a"));
    }
    cpa.push_raw(&record("sk-team-b"));
    cpa.push_raw(&record("sk-no-budget"));

    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.yaml");
    std::fs::write(
        &prices,
        "models:\n  round-gpt: { input: 2, cache_read: 0.5, output: 10 }\n",
    )
    .unwrap();
    let config = dir.path().join("config.yaml");
    let team_b = api_key_label("sk-team-b");
    std::fs::write(
        &config,
        format!(
            "labels:\n  api-key-aliases:\n    sk-team-a: team-a\nbudgets:\n  - {{ api-key: team-a, usd: 0.02, period: day }}\n  - {{ api-key: sk-team-a, usd: 3, period: month }}\n  - {{ api-key: '{team_b}', usd: 0.5, period: day }}\n"
        ),
    )
    .unwrap();
    let setup = Setup::in_dir(&cpa, KEY, &dir, "exporter")
        .with_env("CPA_EXPORTER_PRICES_FILE", prices.display().to_string())
        .with_env("CPA_EXPORTER_CONFIG", config.display().to_string())
        .with_env("CPA_EXPORTER_CREDENTIALS_INTERVAL", "5s");
    let exporter = Exporter::spawn(&setup);
    let m = drained(&exporter, &cpa, 5.0).await;

    let day = [("period", "day")];
    let value = |m: &Metrics, name: &str, key: &str, period: &str| {
        m.sum(name, &[("api_key", key), ("period", period)])
    };
    assert_eq!(value(&m, "cpa_budget_usd", "team-a", "day"), 0.02);
    assert_eq!(value(&m, "cpa_budget_usd", "team-a", "month"), 3.0);
    assert_eq!(value(&m, "cpa_budget_usd", &team_b, "day"), 0.5);
    assert_eq!(m.series("cpa_budget_usd").len(), 3, "one series per budget");
    // 3 x 0.0047 and 1 x 0.0047; the key without a budget has no series.
    assert_eq!(value(&m, "cpa_budget_spent_usd", "team-a", "day"), 0.0141);
    assert_eq!(value(&m, "cpa_budget_spent_usd", "team-a", "month"), 0.0141);
    assert_eq!(value(&m, "cpa_budget_spent_usd", &team_b, "day"), 0.0047);
    assert_eq!(m.series("cpa_budget_spent_usd").len(), 3);
    assert_eq!(m.sum("cpa_budget_spent_usd", &day), 0.0188);
    let end = value(
        &m,
        "cpa_budget_period_end_timestamp_seconds",
        "team-a",
        "day",
    );
    assert_eq!(end, next_utc_midnight());

    let subscribed = eventually(Duration::from_secs(20), async || {
        exporter
            .scrape()
            .await
            .series("cpa_credential_subscription_end_timestamp_seconds")
            .is_empty()
            .not()
    })
    .await;
    assert!(subscribed, "{}", exporter.log_text());
    let text = exporter.scrape_text().await;
    assert!(
        text.contains(r#"cpa_credential_subscription_end_timestamp_seconds{credential="aa11aa11aa11aa11",provider="codex",plan_type="plus"} 1798070400"#),
        "{text}"
    );
    assert_eq!(
        text.matches("cpa_credential_subscription_end_timestamp_seconds{")
            .count(),
        1,
        "only the codex credential has a subscription"
    );
    assert!(!text.contains("acct-"), "the account id is never exported");
    assert!(
        !text.contains("sk-team"),
        "plaintext keys are never exported"
    );

    // The spend is written with each batch: a restart keeps it, and new records add to it.
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(15)).success());
    cpa.push_raw(&record("sk-team-a"));
    let exporter = Exporter::spawn(&setup);
    let m = drained(&exporter, &cpa, 6.0).await;
    assert_eq!(value(&m, "cpa_budget_spent_usd", "team-a", "day"), 0.0188);
    assert_eq!(value(&m, "cpa_budget_spent_usd", &team_b, "day"), 0.0047);
}
