//! Cost at ingest: a fixed workload against a price file with round prices, checked against a
//! table computed by hand; unpriced and zero-token attempts are counted, not silently zero.

mod common;

use std::time::Duration;

use common::*;
use fake_cpa::{FakeCpa, SimConfig};

const KEY: &str = "cost-test-key";

fn record(provider: &str, model: &str, alias: &str, tokens: &str, failed: bool) -> String {
    format!(
        r#"{{"timestamp":"2026-11-24T10:00:00Z","provider":"{provider}","model":"{model}","alias":"{alias}",
            "auth_index":"feedfacefeedface","api_key":"sk-cost","failed":{failed},"tokens":{tokens}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costs_match_a_hand_computed_table() {
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.into(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    // codex (subset): input 1000 of which 200 cache read; output 300 of which 100 reasoning.
    // Buckets: input 800, cache_read 200, output 200, reasoning 100.
    let codex = r#"{"input_tokens":1000,"cached_tokens":200,"cache_read_tokens":200,"output_tokens":300,"reasoning_tokens":100,"total_tokens":1300}"#;
    // claude (independent): input 100, cache read 5000, cache write 1000, output 400.
    let claude = r#"{"input_tokens":100,"cache_read_tokens":5000,"cache_creation_tokens":1000,"output_tokens":400,"total_tokens":6500}"#;
    for _ in 0..3 {
        cpa.push_raw(&record("codex", "round-gpt", "round-gpt", codex, false));
    }
    cpa.push_raw(&record("claude", "claude-via-alias", "", claude, false));
    cpa.push_raw(&record("codex", "no-such-model", "", codex, false));
    cpa.push_raw(&record(
        "codex",
        "round-gpt",
        "",
        r#"{"total_tokens":0}"#,
        false,
    ));
    cpa.push_raw(&record(
        "codex",
        "round-gpt",
        "",
        r#"{"total_tokens":0}"#,
        true,
    ));

    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.yaml");
    // USD per million tokens, round numbers so the table below is easy to check.
    std::fs::write(
        &prices,
        "models:\n  round-gpt: { input: 2, cache_read: 0.5, output: 10 }\n  round-claude: { input: 4, cache_read: 0.4, cache_write: 5, output: 20 }\n",
    )
    .unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "model-aliases:\n  claude-via-alias: round-claude\n",
    )
    .unwrap();
    let setup = Setup {
        cpa_url: cpa.url(),
        key: KEY,
        db: &dir.path().join("c.db"),
        log: dir.path().join("c.log"),
        extra: vec![
            ("CPA_EXPORTER_PRICES_FILE", prices.display().to_string()),
            ("CPA_EXPORTER_CONFIG", config.display().to_string()),
        ],
    };
    let exporter = Exporter::spawn(&setup);
    let ok = eventually(Duration::from_secs(20), async || {
        accounted(&exporter.scrape().await) >= 7.0
    })
    .await;
    assert!(ok, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    let cost = |model: &str| m.sum("cpa_cost_usd_total", &[("model", model)]);
    // round-gpt, per record: 800*2 + 200*0.5 + 200*10 + 100*10 (reasoning as output) = 4700 per 1M
    //   = 0.0047 USD; three records = 0.0141 USD.
    assert_eq!(cost("round-gpt"), 0.0141);
    // round-claude: 100*4 + 5000*0.4 + 1000*5 + 400*20 = 15400 per 1M = 0.0154 USD.
    assert_eq!(cost("claude-via-alias"), 0.0154);
    assert_eq!(cost("no-such-model"), 0.0);
    assert_eq!(
        m.sum("cpa_unpriced_requests_total", &[("model", "no-such-model")]),
        1.0
    );
    assert_eq!(m.sum("cpa_unpriced_requests_total", &[]), 1.0);
    // The successful zero-token attempt counts; the failed one does not.
    assert_eq!(
        m.sum("cpa_zero_token_requests_total", &[("model", "round-gpt")]),
        1.0
    );
    let labels = m.series("cpa_cost_usd_total");
    let first = labels.keys().next().unwrap();
    let names: Vec<&str> = first.keys().map(String::as_str).collect();
    assert_eq!(names, ["api_key", "credential", "model", "provider"]);
}

#[test]
fn a_broken_price_file_fails_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.yaml");
    std::fs::write(&prices, "models:\n  m: { input: 1, outptu: 2 }\n").unwrap();
    let out = std::process::Command::new(BIN)
        .env_clear()
        .env("CPA_MANAGEMENT_KEY", "k")
        .env("CPA_EXPORTER_DB", dir.path().join("x.db"))
        .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("CPA_EXPORTER_PRICES_FILE", &prices)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("prices file") && stderr.contains("outptu"),
        "{stderr}"
    );
}

/// `check` pops once and commits what it took exactly as the drain loop would: priced with
/// `--prices-file` and `model-aliases`, not the built-in table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prices_what_it_pops_like_the_drain_loop() {
    use cpa_usage_exporter::families::Family;
    use cpa_usage_exporter::series::Value;
    use fake_cpa::SimCredential;
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.into(),
        credentials: vec![SimCredential::new(
            "codex",
            "feedfacefeedface",
            "someone@example.com",
        )],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.yaml");
    std::fs::write(
        &prices,
        "models:\n  round-gpt: { input: 2, cache_read: 0.5, output: 10 }\n  round-claude: { input: 4, cache_read: 0.4, cache_write: 5, output: 20 }\n",
    )
    .unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "model-aliases:\n  claude-via-alias: round-claude\n",
    )
    .unwrap();
    let db = dir.path().join("check.db");
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["check", "--consumer-window", "2s"])
        .env_clear()
        .env("CPA_URL", cpa.url())
        .env("CPA_MANAGEMENT_KEY", KEY)
        .env("CPA_EXPORTER_DB", &db)
        .env("CPA_EXPORTER_PRICES_FILE", &prices)
        .env("CPA_EXPORTER_CONFIG", &config);
    let check = tokio::task::spawn_blocking(move || cmd.output().expect("run check"));
    // Traffic throughout the check, so CPA counts attempts in its window and the pop finds some.
    let codex = r#"{"input_tokens":1000,"cached_tokens":200,"cache_read_tokens":200,"output_tokens":300,"reasoning_tokens":100,"total_tokens":1300}"#;
    let claude = r#"{"input_tokens":100,"cache_read_tokens":5000,"cache_creation_tokens":1000,"output_tokens":400,"total_tokens":6500}"#;
    while !check.is_finished() {
        cpa.push_raw(&record("codex", "round-gpt", "round-gpt", codex, false));
        cpa.push_raw(&record("claude", "claude-via-alias", "", claude, false));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = check.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("committed to the state database"),
        "{stdout}"
    );
    let (_, state) =
        cpa_usage_exporter::store::Store::open(&db, cpa_usage_exporter::store::Limits::default())
            .unwrap();
    let sum = |family: Family, model: &str| -> u64 {
        state.families[family as usize]
            .iter()
            .filter(|(labels, _)| labels.iter().any(|v| &**v == model))
            .map(|(_, s)| match s.value {
                Value::Counter(n) => n,
                Value::Histogram(_) => 0,
            })
            .sum()
    };
    for (model, nano_each) in [("round-gpt", 4_700_000), ("claude-via-alias", 15_400_000)] {
        let records = sum(Family::Requests, model);
        assert!(records > 0, "{model}: {stdout}");
        assert_eq!(sum(Family::Cost, model), records * nano_each, "{model}");
        assert_eq!(sum(Family::UnpricedRequests, model), 0, "{model}");
    }
}
