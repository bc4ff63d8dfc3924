//! A large credentials listing (issue 22): 100 000 credentials stay within the shipped memory
//! limit, the credential families obey `series-limit`, and a listing over the management body
//! limit is refused with that limit's name.

mod common;

use std::time::Duration;

use common::stress::{reset_hwm, vm_hwm_kib};
use common::*;
use fake_cpa::{FakeCpa, SimConfig, SimCredential};

const KEY: &str = "bigcreds-test-management-key";
/// `MemoryMax=64M` of the shipped systemd unit, `mem_limit: 64m` of the compose file.
const SHIPPED_MEMORY_KIB: u64 = 64 * 1024;
/// The default `series-limit`.
const SERIES_LIMIT: usize = 10_000;
const PROVIDERS: [&str; 4] = ["codex", "claude", "gemini-cli", "qwen"];

/// `n` distinct credentials, their file names carrying e-mails as CPA's do.
fn credentials(n: usize) -> Vec<SimCredential> {
    (0..n)
        .map(|i| {
            let provider = PROVIDERS[i % PROVIDERS.len()];
            let mut c =
                SimCredential::new(provider, &format!("{i:016x}"), &format!("u{i}@example.com"));
            if i % 7 == 0 {
                c.status = "error".to_owned();
                c.unavailable = true;
            }
            c
        })
        .collect()
}

async fn fake_cpa(credentials: Vec<SimCredential>, compact: bool) -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        credentials,
        compact_listing: compact,
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA")
}

fn spawn(cpa: &FakeCpa, dir: &tempfile::TempDir, name: &str) -> Exporter {
    let setup = Setup::in_dir(cpa, KEY, dir, name)
        // Polled over HTTP, the listing is read at every credentials interval.
        .with_env("CPA_TRANSPORT", "http")
        .with_env("CPA_EXPORTER_CREDENTIALS_INTERVAL", "5s")
        .with_env("CPA_EXPORTER_LOG_LEVEL", "debug");
    Exporter::spawn(&setup)
}

fn overflowed(m: &Metrics, family: &str) -> f64 {
    m.sum("cpa_exporter_series_overflow_total", &[("family", family)])
}

/// The listing of issue 22: 100 000 credentials in 14 MB, under the 16 MiB body limit. Read
/// three times, with scrapes of the credential gauges in between, the exporter's peak resident
/// memory stays under the shipped 64 MiB; the first `series-limit` credentials are exported, the
/// others are counted as overflow of each credential family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_of_100_000_credentials_stays_within_the_shipped_memory_limit() {
    let total = 100_000;
    let cpa = fake_cpa(credentials(total), true).await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = spawn(&cpa, &dir, "bigcreds");
    let pid = exporter.child.id();
    let over = (total - SERIES_LIMIT) as f64;
    let mut reads = 0;
    let mut last = 0.0;
    let mut cpu = Vec::new();
    // Three reads: each counts its overflow once.
    let read_thrice = eventually(Duration::from_secs(120), async || {
        let m = exporter.scrape().await;
        let now = overflowed(&m, "credential_info");
        if now > last {
            reads += 1;
            last = now;
            cpu.push(cpu_ticks(pid));
        }
        now >= 3.0 * over
    })
    .await;
    let hwm = vm_hwm_kib(pid);
    assert!(read_thrice, "{}", tail(&exporter.log_text()));
    let m = exporter.scrape().await;
    let info = m.series("cpa_credential_info");
    eprintln!(
        "{total} credentials: VmHWM {hwm} KiB after {reads} reads; {} info series; CPU ticks at each read {cpu:?}",
        info.len()
    );
    assert_eq!(
        info.len(),
        SERIES_LIMIT,
        "one info series per exported credential"
    );
    assert_eq!(
        m.series("cpa_credential_status").len(),
        SERIES_LIMIT * 6,
        "six states per exported credential"
    );
    // Each read counts the credentials it left out in every family that has a series per
    // credential (these entries carry neither a retry time nor a subscription end).
    let counted = overflowed(&m, "credential_info");
    assert_eq!(counted % over, 0.0, "{counted}");
    for family in [
        "credential_status",
        "credential_unavailable",
        "credential_disabled",
    ] {
        assert_eq!(overflowed(&m, family), counted, "{family}");
    }
    for family in [
        "credential_next_retry_timestamp_seconds",
        "credential_subscription_end_timestamp_seconds",
    ] {
        assert_eq!(overflowed(&m, family), 0.0, "{family}");
    }
    assert!(
        !m.series("cpa_credential_info")
            .keys()
            .any(|l| l["name"].contains("u1@")),
        "e-mails are masked"
    );
    assert!(
        hwm < SHIPPED_MEMORY_KIB,
        "VmHWM {hwm} KiB over {SHIPPED_MEMORY_KIB} KiB\n{}",
        tail(&exporter.log_text())
    );
    // The peak of one more read alone.
    reset_hwm(pid);
    let before = cpu_ticks(pid);
    let once_more = eventually(Duration::from_secs(60), async || {
        overflowed(&exporter.scrape().await, "credential_info") >= counted + over
    })
    .await;
    assert!(once_more);
    eprintln!(
        "one more read: VmHWM {} KiB, about {} CPU ticks (with scrapes)",
        vm_hwm_kib(pid),
        cpu_ticks(pid) - before
    );
}

/// A listing over the management body limit (16 MiB) is refused, and the log names that limit
/// rather than `max-response-bytes` (the usage queue's, 64 MiB by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_listing_names_the_limit_that_applied() {
    // Full entries with their request histories: about 1.5 KB each, 18 MB in all.
    let cpa = fake_cpa(credentials(12_000), false).await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = spawn(&cpa, &dir, "oversize");
    let said = eventually(Duration::from_secs(60), async || {
        exporter
            .log_text()
            .contains("cannot read CPA's credentials listing")
    })
    .await;
    let log = exporter.log_text();
    assert!(said, "{}", tail(&log));
    let line = log
        .lines()
        .find(|l| l.contains("cannot read CPA's credentials listing"))
        .unwrap();
    assert!(line.contains("16 MiB"), "{line}");
    assert!(line.contains("MAX_MGMT_BODY_BYTES"), "{line}");
    // Before: "CPA's response exceeds 16777216 bytes (max-response-bytes)".
    assert!(!line.contains("bytes (max-response-bytes)"), "{line}");
    let m = exporter.scrape().await;
    assert!(m.series("cpa_credential_info").is_empty());
}

/// utime + stime of the process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields after the name start at field 3 (state): utime is field 14, stime 15.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
