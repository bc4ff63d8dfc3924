//! The subscribe transport, end to end: the real binary against the fake CPA, which publishes as
//! CPA does (while any client subscribes, records go to the subscribers and are not queued; a
//! subscriber 256 messages behind is dropped, and what it missed is gone).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cpa_usage_exporter::cpa::resp::{encode_command, Decoder, OwnedReply};
use fake_cpa::{FakeCpa, SimConfig, WorkloadMix};
use tokio::io::AsyncWriteExt;

const KEY: &str = "subscribe-test-management-key";

async fn fake_cpa() -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        retention: Duration::from_secs(3600),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA")
}

fn setup<'a>(cpa: &FakeCpa, dir: &'a tempfile::TempDir, name: &str, transport: &str) -> Setup<'a> {
    Setup::in_dir(cpa, KEY, dir, name).with_env("CPA_TRANSPORT", transport)
}

/// Another collector (cpa-usage-keeper, CPA-Manager-Plus, hyec/cpa-exporter): `AUTH`, then
/// `SUBSCRIBE usage`, counting the elements it is sent (control payloads aside).
struct OtherCollector {
    records: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtherCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn other_collector(cpa: &FakeCpa) -> OtherCollector {
    let addr = cpa.url().trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&encode_command(&[b"AUTH", KEY.as_bytes()]))
        .await
        .unwrap();
    stream
        .write_all(&encode_command(&[b"SUBSCRIBE", b"usage"]))
        .await
        .unwrap();
    let records = Arc::new(AtomicUsize::new(0));
    let counted = records.clone();
    let task = tokio::spawn(async move {
        let mut decoder = Decoder::new(1 << 20);
        while let Ok(value) = decoder.value(&mut stream, 1 << 21).await {
            if let OwnedReply::Array(Some(items)) = value {
                if let [OwnedReply::Bulk(Some(kind)), _, OwnedReply::Bulk(Some(payload))] =
                    &items[..]
                {
                    let usage = kind == b"message" && payload != br#"{"support_refresh":true}"#;
                    counted.fetch_add(usize::from(usage), Ordering::Relaxed);
                }
            }
        }
    });
    let up = eventually(Duration::from_secs(5), async || {
        cpa.stats().usage_subscribers == 1
    })
    .await;
    assert!(up, "the other collector subscribed");
    OtherCollector { records, task }
}

async fn subscribed(exporter: &Exporter) {
    let up = eventually(Duration::from_secs(20), async || {
        exporter.scrape().await.get("cpa_exporter_subscribed") == Some(1.0)
    })
    .await;
    assert!(up, "not subscribed; log:\n{}", exporter.log_text());
}

async fn ingested(exporter: &Exporter, n: f64) -> Metrics {
    let mut last = Metrics::default();
    let done = eventually(Duration::from_secs(30), async || {
        last = exporter.scrape().await;
        last.sum("cpa_exporter_records_total", &[("outcome", "ingested")]) >= n
    })
    .await;
    assert!(
        done,
        "ingested {} of {n}; log:\n{}",
        last.sum("cpa_exporter_records_total", &[("outcome", "ingested")]),
        exporter.log_text()
    );
    // A scrape renders chunk by chunk and may meet a commit half way; the next one, with
    // nothing left to commit, shows every family after it.
    exporter.scrape().await
}

/// Only usage records: control payloads are counted apart (one `support_refresh` per
/// subscription), which would make a sum of every outcome depend on how often it subscribed.
fn usage_only() -> WorkloadMix {
    WorkloadMix {
        control: 0.0,
        ..edge_case_mix()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_another_collector_every_record_is_counted_and_a_popper_counts_none() {
    let cpa = fake_cpa().await;
    let other = other_collector(&cpa).await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(&cpa, &dir, "subscribe", "subscribe"));
    subscribed(&exporter).await;
    let popper_dir = tempfile::tempdir().unwrap();
    let popper = Exporter::spawn(&setup(&cpa, &popper_dir, "popper", "resp"));
    let expected = push_workload(&cpa, 3, usage_only(), 600);
    let ingested_n = expected.outcomes["ingested"];
    let m = ingested(&exporter, ingested_n).await;
    let seen = Expected::observed(&m);
    assert_eq!(seen.requests, expected.requests);
    assert_eq!(seen.failures, expected.failures);
    assert_eq!(seen.tokens, expected.tokens);
    assert_eq!(seen.outcomes["ingested"], ingested_n);
    assert_eq!(seen.invalid, expected.invalid);
    let stats = cpa.stats();
    assert_eq!(stats.queued, 0, "published, never queued");
    assert_eq!(stats.lost, 0);
    let got_other = eventually(Duration::from_secs(5), async || {
        other.records.load(Ordering::Relaxed) == 600
    })
    .await;
    assert!(got_other, "the other collector got every record too");
    // The reason the transport exists: a queue popper beside a subscriber sees nothing.
    let popped = popper.scrape().await;
    assert_eq!(
        popped.sum("cpa_exporter_records_total", &[("outcome", "ingested")]),
        0.0
    );
    assert_eq!(popped.get("cpa_up"), Some(1.0), "and nothing says so");
    assert_eq!(m.get("cpa_exporter_subscription_drops_total"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_traffic_loses_nothing() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&cpa, &dir, "restart", "subscribe");
    let exporter = Exporter::spawn(&s);
    subscribed(&exporter).await;
    let mut expected = push_workload(&cpa, 5, usage_only(), 300);
    ingested(&exporter, expected.outcomes["ingested"]).await;
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(20)).success());
    // Nobody subscribed: CPA queues, and the next exporter drains the queue.
    let while_down = push_workload(&cpa, 6, usage_only(), 200);
    assert_eq!(cpa.stats().queued, 200);
    let exporter = Exporter::spawn(&s);
    subscribed(&exporter).await;
    let after = push_workload(&cpa, 7, usage_only(), 100);
    for more in [while_down, after] {
        for (k, v) in more.requests {
            *expected.requests.entry(k).or_default() += v;
        }
        for (k, v) in more.tokens {
            *expected.tokens.entry(k).or_default() += v;
        }
        for (k, v) in more.outcomes {
            *expected.outcomes.entry(k).or_default() += v;
        }
    }
    let m = ingested(&exporter, expected.outcomes["ingested"]).await;
    let seen = Expected::observed(&m);
    assert_eq!(seen.requests, expected.requests);
    assert_eq!(seen.tokens, expected.tokens);
    assert_eq!(seen.outcomes["ingested"], expected.outcomes["ingested"]);
    assert_eq!(cpa.stats().queued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscription_is_counted_and_exactly_what_cpa_lost_is_missing() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(&cpa, &dir, "dropped", "subscribe"));
    subscribed(&exporter).await;
    // A stalled exporter: the socket buffers fill, then CPA's 256 messages, then CPA drops it.
    exporter.signal("-STOP");
    let mut pushed = 0.0;
    for seed in 0..40 {
        push_workload_at_once(&cpa, 100 + seed, usage_only(), 1_000);
        pushed += 1_000.0;
        if cpa.stats().subscribers_dropped > 0 {
            break;
        }
    }
    let stats = cpa.stats();
    exporter.signal("-CONT");
    assert_eq!(stats.subscribers_dropped, 1, "{stats:?}");
    assert!(stats.lost > 0, "{stats:?}");
    // Records pushed after the drop were queued (no subscriber): drained after resubscribing.
    let lost = stats.lost as f64;
    let usage = |m: &Metrics| {
        ["ingested", "invalid", "duplicate"]
            .iter()
            .map(|o| m.sum("cpa_exporter_records_total", &[("outcome", o)]))
            .sum::<f64>()
    };
    let done = eventually(Duration::from_secs(30), async || {
        usage(&exporter.scrape().await) >= pushed - lost
    })
    .await;
    assert!(done, "{}", exporter.log_text());
    let subscribed_again = eventually(Duration::from_secs(10), async || {
        exporter.scrape().await.get("cpa_exporter_subscribed") == Some(1.0)
    })
    .await;
    assert!(subscribed_again);
    let m = exporter.scrape().await;
    assert_eq!(m.get("cpa_exporter_subscription_drops_total"), Some(1.0));
    // Exactly what CPA says it lost is missing: nothing else.
    assert_eq!(usage(&m), pushed - lost, "lost {lost} of {pushed}");
    assert!(m
        .get("cpa_exporter_subscription_gap_seconds_total")
        .is_some());
    let log = exporter.log_text();
    assert!(log.contains("the subscription ended"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_notice_has_the_credentials_listing_read_at_once() {
    let cpa = fake_cpa().await;
    let workload = fake_cpa::Workload::new(9, WorkloadMix::default());
    let mut creds = workload.credentials();
    let last = creds.pop().expect("credentials");
    cpa.set_credentials(creds.clone());
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(&cpa, &dir, "refresh", "subscribe"));
    subscribed(&exporter).await;
    // The first read, then one every 30 s by default (the test harness keeps the default).
    let listed = |n: usize| {
        let exporter = &exporter;
        async move {
            eventually(Duration::from_secs(5), async || {
                exporter.scrape().await.series("cpa_credential_info").len() == n
            })
            .await
        }
    };
    assert!(listed(creds.len()).await);
    creds.push(last);
    cpa.set_credentials(creds.clone());
    assert!(
        listed(creds.len()).await,
        "the listing was read within 5 s of CPA's refresh notice, not 30"
    );
    let m = exporter.scrape().await;
    assert_eq!(m.get("cpa_exporter_credential_refreshes_total"), Some(1.0));
    assert_eq!(
        m.sum("cpa_exporter_records_total", &[("outcome", "invalid")]),
        0.0,
        "control payloads are not invalid records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_keeps_what_cpa_already_sent_to_the_subscription() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&cpa, &dir, "stop", "subscribe");
    let exporter = Exporter::spawn(&s);
    subscribed(&exporter).await;
    // Published while the exporter cannot read: in its socket and CPA's buffer when it stops.
    exporter.signal("-STOP");
    let expected = push_workload_at_once(&cpa, 21, usage_only(), 200);
    assert_eq!(cpa.stats().subscribers_dropped, 0);
    exporter.signal("-TERM");
    exporter.signal("-CONT");
    assert!(exporter.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(cpa.stats().queued, 0, "published, not queued");
    let exporter = Exporter::spawn(&s);
    subscribed(&exporter).await;
    let m = ingested(&exporter, expected.outcomes["ingested"]).await;
    assert_eq!(Expected::observed(&m).requests, expected.requests);
}
