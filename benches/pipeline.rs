//! Throughput and memory figures for docs/benchmarks.md: `cargo bench --bench pipeline`.
//!
//! Prints measurements; asserts nothing about time (machines differ). Each figure is the best of
//! a few runs, on one thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cpa_usage_exporter::cpa::split::{split_array, Splitter};
use cpa_usage_exporter::ingest::{from_body, BatchBuilder};
use cpa_usage_exporter::labels::api_key_label;
use cpa_usage_exporter::metrics::render::{render, render_to_string};
use cpa_usage_exporter::metrics::text::Format;
use cpa_usage_exporter::metrics::Shared;
use cpa_usage_exporter::pricing::Pricing;
use cpa_usage_exporter::store::budget::{Budget, Budgets, Period};
use cpa_usage_exporter::store::{Limits, State, Store};
use fake_cpa::{Workload, WorkloadMix, CLIENT_API_KEYS};

const RECORDS: usize = 200_000;
const BATCH: usize = 1_000;

fn status_bytes(field: &str) -> u64 {
    status_kib(field) * 1024
}

/// Piece size the streaming figures feed (what a socket read typically yields).
const PIECE: usize = 16 * 1024;

/// Decode bodies the way the drain loop does: split while arriving, in `PIECE`-sized pieces.
fn ingest_streamed(body: &[u8], pricing: &Pricing) -> u64 {
    let mut builder = BatchBuilder::new(pricing, 2e9, |_| false);
    let mut splitter = Splitter::new(64 << 20);
    for piece in body.chunks(PIECE) {
        splitter.feed(piece, &mut builder).unwrap();
    }
    splitter.finish().unwrap();
    builder.finish().ingested
}

/// One pop of 1000 records carrying a 70 KB `fail.body` each (70 MB): peak memory of the
/// process while it is ingested, streamed as it arrives or (`whole`) read whole first.
fn big_pop_child(whole: bool) {
    let pricing = Pricing::embedded();
    let body = "e".repeat(70_000);
    let rec = format!(
        r#"{{"timestamp":"2026-11-24T10:00:00Z","provider":"codex","model":"gpt-5.4","auth_index":"0123456789abcdef","latency_ms":900,"fail":{{"status_code":200,"body":"{body}"}},"tokens":{{"input_tokens":10,"output_tokens":5,"total_tokens":15}}}}"#
    );
    let before = status_bytes("VmHWM:");
    let ingested = if whole {
        let mut all = Vec::with_capacity(1000 * (rec.len() + 1) + 2);
        all.push(b'[');
        for i in 0..1000 {
            if i > 0 {
                all.push(b',');
            }
            all.extend_from_slice(rec.as_bytes());
        }
        all.push(b']');
        from_body(&all, &pricing, |_| false).unwrap().ingested
    } else {
        // The response is produced piece by piece, as a socket would deliver it.
        let mut builder = BatchBuilder::new(&pricing, 2e9, |_| false);
        let mut splitter = Splitter::new(64 << 20);
        splitter.feed(b"[", &mut builder).unwrap();
        for i in 0..1000 {
            if i > 0 {
                splitter.feed(b",", &mut builder).unwrap();
            }
            for piece in rec.as_bytes().chunks(PIECE) {
                splitter.feed(piece, &mut builder).unwrap();
            }
        }
        splitter.feed(b"]", &mut builder).unwrap();
        splitter.finish().unwrap();
        builder.finish().ingested
    };
    let peak = status_bytes("VmHWM:");
    println!(
        "one 70 MB pop (1000 records of 70 KB), {}: {:>6.1} MiB peak RSS growth ({ingested} ingested)",
        if whole { "read whole   " } else { "streamed     " },
        (peak.saturating_sub(before)) as f64 / 1048576.0
    );
}

/// Realistic CPA queue responses of `BATCH` elements each.
fn bodies(seed: u64) -> Vec<Vec<u8>> {
    let mut w = Workload::new(seed, WorkloadMix::default());
    let now = 1.79e9;
    (0..RECORDS / BATCH)
        .map(|_| {
            let elems: Vec<String> = (0..BATCH).map(|_| w.next(now).element_json).collect();
            format!("[{}]", elems.join(",")).into_bytes()
        })
        .collect()
}

/// CPU time this thread has run, from the scheduler: other load on the machine (a busy CI
/// host) does not count, as it would in wall-clock time.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// The best of `runs`, in CPU time of this thread (wall-clock time where schedstat is missing).
fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..runs {
        let (t, c) = (Instant::now(), thread_cpu());
        let out = f();
        let d = match thread_cpu().checked_sub(c) {
            Some(cpu) if !cpu.is_zero() => cpu,
            _ => t.elapsed(),
        };
        if best.as_ref().is_none_or(|(b, _)| d < *b) {
            best = Some((d, out));
        }
    }
    best.expect("runs > 0")
}

/// Scrape time at about 1k, 10k and 100k series, in both formats (OpenMetrics carries the
/// exemplars; text 0.0.4 never does). `--scrape-only` runs just this.
fn scrapes(dir: &std::path::Path) {
    for target in [1_000, 10_000, 100_000] {
        let (_store, state) = state_with_series(dir, target);
        let shared = Arc::new(Shared::new(state, Default::default(), dir.join("x.db")));
        for format in [Format::Text004, Format::OpenMetrics] {
            let text = render_to_string(&shared, format);
            let samples = text.lines().filter(|l| !l.starts_with('#')).count();
            let exemplars = text.matches(" # {").count();
            drop(text);
            // Streamed as the server does: chunks into a writer that discards them.
            let (d, _) = best_of(20, || render(&shared, format, &mut std::io::sink()));
            println!(
                "scrape at {:>6} series, {:<11} {:>9.2} ms per scrape, {:.2} µs per sample ({} samples, {} exemplars)",
                shared.committed.read().total_series(),
                format!("{format:?}:"),
                d.as_secs_f64() * 1e3,
                d.as_secs_f64() * 1e6 / samples as f64,
                samples,
                exemplars,
            );
        }
    }
}

fn limits() -> Limits {
    Limits {
        series_per_family: 1_000_000,
        dedup_window: 100_000,
        ..Limits::default()
    }
}

/// A store whose state has about `target` series in all, from records with distinct labels.
fn state_with_series(dir: &std::path::Path, target: usize) -> (Store, State) {
    let pricing = Pricing::embedded();
    let (mut store, mut state) = Store::open(&dir.join(format!("s{target}.db")), limits()).unwrap();
    let mut i = 0usize;
    while state.total_series() < target {
        let elems: Vec<String> = (0..200)
            .map(|_| {
                i += 1;
                format!(
                    r#"{{"timestamp":"2026-11-24T10:00:00Z","provider":"codex","model":"model-{}","auth_index":"{:016x}","api_key":"sk-{}","endpoint":"POST /v1/responses","request_id":"{:08x}","latency_ms":{},"ttft_ms":{},"tokens":{{"input_tokens":100,"output_tokens":20,"cached_tokens":50,"cache_read_tokens":50,"total_tokens":120}}}}"#,
                    i % 97,
                    i % 389,
                    i,
                    i,
                    i % 30_000,
                    i % 3_000
                )
            })
            .collect();
        let batch = from_body(
            format!("[{}]", elems.join(",")).as_bytes(),
            &pricing,
            |_| false,
        )
        .unwrap();
        let mut plan = store.plan(&state, &batch);
        store.commit(&mut plan, 0).unwrap();
        store.apply(&mut state, plan);
    }
    (store, state)
}

fn main() {
    let pricing = Pricing::embedded();
    // `cargo test --benches` runs this file too; keep that quick.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--test" || a == "--list") {
        return;
    }
    if args.iter().any(|a| a == "--big-pop-child") {
        return big_pop_child(args.iter().any(|a| a == "--whole"));
    }
    if let Some(pos) = args.iter().position(|a| a == "--rss-child") {
        return rss_child(
            args.get(pos + 1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(10_000),
        );
    }
    if args.iter().any(|a| a == "--scrape-only") {
        let dir = tempfile::tempdir().unwrap();
        return scrapes(dir.path());
    }
    let bodies = bodies(1);
    let mb = bodies.iter().map(Vec::len).sum::<usize>() as f64 / 1e6;
    println!("workload: {RECORDS} records in batches of {BATCH}, {mb:.1} MB of JSON");

    let (split, _) = best_of(3, || {
        bodies
            .iter()
            .map(|b| split_array(b).unwrap().len())
            .sum::<usize>()
    });
    let (decode, _) = best_of(3, || {
        let mut usage = 0usize;
        for b in &bodies {
            for e in split_array(b).unwrap() {
                let text = std::str::from_utf8(e.bytes).unwrap();
                usage += matches!(
                    cpa_usage_exporter::ingest::decode::decode_element(text),
                    cpa_usage_exporter::ingest::decode::Element::Usage(_)
                ) as usize;
            }
        }
        usage
    });
    let (serde_split, _) = best_of(3, || {
        bodies
            .iter()
            .map(|b| {
                serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(b)
                    .unwrap()
                    .len()
            })
            .sum::<usize>()
    });
    println!(
        "  phases: split array {:.0} ms (serde_json's Vec<&RawValue>: {:.0} ms), + decode elements {:.0} ms",
        split.as_secs_f64() * 1e3,
        serde_split.as_secs_f64() * 1e3,
        decode.as_secs_f64() * 1e3
    );
    let (d, n) = best_of(3, || {
        bodies
            .iter()
            .map(|b| from_body(b, &pricing, |_| false).unwrap().ingested)
            .sum::<u64>()
    });
    println!(
        "decode + normalize:           {:>9.0} records/s ({} ingested in {:.3} s)",
        RECORDS as f64 / d.as_secs_f64(),
        n,
        d.as_secs_f64()
    );

    let (d, n) = best_of(3, || {
        bodies
            .iter()
            .map(|b| ingest_streamed(b, &pricing))
            .sum::<u64>()
    });
    println!(
        "  streamed in 16 KiB pieces:  {:>9.0} records/s ({} ingested in {:.3} s)",
        RECORDS as f64 / d.as_secs_f64(),
        n,
        d.as_secs_f64()
    );

    // The event log's writer thread: a batch's attempts serialized into one buffer (what it
    // writes with one call), no I/O.
    let attempts: Vec<_> = bodies
        .iter()
        .map(|b| from_body(b, &pricing, |_| false).unwrap().attempts)
        .collect();
    let labels = cpa_usage_exporter::metrics::LabelOptions::default();
    let (d, bytes) = best_of(3, || {
        let mut buf = Vec::new();
        let mut bytes = 0;
        for a in &attempts {
            buf.clear();
            cpa_usage_exporter::pipeline::events::write_lines(&mut buf, a, &[], &labels);
            bytes += buf.len();
        }
        bytes
    });
    println!(
        "event log lines:              {:>9.0} lines/s ({:.0} bytes per line)",
        RECORDS as f64 / d.as_secs_f64(),
        bytes as f64 / RECORDS as f64
    );

    let dir = tempfile::tempdir().unwrap();
    let (d, series) = best_of(3, || {
        let path = dir.path().join(format!("commit-{}.db", rand_suffix()));
        let (mut store, mut state) = Store::open(&path, limits()).unwrap();
        for b in &bodies {
            // As the drain loop commits: failover grouping and its expiry included.
            let mut batch = from_body(b, &pricing, |id| store.seen(id)).unwrap();
            batch.caught_up = true;
            let now = cpa_usage_exporter::time::unix_now() as i64;
            let mut plan = store.plan_batch(&state, &batch, now);
            store.commit(&mut plan, 0).unwrap();
            store.apply(&mut state, plan);
        }
        state.total_series()
    });
    println!(
        "decode + normalize + commit:  {:>9.0} records/s ({} batches, one fsync'd transaction each; {} series)",
        RECORDS as f64 / d.as_secs_f64(),
        RECORDS / BATCH,
        series
    );

    // The same with a budget of each period for every simulated client key and 2 for keys
    // that never appear: the spend is added up per batch before the commit and written with it.
    let budgets: Vec<Budget> = CLIENT_API_KEYS
        .iter()
        .copied()
        .chain(["sk-absent-1", "sk-absent-2"])
        .flat_map(|k| {
            [Period::Day, Period::Month].map(|period| Budget {
                api_key: api_key_label(k),
                usd: 100.0,
                period,
            })
        })
        .collect();
    let n_budgets = budgets.len();
    let (d, (spent, accounting)) = best_of(3, || {
        let path = dir.path().join(format!("budgets-{}.db", rand_suffix()));
        let (mut store, mut state) = Store::open(&path, limits()).unwrap();
        state.budgets = Budgets::new(budgets.clone());
        let mut accounting = Duration::ZERO;
        for b in &bodies {
            let batch = from_body(b, &pricing, |id| store.seen(id)).unwrap();
            let started = Instant::now();
            let (spend, rows) = state.budgets.after(&batch, 1_796_083_200);
            accounting += started.elapsed();
            let mut plan = store.plan(&state, &batch);
            plan.meta = rows;
            store.commit(&mut plan, 0).unwrap();
            store.apply(&mut state, plan);
            state.budgets.set(spend);
        }
        (spend_total(&state), accounting)
    });
    println!(
        "  the same with {n_budgets} budgets:    {:>9.0} records/s (${spent:.2} counted against them; adding up the spend: {:.1} us per batch)",
        RECORDS as f64 / d.as_secs_f64(),
        accounting.as_secs_f64() * 1e6 / (RECORDS / BATCH) as f64,
    );

    drop(bodies);
    scrapes(dir.path());
    // Memory in a fresh process, so the workload above does not count.
    let exe = std::env::current_exe().expect("own path");
    for whole in [false, true] {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--big-pop-child");
        if whole {
            cmd.arg("--whole");
        }
        let out = cmd.output().expect("re-exec");
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    for target in [1_000, 10_000, 100_000] {
        let out = std::process::Command::new(&exe)
            .args(["--rss-child", &target.to_string()])
            .output()
            .expect("re-exec");
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

/// Total spend the budgets counted (read through the rendered gauges' source).
fn spend_total(state: &State) -> f64 {
    state.budgets.spent_usd().iter().sum()
}

/// Load a store with about `target` series, serve one scrape, and report resident memory.
fn rss_child(target: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (_store, state) = state_with_series(dir.path(), target);
    // Re-open, as the exporter does at start: what a restarted process holds.
    drop(_store);
    let (_store, state) = {
        drop(state);
        Store::open(&dir.path().join(format!("s{target}.db")), limits()).unwrap()
    };
    let series = state.total_series();
    let shared = Arc::new(Shared::new(
        state,
        Default::default(),
        dir.path().join("x.db"),
    ));
    let before = status_kib("VmRSS:");
    // Reset the peak (Linux: 5 > clear_refs), so the peak below is the scrape's own.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    // A text scrape, then a gzip one, streamed as the server does.
    render(&shared, Format::Text004, &mut std::io::sink()).unwrap();
    let text_peak = status_kib("VmHWM:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let mut gz = flate2::write::GzEncoder::new(std::io::sink(), flate2::Compression::fast());
    render(&shared, Format::OpenMetrics, &mut gz).unwrap();
    gz.finish().unwrap();
    let gzip_peak = status_kib("VmHWM:");
    println!(
        "RSS at {:>6} series:         {:>9.1} MiB after start-up; peak during one scrape +{:.1} MiB (text), +{:.1} MiB (gzip)",
        series,
        before as f64 / 1024.0,
        text_peak.saturating_sub(before) as f64 / 1024.0,
        gzip_peak.saturating_sub(before) as f64 / 1024.0,
    );
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
