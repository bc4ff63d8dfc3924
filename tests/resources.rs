//! Bounded resources: the database grows with series, not records; the dedup window is bounded;
//! stale series are retired; scrapes and ingestion do not hold each other up.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use cpa_usage_exporter::ingest::from_body;
use cpa_usage_exporter::pricing::Pricing;
use cpa_usage_exporter::store::{Limits, State, Store};
use fake_cpa::{FakeCpa, Fault, SimConfig, Workload, WorkloadMix};

const KEY: &str = "resources-test-management-key";

async fn fake_cpa() -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        retention: Duration::from_secs(3600),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA")
}

fn setup<'a>(url: String, dir: &'a tempfile::TempDir, extra: &[(&'a str, String)]) -> Setup<'a> {
    Setup {
        cpa_url: url,
        key: KEY,
        db: Box::leak(dir.path().join("state.db").into_boxed_path()),
        log: dir.path().join("exporter.log"),
        extra: extra.to_vec(),
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn wal_len(db: &Path) -> u64 {
    file_len(Path::new(&format!("{}-wal", db.display())))
}

/// Commit `bodies` batch by batch, as the drain loop does; returns the largest WAL seen.
fn ingest_all(store: &mut Store, state: &mut State, bodies: &[String], now: i64) -> u64 {
    let pricing = Pricing::embedded();
    let mut wal_max = 0;
    for body in bodies {
        let batch = from_body(body.as_bytes(), &pricing, |id| store.seen(id)).unwrap();
        let mut plan = store.plan(state, &batch);
        store.commit(&mut plan, now).unwrap();
        store.apply(state, plan);
        wal_max = wal_max.max(wal_len(store.path()));
    }
    wal_max
}

/// Ten times more records over the same label sets leave the database the same size: it holds
/// one row per series. With `event_id`s the dedup table grows to its window and stops there.
#[test]
fn database_size_follows_series_not_records() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("size.db");
    let limits = Limits {
        dedup_window: 1_000,
        ..Limits::default()
    };
    let (mut store, mut state) = Store::open(&db, limits).unwrap();
    // 1 000 realistic records, every one with an event_id.
    let mix = WorkloadMix {
        with_event_id: 1.0,
        string_wrapped: 0.0,
        control: 0.0,
        invalid: 0.0,
        ..WorkloadMix::default()
    };
    let mut workload = Workload::new(5, mix);
    let mut batches = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                let elems: Vec<String> = (0..500)
                    .map(|_| workload.next(1.79e9).element_json)
                    .collect();
                format!("[{}]", elems.join(","))
            })
            .collect()
    };
    let first = batches(2);
    // The same records again under new event_ids: new usage over exactly the same label sets.
    let mut round = 0;
    let mut again = |store: &mut Store, state: &mut State| {
        round += 1;
        let bodies: Vec<String> = first
            .iter()
            .map(|b| b.replace(r#""event_id":""#, &format!(r#""event_id":"r{round}-"#)))
            .collect();
        ingest_all(store, state, &bodies, 1_790_000_000)
    };
    let mut wal_max = 0;
    wal_max = wal_max.max(again(&mut store, &mut state));
    store.checkpoint().unwrap();
    let series_small = state.total_series();
    let small = file_len(&db);
    // Ten times more records than that, still over the same label sets.
    for _ in 0..10 {
        wal_max = wal_max.max(again(&mut store, &mut state));
    }
    store.checkpoint().unwrap();
    let large = file_len(&db);
    assert_eq!(state.total_series(), series_small, "no new label sets");
    assert_eq!(
        store.dedup_len(),
        1_000,
        "the dedup window is full and bounded"
    );
    println!(
        "{series_small} series: {small} bytes after 1 000 records, {large} bytes after 11 000; largest WAL {wal_max} bytes"
    );
    assert!(
        large <= small + small / 20 + 16 * 4096,
        "the file grew from {small} to {large} bytes with records alone"
    );
    assert_eq!(wal_len(&db), 0, "a checkpoint truncates the WAL");
    // SQLite's auto-checkpoint (1000 pages) and the journal size limit bound the WAL.
    assert!(wal_max < 8 * 1024 * 1024, "WAL grew to {wal_max} bytes");
    drop(store);
    let (store, reopened) = Store::open(&db, limits).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert_eq!(reopened.families, state.families);
}

/// The dedup window, end to end: the database keeps exactly `dedup-window` ids; a re-delivery
/// inside the window is a duplicate, one from before it is counted again (the documented limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedup_window_is_bounded_in_the_database() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "dedup-window: 500\n").unwrap();
    let mix = WorkloadMix {
        with_event_id: 1.0,
        control: 0.0,
        invalid: 0.0,
        string_wrapped: 0.0,
        ..WorkloadMix::default()
    };
    let mut workload = Workload::new(8, mix);
    let records: Vec<String> = (0..2_000)
        .map(|_| workload.next(1.79e9).element_json)
        .collect();
    for r in &records {
        cpa.push_raw(r);
    }
    let s = setup(
        cpa.url(),
        &dir,
        &[
            ("CPA_EXPORTER_CONFIG", config.display().to_string()),
            ("CPA_EXPORTER_BATCH_SIZE", "300".into()),
        ],
    );
    let exporter = Exporter::spawn(&s);
    let drained = eventually(Duration::from_secs(20), async || {
        accounted(&exporter.scrape().await) == 2_000.0
    })
    .await;
    assert!(drained, "{}", exporter.log_text());
    let rows: i64 = rusqlite::Connection::open(s.db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM dedup", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 500);
    cpa.push_raw(&records[1_999]);
    cpa.push_raw(&records[0]);
    let done = eventually(Duration::from_secs(10), async || {
        accounted(&exporter.scrape().await) == 2_002.0
    })
    .await;
    assert!(done);
    let m = exporter.scrape().await;
    assert_eq!(
        m.sum("cpa_exporter_records_total", &[("outcome", "duplicate")]),
        1.0
    );
    assert_eq!(
        m.sum("cpa_exporter_records_total", &[("outcome", "ingested")]),
        2_001.0
    );
}

/// Series that no record updated within `series-retirement` are deleted from the database and
/// from `/metrics` (at start, then periodically); `off` keeps them. A returning series restarts
/// at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_series_are_retired_and_restart_at_zero() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let rec = |model: &str| {
        format!(
            r#"{{"timestamp":"2026-11-24T10:00:00Z","provider":"codex","model":"{model}","tokens":{{"input_tokens":3,"total_tokens":3}}}}"#
        )
    };
    for _ in 0..5 {
        cpa.push_raw(&rec("old-model"));
    }
    cpa.push_raw(&rec("fresh-model"));
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "series-retirement: off\n").unwrap();
    let extra = [("CPA_EXPORTER_CONFIG", config.display().to_string())];
    let s = setup(cpa.url(), &dir, &extra);
    let exporter = Exporter::spawn(&s);
    let drained = eventually(Duration::from_secs(10), async || {
        accounted(&exporter.scrape().await) == 6.0
    })
    .await;
    assert!(drained);
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());
    // 40 days pass for every series of the old model.
    let aged = rusqlite::Connection::open(s.db)
        .unwrap()
        .execute(
            "UPDATE series SET updated_at = updated_at - 40 * 86400 WHERE labels LIKE '%model=old-model%'",
            [],
        )
        .unwrap();
    assert_eq!(
        aged, 4,
        "requests, tokens, unpriced requests and inbound requests (requested_model=old-model)"
    );

    // `off`: nothing is retired.
    let exporter = Exporter::spawn(&s);
    let m = exporter.scrape().await;
    assert_eq!(m.sum("cpa_requests_total", &[("model", "old-model")]), 5.0);
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());

    // The default (30 days): the old model's series go, the fresh one's stay.
    std::fs::write(&config, "log-level: info\n").unwrap();
    let exporter = Exporter::spawn(&s);
    let retired = eventually(Duration::from_secs(10), async || {
        exporter
            .scrape()
            .await
            .sum("cpa_exporter_series_retired_total", &[])
            >= aged as f64
    })
    .await;
    assert!(retired, "{}", exporter.log_text());
    assert!(exporter.log_text().contains("retired series"));
    let m = exporter.scrape().await;
    assert_eq!(
        m.sum(
            "cpa_exporter_series_retired_total",
            &[("family", "requests")]
        ),
        1.0
    );
    assert_eq!(m.sum("cpa_requests_total", &[("model", "old-model")]), 0.0);
    assert!(m
        .series("cpa_requests_total")
        .keys()
        .all(|l| l["model"] != "old-model"));
    assert_eq!(
        m.sum("cpa_requests_total", &[("model", "fresh-model")]),
        1.0
    );
    // The exporter's own counters are never retired.
    assert_eq!(accounted(&m), 6.0);
    let left: i64 = rusqlite::Connection::open(s.db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM series WHERE labels LIKE '%model=old-model%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    // It comes back: from zero, as a counter reset.
    cpa.push_raw(&rec("old-model"));
    let back = eventually(Duration::from_secs(10), async || {
        exporter
            .scrape()
            .await
            .sum("cpa_requests_total", &[("model", "old-model")])
            == 1.0
    })
    .await;
    assert!(back, "{}", exporter.log_text());
}

#[test]
fn a_bad_series_retirement_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "series-retirement: 5s\n").unwrap();
    let out = std::process::Command::new(BIN)
        .env_clear()
        .env("CPA_MANAGEMENT_KEY", "k")
        .env("CPA_EXPORTER_DB", dir.path().join("x.db"))
        .env("CPA_EXPORTER_CONFIG", &config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("series retirement (`series-retirement` in"),
        "{stderr}"
    );
}

/// 50 scrapes at a time, round after round, while the exporter drains a backlog into about
/// 10 000 series: every scrape answers, within a bound, and the drain ends with exact totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_parallel_scrapes_during_a_drain() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let n_workload = 10_000;
    let expected = push_workload(&cpa, 31, WorkloadMix::default(), n_workload);
    // Distinct models, for a realistic number of series to render.
    let distinct = 2_000;
    for i in 0..distinct {
        cpa.push_raw(&format!(
            r#"{{"timestamp":"2026-11-24T10:00:00Z","provider":"codex","model":"m-{i}","latency_ms":800,"ttft_ms":100,"tokens":{{"input_tokens":2,"output_tokens":1,"total_tokens":3}}}}"#
        ));
    }
    let n = (n_workload + distinct) as f64;
    // Pops take a while, so the drain lasts long enough to be scraped throughout.
    cpa.set_fault(Some(Fault::Delay(Duration::from_millis(40))));
    let s = setup(
        cpa.url(),
        &dir,
        &[("CPA_EXPORTER_BATCH_SIZE", "500".to_string())],
    );
    let exporter = Exporter::spawn(&s);
    let client = reqwest::Client::new();
    let url = exporter.url("/metrics");
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut scrapes = 0;
    let mut rounds = 0;
    let mut series;
    loop {
        let round: Vec<_> = (0..50)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = client
                        .get(&url)
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await
                        .expect("scrape");
                    assert!(r.status().is_success(), "{}", r.status());
                    let body = r.text().await.expect("body");
                    (t.elapsed(), body.len())
                })
            })
            .collect();
        for task in round {
            let (took, len) = task.await.unwrap();
            assert!(len > 0);
            worst = worst.max(took);
            scrapes += 1;
        }
        rounds += 1;
        let m = exporter.scrape().await;
        series = m.sum("cpa_exporter_series", &[]);
        if accounted(&m) >= n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the drain stalled under scrapes: {} of {n}\n{}",
            accounted(&m),
            exporter.log_text()
        );
    }
    let drain = started.elapsed();
    let m = exporter.scrape().await;
    let observed = Expected::observed(&m);
    assert_eq!(accounted(&m), n);
    for (labels, v) in &expected.requests {
        assert_eq!(observed.requests.get(labels), Some(v), "{labels:?}");
    }
    assert_eq!(
        m.sum("cpa_requests_total", &[]),
        n - expected_non_usage(&expected)
    );
    println!(
        "{scrapes} scrapes in {rounds} rounds of 50 during a {:.1} s drain; {series} series at the end; slowest scrape {:?}",
        drain.as_secs_f64(),
        worst
    );
    // Debug build, 50 at once on 2 to 4 cores: generous, but a stalled server fails it.
    assert!(worst < Duration::from_secs(20), "slowest scrape {worst:?}");
}

/// Elements of the workload that are not usage records (control, invalid, duplicate).
fn expected_non_usage(e: &Expected) -> f64 {
    e.outcomes
        .iter()
        .filter(|(k, _)| k.as_str() != "ingested")
        .map(|(_, v)| v)
        .sum()
}

/// The real binary at the default series limit keeps its peak resident memory (`VmHWM`) under
/// 48 MiB through one text scrape, one gzip scrape and ten parallel scrapes, with every body
/// complete: a scrape costs a chunk of memory, not the exposition (figures per series count in
/// `cargo bench --bench stress`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_at_the_default_cap_stay_under_48_mib() {
    const LIMIT_KIB: u64 = 48 * 1024;
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let series = stress::fill_state(&dir.path().join("state.db"), 10_000);
    let exporter = Exporter::spawn(&setup(cpa.url(), &dir, &[]));
    let m = stress::memory_under_scrapes(&exporter, 400_000).await;
    eprintln!("{series} series; VmHWM in KiB: {m:?}");
    assert!(
        m.parallel < LIMIT_KIB,
        "VmHWM {} KiB over {LIMIT_KIB} KiB",
        m.parallel
    );
}

/// Three scrapers that never read their body hold every render slot, yet the state lock is
/// free for the drain loop (a render takes it per chunk, never across the network), a fourth
/// scrape gets 503 once its `X-Prometheus-Scrape-Timeout-Seconds` passes instead of queueing,
/// and past the stalled scrapes' own timeout their renders are cut off and scrapes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_scrapers_hold_neither_the_state_lock_nor_the_server() {
    use cpa_usage_exporter::http::{self, ServeOptions, MAX_RENDERS};
    use cpa_usage_exporter::metrics::Shared;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    stress::fill_state(&db, 2_000);
    let (_store, state) = Store::open(&db, Limits::default()).unwrap();
    let shared = Arc::new(Shared::new(state, Default::default(), db.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(http::serve(
        listener,
        shared.clone(),
        ServeOptions {
            ready_window: Duration::from_secs(30),
            protection: Default::default(),
            limits: Default::default(),
        },
        stop_rx,
    ));
    // Receive windows of 4 KiB, never read: each render blocks once the socket buffers fill.
    let mut stalled = Vec::new();
    for _ in 0..MAX_RENDERS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut c = socket.connect(addr).await.unwrap();
        c.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Prometheus-Scrape-Timeout-Seconds: 4\r\n\r\n",
        )
        .await
        .unwrap();
        stalled.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let writer = shared.clone();
    let locked = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::task::spawn_blocking(move || drop(writer.committed.write())),
    )
    .await;
    assert!(
        locked.is_ok(),
        "the drain loop could not take the state lock"
    );

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{addr}/metrics");
    let busy = client
        .get(&url)
        .header("X-Prometheus-Scrape-Timeout-Seconds", "0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers()["retry-after"], "1");

    // The stalled scrapes' 4 s pass: their renders stop and free the slots.
    let served = eventually(Duration::from_secs(15), async || {
        let Ok(r) = client
            .get(&url)
            .header("X-Prometheus-Scrape-Timeout-Seconds", "1")
            .send()
            .await
        else {
            return false;
        };
        r.status() == 200 && r.text().await.is_ok_and(|t| t.contains("process_max_fds"))
    })
    .await;
    assert!(
        served,
        "scrapes did not recover after the stalled ones timed out"
    );
    drop(stalled);
}
