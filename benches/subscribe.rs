//! The highest record rate a subscription sustains without CPA dropping it: the release binary
//! with `transport: subscribe` and the production poll interval and commit (WAL,
//! `synchronous=FULL`, one fsync per batch, on this machine's disk), against the fake CPA, which
//! publishes as CPA does and drops a subscriber 256 messages behind. Each rate runs for
//! `SECONDS`; a rate counts as sustained when no subscription was dropped and every record was
//! committed. `cargo bench --bench subscribe`; the figures go in docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{accounted, eventually, Exporter, Setup};
use fake_cpa::{FakeCpa, SimConfig, Workload, WorkloadMix};

const KEY: &str = "subscribe-bench-management-key";
const SECONDS: u64 = 10;
/// Records pushed per tick; the pusher sleeps between ticks to hold the rate.
const TICK: Duration = Duration::from_millis(10);

fn main() {
    // `cargo test --benches` runs this file too; keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let rates: Vec<u64> = std::env::var("SUBSCRIBE_BENCH_RATES")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2_000, 5_000, 10_000, 20_000, 40_000]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A pool of realistic records (no duplicates, controls or invalid ones), cycled.
        let mix = WorkloadMix {
            duplicate_event_id: 0.0,
            control: 0.0,
            invalid: 0.0,
            ..WorkloadMix::default()
        };
        let mut workload = Workload::new(11, mix);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let pool: Vec<String> = (0..20_000)
            .map(|i| workload.next(now - 60.0 + i as f64 * 1e-3).element_json)
            .collect();
        let mean = pool.iter().map(String::len).sum::<usize>() / pool.len();
        println!("records of {mean} bytes on average, {SECONDS} s per rate");
        for rate in rates {
            let cpa = FakeCpa::start(SimConfig {
                management_key: KEY.to_owned(),
                retention: Duration::from_secs(3600),
                ..SimConfig::default()
            })
            .await
            .expect("fake CPA");
            cpa.set_credentials(workload.credentials());
            let dir = tempfile::tempdir().unwrap();
            let setup = Setup {
                cpa_url: cpa.url(),
                key: KEY,
                db: Box::leak(dir.path().join("state.db").into_boxed_path()),
                log: dir.path().join("exporter.log"),
                extra: vec![
                    ("CPA_TRANSPORT", "subscribe".to_owned()),
                    ("CPA_EXPORTER_POLL_INTERVAL", "1s".to_owned()),
                ],
            };
            let exporter = Exporter::spawn(&setup);
            let subscribed = eventually(Duration::from_secs(20), async || {
                exporter.scrape().await.get("cpa_exporter_subscribed") == Some(1.0)
            })
            .await;
            assert!(subscribed, "{}", exporter.log_text());
            let per_tick = (rate as f64 * TICK.as_secs_f64()).round().max(1.0) as usize;
            let started = Instant::now();
            let mut pushed = 0usize;
            let mut next = started;
            while started.elapsed() < Duration::from_secs(SECONDS) {
                let from = pushed % pool.len();
                let batch: Vec<&str> = pool[from..(from + per_tick).min(pool.len())]
                    .iter()
                    .map(String::as_str)
                    .collect();
                pushed += batch.len();
                cpa.push_raw_all(batch);
                next += TICK;
                tokio::time::sleep_until(next.into()).await;
            }
            let pushed_for = started.elapsed().as_secs_f64();
            let done = eventually(Duration::from_secs(60), async || {
                accounted(&exporter.scrape().await) >= pushed as f64
            })
            .await;
            let took = started.elapsed().as_secs_f64();
            let m = exporter.scrape().await;
            let drops = m.get("cpa_exporter_subscription_drops_total").unwrap_or(0.0);
            let got = accounted(&m);
            let polls = m.sum("cpa_exporter_polls_total", &[("result", "success")]);
            println!(
                "{rate:>6} records/s offered ({:.0} pushed/s): {got:.0} of {pushed} committed in {took:.1} s, {drops:.0} subscription drops, {polls:.0} pops{}",
                pushed as f64 / pushed_for,
                if done && drops == 0.0 { "  sustained" } else { "  NOT sustained" }
            );
            drop(exporter);
            cpa.shutdown();
        }
    });
}
