//! The exporter against the real CLIProxyAPI v7.2.140 (`CPA_REAL_BIN`), not the fake: a
//! client sends chat requests through the real CPA to an upstream stub run by the test, and the
//! exporter's counters must equal what the client and the stub saw, exactly, over each
//! transport; with failover across upstream keys; beside another collector subscribed to CPA;
//! across an exporter restart in the middle of traffic; and the fake CPA, fed the records the
//! real one published, must make the exporter say the same thing.
//!
//! Without `CPA_REAL_BIN` every test here prints a note and passes, except under `CI`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::realcpa::*;
use common::*;
use cpa_usage_exporter::families::{Family, Kind};
use fake_cpa::{FakeCpa, SimConfig};

/// Short, so a failed client request counts as one within the tests' patience.
const FAILOVER_WINDOW: &str = "1s";
/// How long the exporter may take to report what the client saw.
const SETTLE: Duration = Duration::from_secs(20);
/// Requests in flight at once.
const PARALLEL: usize = 4;

/// A real CPA in front of a stub upstream, and a directory for the exporters' files.
struct Rig {
    upstream: Upstream,
    cpa: RealCpa,
    dir: tempfile::TempDir,
    auth_index: BTreeMap<String, String>,
}

impl Rig {
    async fn start(cfg: CpaConfig) -> Option<Rig> {
        let bin = real_cpa_bin()?;
        let upstream = Upstream::start().await;
        let cpa = RealCpa::start(&bin, &upstream, &cfg).await;
        let auth_index = cpa.auth_indexes().await;
        assert_eq!(auth_index.len(), cfg.upstream_keys.len(), "{auth_index:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        Some(Rig {
            upstream,
            cpa,
            dir,
            auth_index,
        })
    }

    /// An exporter on this rig's CPA, with its own database `name.db`.
    fn exporter(&self, name: &str, transport: &str) -> Exporter {
        spawn_exporter(&self.cpa.url(), self.dir.path(), name, transport)
    }

    fn truth(&self, traffic: &Traffic) -> Truth {
        traffic.truth(&self.upstream, &self.auth_index)
    }

    /// CPA's own per-key count agrees with what the stub answered.
    async fn assert_cpa_counted_like_the_stub(&self) {
        let mut stub: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for a in self.upstream.attempts() {
            let e = stub.entry(a.upstream_key).or_default();
            if a.status == 200 {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        assert_eq!(self.cpa.api_key_usage().await, stub, "CPA's own count");
    }
}

fn spawn_exporter(cpa_url: &str, dir: &Path, name: &str, transport: &str) -> Exporter {
    let setup = Setup {
        cpa_url: cpa_url.to_owned(),
        key: MANAGEMENT_KEY,
        db: Box::leak(dir.join(format!("{name}.db")).into_boxed_path()),
        log: dir.join(format!("{name}.log")),
        extra: vec![
            ("CPA_TRANSPORT", transport.to_owned()),
            ("CPA_EXPORTER_FAILOVER_WINDOW", FAILOVER_WINDOW.to_owned()),
        ],
    };
    Exporter::spawn(&setup)
}

/// Waits until the exporter reports `truth` with no request left open, then checks it exactly.
async fn settled(exporter: &Exporter, truth: &Truth) -> Metrics {
    let mut last = Metrics::default();
    eventually(SETTLE, async || {
        last = exporter.scrape().await;
        last.get("cpa_exporter_open_requests") == Some(0.0) && Truth::observed(&last) == *truth
    })
    .await;
    assert_eq!(
        Truth::observed(&last),
        *truth,
        "exporter vs truth; exporter log:\n{}",
        exporter.log_text()
    );
    assert_routes(&last);
    last
}

/// Exact counts over one transport: two client keys, streamed and not, with 500s and 429s from
/// the single upstream key (CPA does not retry: each is a failed client request).
async fn exact_counts(transport: &str) {
    let Some(rig) = Rig::start(CpaConfig::default()).await else {
        return;
    };
    let exporter = rig.exporter("exporter", transport);
    let client = rig.cpa.client();
    let mut traffic = Traffic::default();
    let chats = plan(24, 1);
    rig.upstream
        .set_fault(UPSTREAM_KEYS[0], Some(UpstreamFault::Next(500, 3)));
    traffic.send(&client, &chats[..12], PARALLEL).await;
    rig.upstream
        .set_fault(UPSTREAM_KEYS[0], Some(UpstreamFault::Next(429, 2)));
    traffic.send(&client, &chats[12..], PARALLEL).await;

    let truth = rig.truth(&traffic);
    assert_eq!(truth.total_requests(), 24);
    assert_eq!(truth.client_failures.values().sum::<u64>(), 5, "{truth:?}");
    settled(&exporter, &truth).await;
    rig.assert_cpa_counted_like_the_stub().await;
}

#[tokio::test]
async fn exact_counts_over_http() {
    exact_counts("http").await;
}

#[tokio::test]
async fn exact_counts_over_resp() {
    exact_counts("resp").await;
}

#[tokio::test]
async fn exact_counts_over_subscribe() {
    exact_counts("subscribe").await;
}

/// `auto` against the real v7.2.140 picks `subscribe`.
#[tokio::test]
async fn auto_subscribes_to_the_real_cpa() {
    let Some(rig) = Rig::start(CpaConfig::default()).await else {
        return;
    };
    let exporter = rig.exporter("exporter", "auto");
    subscribed(&exporter).await;
}

/// Two upstream keys, one always 429, CPA retrying across both: every client request succeeds,
/// its failed attempt counts as absorbed failover, not as a client failure.
async fn failover(transport: &str, wait_first_poll: bool) {
    let Some(rig) = Rig::start(CpaConfig::failover()).await else {
        return;
    };
    rig.upstream
        .set_fault(UPSTREAM_KEYS[1], Some(UpstreamFault::Always(429)));
    let exporter = rig.exporter("exporter", transport);
    if wait_first_poll {
        ready(&exporter, transport).await;
    }
    let mut traffic = Traffic::default();
    traffic
        .send(&rig.cpa.client(), &plan(20, 2), PARALLEL)
        .await;

    let truth = rig.truth(&traffic);
    assert!(traffic.sent.iter().all(|s| s.status == 200));
    assert!(truth.client_failures.is_empty());
    let absorbed: u64 = truth.failovers.values().sum();
    // CPA's round robin decides which key a request tries first: most take the 429 key first.
    assert!(absorbed >= 10, "only {absorbed} of 20 requests failed over");
    assert_eq!(
        truth.failovers.keys().collect::<Vec<_>>(),
        [&(rig.auth_index[UPSTREAM_KEYS[1]].clone(), "429".to_owned())]
    );
    let m = settled(&exporter, &truth).await;
    assert_eq!(m.sum("cpa_inbound_requests_total", &[]), 20.0);
    assert_eq!(
        m.sum("cpa_request_failures_total", &[("status_code", "429")]),
        absorbed as f64
    );
    rig.assert_cpa_counted_like_the_stub().await;
}

#[tokio::test]
async fn failover_over_resp() {
    failover("resp", true).await;
}

/// The same while the exporter's first pop (connect, AUTH) is under way: records CPA publishes
/// meanwhile must keep their own start times.
#[tokio::test]
async fn failover_while_the_first_pop_is_under_way() {
    failover("subscribe", false).await;
    failover("resp", false).await;
    failover("http", false).await;
}

#[tokio::test]
async fn failover_over_subscribe() {
    failover("subscribe", true).await;
}

#[tokio::test]
async fn failover_over_http() {
    failover("http", true).await;
}

/// Waits until the exporter has connected: subscribed, or one pop done.
async fn ready(exporter: &Exporter, transport: &str) {
    if transport == "subscribe" {
        subscribed(exporter).await;
    }
    polled(exporter, 1).await;
}

/// Waits until the exporter is subscribed to CPA's usage channel.
async fn subscribed(exporter: &Exporter) {
    let ok = eventually(SETTLE, async || {
        exporter.scrape().await.get("cpa_exporter_subscribed") == Some(1.0)
    })
    .await;
    assert!(ok, "not subscribed; log:\n{}", exporter.log_text());
}

/// Waits until the exporter completed `n` successful polls.
async fn polled(exporter: &Exporter, n: u64) {
    let ok = eventually(SETTLE, async || {
        exporter
            .scrape()
            .await
            .sum("cpa_exporter_polls_total", &[("result", "success")])
            >= n as f64
    })
    .await;
    assert!(ok, "no successful poll; log:\n{}", exporter.log_text());
}

/// Another collector (cpa-usage-keeper and friends) stays subscribed the whole time: with the
/// `subscribe` transport the exporter still counts every record, and so does the other one.
#[tokio::test]
async fn beside_another_subscriber_subscribe_counts_every_record() {
    let Some(rig) = Rig::start(CpaConfig::default()).await else {
        return;
    };
    let other = Collector::subscribe(&rig.cpa, "usage").await;
    let exporter = rig.exporter("exporter", "subscribe");
    // Records published before it subscribes go to the other collector only.
    subscribed(&exporter).await;
    rig.upstream
        .set_fault(UPSTREAM_KEYS[0], Some(UpstreamFault::Next(500, 2)));
    let mut traffic = Traffic::default();
    traffic
        .send(&rig.cpa.client(), &plan(20, 3), PARALLEL)
        .await;

    let truth = rig.truth(&traffic);
    settled(&exporter, &truth).await;
    let n = truth.total_attempts() as usize;
    assert!(other.wait_records(n, SETTLE).await);
    assert_eq!(other.records().len(), n);
}

/// Why `subscribe` exists: while another collector is subscribed, CPA queues nothing, so an
/// exporter that pops the queue (`http` or `resp`) sees none of the records.
#[tokio::test]
async fn beside_another_subscriber_a_queue_popping_exporter_sees_nothing() {
    let Some(rig) = Rig::start(CpaConfig::default()).await else {
        return;
    };
    let other = Collector::subscribe(&rig.cpa, "usage").await;
    let http = rig.exporter("http", "http");
    let resp = rig.exporter("resp", "resp");
    let mut traffic = Traffic::default();
    traffic
        .send(&rig.cpa.client(), &plan(12, 4), PARALLEL)
        .await;
    assert!(other.wait_records(12, SETTLE).await);
    // Both exporters polled many times since (every 200 ms) and got nothing.
    let polled = eventually(SETTLE, async || {
        let ok = |m: &Metrics| m.sum("cpa_exporter_polls_total", &[("result", "success")]);
        ok(&http.scrape().await) >= 5.0 && ok(&resp.scrape().await) >= 5.0
    })
    .await;
    assert!(polled, "exporters did not poll");
    for e in [&http, &resp] {
        let m = e.scrape().await;
        assert_eq!(accounted(&m), 0.0, "log:\n{}", e.log_text());
    }
}

/// The exporter is stopped (SIGTERM) between two requests of ongoing traffic, stays down while
/// requests go on, and starts again in the middle of them, with nobody else subscribed: CPA
/// queues what it publishes while nobody is subscribed, and the exporter drains it after it
/// subscribes again. Exact counts. (A stop in the middle of a burst is the ignored test below.)
#[tokio::test]
async fn subscribe_exporter_restart_mid_traffic_loses_nothing() {
    let Some(rig) = Rig::start(CpaConfig::default()).await else {
        return;
    };
    rig.upstream
        .set_fault(UPSTREAM_KEYS[0], Some(UpstreamFault::Next(500, 2)));
    let client = rig.cpa.client();
    let chats = plan(36, 5);
    let mut traffic = Traffic::default();
    let first = rig.exporter("exporter", "subscribe");
    subscribed(&first).await;
    traffic.send(&client, &chats[..8], PARALLEL).await;
    first.sigterm();
    let status = exited(first).await;
    assert!(status.success(), "exporter exit: {status:?}");
    // One request every 10 ms while the exporter is down and while it starts again.
    let (url, dir) = (rig.cpa.url(), rig.dir.path().to_owned());
    let (_, (back_at, second)) = tokio::join!(
        traffic.send_paced(&client, &chats[8..], Duration::from_millis(10)),
        async {
            tokio::time::sleep(Duration::from_millis(80)).await;
            let second = tokio::task::spawn_blocking(move || {
                spawn_exporter(&url, &dir, "exporter", "subscribe")
            })
            .await
            .expect("restart");
            (rig.upstream.attempts().len(), second)
        }
    );
    assert!(back_at > 8, "no request while the exporter was down");
    assert!(
        rig.upstream.attempts().len() > back_at,
        "traffic ended before the exporter was back"
    );
    settled(&second, &rig.truth(&traffic)).await;
}

/// SIGTERM in the middle of a burst: records CPA already wrote to the exporter's subscription
/// when it stops must be counted before it exits (or CPA told to stop sending first), else they
/// are gone: CPA does not queue what it published.
#[tokio::test]
#[ignore = "CPA discards what it has buffered for a subscriber when it unsubscribes, so a stop in \
            the middle of a burst can lose the records CPA had queued for the exporter but not \
            yet written (1 of 48 in 1 of 3 runs); run by hand with --ignored"]
async fn subscribe_exporter_sigterm_during_a_burst_loses_nothing() {
    let Some(rig) = Rig::start(CpaConfig::default()).await else {
        return;
    };
    let client = rig.cpa.client();
    let mut traffic = Traffic::default();
    let first = rig.exporter("first", "subscribe");
    subscribed(&first).await;
    let burst = plan(48, 9);
    let (_, status) = tokio::join!(traffic.send(&client, &burst, 8), async {
        tokio::time::sleep(Duration::from_millis(15)).await;
        first.sigterm();
        exited(first).await
    });
    assert!(status.success(), "exporter exit: {status:?}");
    // The same database: what the first one committed and what the second drains add up.
    let second = rig.exporter("first", "subscribe");
    settled(&second, &rig.truth(&traffic)).await;
}

/// Waits (without blocking the runtime) for a stopped exporter to exit.
async fn exited(mut exporter: Exporter) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = exporter.child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exporter did not exit; log:\n{}",
            exporter.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPA's `errors` channel: one event per failed upstream attempt, with the credential and the
/// status (what `cpa_credential_errors_total` is built from).
#[tokio::test]
async fn errors_channel_carries_one_event_per_failed_attempt() {
    let Some(rig) = Rig::start(CpaConfig::default()).await else {
        return;
    };
    let errors = Collector::subscribe(&rig.cpa, "errors").await;
    rig.upstream
        .set_fault(UPSTREAM_KEYS[0], Some(UpstreamFault::Next(429, 3)));
    let mut traffic = Traffic::default();
    traffic.send(&rig.cpa.client(), &plan(6, 6), 1).await;
    assert_eq!(traffic.sent.iter().filter(|s| s.status == 429).count(), 3);
    let three = eventually(Duration::from_secs(5), async || {
        errors.messages().len() >= 3
    })
    .await;
    assert!(three, "errors: {:?}", errors.messages());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = errors.messages();
    assert_eq!(events.len(), 3, "{events:?}");
    for e in &events {
        let v: serde_json::Value = serde_json::from_str(e).expect("JSON event");
        assert_eq!(v["provider"], PROVIDER, "{v}");
        assert_eq!(v["status_code"], 429, "{v}");
        assert_eq!(
            v["auth_index"],
            rig.auth_index[UPSTREAM_KEYS[0]].as_str(),
            "{v}"
        );
    }
}

/// After upstream 429s, `cpa_credential_errors_total` (from the errors channel) moves within a
/// second.
#[tokio::test]
async fn credential_errors_counter_moves_within_a_second() {
    let Some(rig) = Rig::start(CpaConfig::default()).await else {
        return;
    };
    let exporter = rig.exporter("exporter", "subscribe");
    let credential = rig.auth_index[UPSTREAM_KEYS[0]].clone();
    let labels = [
        ("provider", PROVIDER),
        ("credential", credential.as_str()),
        ("status_code", "429"),
    ];
    // Error events are never queued: the exporter must be listening before they happen.
    let listening = eventually(SETTLE, async || {
        exporter
            .scrape()
            .await
            .get("cpa_exporter_errors_subscribed")
            == Some(1.0)
    })
    .await;
    assert!(
        listening,
        "not subscribed to errors; log:\n{}",
        exporter.log_text()
    );
    rig.upstream
        .set_fault(UPSTREAM_KEYS[0], Some(UpstreamFault::Next(429, 3)));
    let mut traffic = Traffic::default();
    traffic.send(&rig.cpa.client(), &plan(3, 7), 1).await;
    let moved = eventually(Duration::from_secs(1), async || {
        exporter
            .scrape()
            .await
            .sum("cpa_credential_errors_total", &labels)
            == 3.0
    })
    .await;
    assert!(
        moved,
        "cpa_credential_errors_total{labels:?} = {}; log:\n{}",
        exporter
            .scrape()
            .await
            .sum("cpa_credential_errors_total", &labels),
        exporter.log_text()
    );
}

/// The samples of the usage families (every stored family), for comparing two exporters.
fn usage_families(m: &Metrics) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let names: Vec<String> = Family::ALL
        .iter()
        .flat_map(|f| match f.kind() {
            Kind::Counter => vec![format!("{}_total", f.metric_name())],
            Kind::Histogram(_) => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{}{s}", f.metric_name()))
                .collect(),
        })
        .collect();
    m.0.iter()
        .filter(|((n, _), _)| names.contains(n))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// The samples that differ between two scrapes' usage families, one line each.
fn differences(a: &Metrics, b: &Metrics) -> Vec<String> {
    let (a, b) = (usage_families(a), usage_families(b));
    let keys: std::collections::BTreeSet<_> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{} {:?}: {:?} vs {:?}", k.0, k.1, a.get(k), b.get(k)))
        .collect()
}

/// The records the real CPA published, replayed into the fake CPA: an exporter on each, with
/// the same transport, reports the same usage families.
#[tokio::test]
async fn fake_cpa_fed_real_records_gives_identical_usage_families() {
    let Some(rig) = Rig::start(CpaConfig::failover()).await else {
        return;
    };
    let transport = "subscribe";
    let other = Collector::subscribe(&rig.cpa, "usage").await;
    let real = rig.exporter("real", transport);
    subscribed(&real).await;
    rig.upstream
        .set_fault(UPSTREAM_KEYS[1], Some(UpstreamFault::Next(500, 4)));
    let mut traffic = Traffic::default();
    traffic
        .send(&rig.cpa.client(), &plan(16, 8), PARALLEL)
        .await;
    let truth = rig.truth(&traffic);
    let real_metrics = settled(&real, &truth).await;
    let n = truth.total_attempts() as usize;
    assert!(other.wait_records(n, SETTLE).await);
    let records = other.records();
    assert_eq!(records.len(), n);

    let fake = FakeCpa::start(SimConfig {
        management_key: MANAGEMENT_KEY.to_owned(),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA");
    let replica = spawn_exporter(&fake.url(), rig.dir.path(), "fake", transport);
    subscribed(&replica).await;
    // Records only: the fake sends its own control payload to each subscriber, as CPA does.
    for r in &records {
        fake.push_raw(r);
    }
    let fake_metrics = settled(&replica, &truth).await;
    let differ = differences(&fake_metrics, &real_metrics);
    assert!(differ.is_empty(), "fake vs real:\n{}", differ.join("\n"));
}
