//! The RESP transport, end to end: the real binary against the fake CPA's RESP side (AUTH first,
//! `LPOP usage N`), compared with HTTP on the same workload, with `auto` selection, a wrong key,
//! dropped connections, a CPA restart, and what each transport costs CPA.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fake_cpa::{FakeCpa, Fault, SimConfig, SimStats, WorkloadMix};

const KEY: &str = "test-management-key";

fn sim_config(resp_enabled: bool) -> SimConfig {
    SimConfig {
        management_key: KEY.to_owned(),
        resp_enabled,
        ..SimConfig::default()
    }
}

async fn fake_cpa(resp_enabled: bool) -> FakeCpa {
    FakeCpa::start(sim_config(resp_enabled))
        .await
        .expect("fake CPA")
}

fn setup<'a>(
    cpa: &FakeCpa,
    key: &'a str,
    dir: &'a tempfile::TempDir,
    name: &str,
    transport: Option<&str>,
) -> Setup<'a> {
    let s = Setup::in_dir(cpa, key, dir, name);
    match transport {
        Some(t) => s.with_env("CPA_TRANSPORT", t),
        None => s,
    }
}

fn merge(into: &mut Expected, more: Expected) {
    let add = |a: &mut BTreeMap<Vec<String>, f64>, b: BTreeMap<Vec<String>, f64>| {
        for (k, v) in b {
            *a.entry(k).or_default() += v;
        }
    };
    add(&mut into.requests, more.requests);
    add(&mut into.failures, more.failures);
    add(&mut into.tokens, more.tokens);
    for (k, v) in more.outcomes {
        *into.outcomes.entry(k).or_default() += v;
    }
    into.latency_count += more.latency_count;
    into.ttft_count += more.ttft_count;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_and_http_produce_identical_counters_for_the_same_workload() {
    let mix = edge_case_mix();
    let n = 3_000;
    let batch = 250;
    let mut observed = Vec::new();
    for transport in ["resp", "http"] {
        let cpa = fake_cpa(true).await;
        let dir = tempfile::tempdir().unwrap();
        let expected = push_workload(&cpa, 42, mix, n);
        let mut s = setup(&cpa, KEY, &dir, transport, Some(transport));
        s.extra.push(("CPA_EXPORTER_BATCH_SIZE", batch.to_string()));
        let exporter = Exporter::spawn(&s);
        let m = drained(&exporter, &cpa, n as f64).await;
        let seen = Expected::observed(&m);
        assert_eq!(seen.outcomes, expected.outcomes, "{transport}");
        assert_eq!(seen.invalid, expected.invalid, "{transport}");
        assert_eq!(seen.requests, expected.requests, "{transport}");
        assert_eq!(seen.failures, expected.failures, "{transport}");
        assert_eq!(seen.tokens, expected.tokens, "{transport}");
        assert_eq!(seen.latency_count, expected.latency_count, "{transport}");
        assert_eq!(seen.ttft_count, expected.ttft_count, "{transport}");
        assert!(
            exporter.log_text().contains(&format!(
                "route=\"{}\"",
                if transport == "resp" { "resp" } else { "v8" }
            )),
            "{}",
            exporter.log_text()
        );
        let stats = cpa.stats();
        // AUTH went first: not a single failed login.
        assert_eq!(stats.auth_failures, 0, "{transport}");
        if transport == "resp" {
            assert_eq!((stats.resp_connections, stats.resp_auths), (1, 1));
            assert!(stats.resp_pops >= (n / batch) as u64);
            assert_eq!(stats.queue_requests, 0, "no HTTP pops over RESP");
        } else {
            assert_eq!(stats.resp_connections, 0);
            assert!(stats.queue_requests >= (n / batch) as u64);
        }
        observed.push(seen);
    }
    assert_eq!(observed[0], observed[1], "RESP and HTTP disagree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_subscribes_when_cpa_speaks_resp_and_uses_http_when_it_does_not() {
    for resp_enabled in [true, false] {
        let name = if resp_enabled { "resp" } else { "no-resp" };
        let cpa = fake_cpa(resp_enabled).await;
        let dir = tempfile::tempdir().unwrap();
        let expected = push_workload(&cpa, 7, WorkloadMix::default(), 500);
        // No CPA_TRANSPORT: `auto` is the default.
        let exporter = Exporter::spawn(&setup(&cpa, KEY, &dir, name, None));
        let m = drained(&exporter, &cpa, 500.0).await;
        assert_eq!(Expected::observed(&m).requests, expected.requests, "{name}");
        let stats = cpa.stats();
        let log = exporter.log_text();
        assert_eq!(
            stats.auth_failures, 0,
            "{name}: the probe cost no failed login"
        );
        if resp_enabled {
            assert!(log.contains("CPA speaks RESP"), "{log}");
            assert!(log.contains("route=\"resp\""), "{log}");
            // One AUTH per connection, none per pop: the connection that drains the queue, the
            // usage subscription and the errors subscription.
            assert!(
                eventually(Duration::from_secs(5), async || cpa.stats().resp_auths == 3).await,
                "{:?}",
                cpa.stats()
            );
            assert_eq!(cpa.stats().queue_requests, 0);
        } else {
            assert!(log.contains("does not speak RESP"), "{log}");
            assert!(
                log.contains("using HTTP for the life of the process"),
                "{log}"
            );
            assert_eq!(stats.resp_connections, 0);
            assert!(stats.queue_requests > 0);
            // Decided once: later polls never probe RESP again.
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert_eq!(
                log.matches("using HTTP for the life of the process")
                    .count(),
                1
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_over_resp_is_one_attempt_and_never_tried_over_http() {
    for transport in ["resp", "auto"] {
        let cpa = fake_cpa(true).await;
        let dir = tempfile::tempdir().unwrap();
        let wrong = "not-the-key-4242";
        let exporter = Exporter::spawn(&setup(&cpa, wrong, &dir, transport, Some(transport)));
        let said = eventually(Duration::from_secs(10), async || {
            exporter.log_text().contains("wrong key")
        })
        .await;
        assert!(said, "{transport}: {}", exporter.log_text());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stats = cpa.stats();
        assert_eq!(
            stats.auth_failures, 1,
            "{transport}: exactly one failed login, far under CPA's 5-failure ban"
        );
        assert_eq!(
            (stats.resp_auths, stats.queue_requests),
            (0, 0),
            "{transport}"
        );
        let m = exporter.scrape().await;
        assert_eq!(m.get("cpa_up"), Some(0.0));
        assert_eq!(
            m.sum("cpa_exporter_polls_total", &[("result", "unauthorized")]),
            1.0,
            "{transport}"
        );
        let log = exporter.log_text();
        assert!(
            !log.contains(wrong),
            "{transport}: the key leaked into the log"
        );
        if transport == "auto" {
            assert!(log.contains("not trying HTTP"), "{log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_reconnects_after_dropped_connections_and_a_restart_without_losing_counts() {
    let cpa = fake_cpa(true).await;
    let addr: SocketAddr = cpa.url().trim_start_matches("http://").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut expected = push_workload(&cpa, 5, WorkloadMix::default(), 1_000);
    let mut s = setup(&cpa, KEY, &dir, "reconnect", Some("resp"));
    s.extra.push(("CPA_EXPORTER_BATCH_SIZE", "100".into()));
    let exporter = Exporter::spawn(&s);
    drained(&exporter, &cpa, 1_000.0).await;

    // CPA drops the connection on every pop for a while: nothing is popped, the exporter says
    // it is down, then reconnects (and authenticates again) once pops work.
    cpa.set_fault(Some(Fault::ResetConnection));
    merge(
        &mut expected,
        push_workload(&cpa, 6, WorkloadMix::default(), 500),
    );
    let down = eventually(Duration::from_secs(10), async || {
        exporter.scrape().await.get("cpa_up") == Some(0.0)
    })
    .await;
    assert!(down, "{}", exporter.log_text());
    cpa.set_fault(None);
    drained(&exporter, &cpa, 1_500.0).await;
    let stats = cpa.stats();
    assert!(stats.resp_auths >= 2, "reconnected: {stats:?}");
    assert_eq!(stats.auth_failures, 0);

    // CPA restarts on the same port (its queue starts empty).
    cpa.shutdown();
    let restarted = restart_on(addr).await;
    merge(
        &mut expected,
        push_workload(&restarted, 8, WorkloadMix::default(), 300),
    );
    let m = drained(&exporter, &restarted, 1_800.0).await;
    let seen = Expected::observed(&m);
    assert_eq!(seen.requests, expected.requests, "committed counts kept");
    assert_eq!(seen.tokens, expected.tokens);
    assert_eq!(accounted(&m), 1_800.0);
    assert_eq!(restarted.stats().resp_auths, 1);
    assert_eq!(restarted.stats().auth_failures, 0);
}

async fn restart_on(addr: SocketAddr) -> FakeCpa {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match FakeCpa::start_on(sim_config(true), addr).await {
            Ok(cpa) => return cpa,
            Err(e) if Instant::now() > deadline => panic!("cannot restart the fake CPA: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// An exporter with the built-in idle interval (the harness pins 200 ms).
fn spawn_with_default_interval(
    cpa: &FakeCpa,
    dir: &tempfile::TempDir,
    transport: &str,
) -> Exporter {
    let port = free_port();
    let log = dir.path().join(format!("{transport}.log"));
    let child = Command::new(BIN)
        .env_clear()
        .env("CPA_URL", cpa.url())
        .env("CPA_MANAGEMENT_KEY", KEY)
        .env(
            "CPA_EXPORTER_DB",
            dir.path().join(format!("{transport}.db")),
        )
        .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CPA_TRANSPORT", transport)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn exporter");
    Exporter { child, port, log }
}

/// CPA-side cost of each transport at its default idle interval, measured on the fake CPA over
/// a window and extrapolated to a minute. Run with `--nocapture` to see the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpa_side_cost_per_minute_at_default_intervals() {
    let window = Duration::from_secs(15);
    let http_cpa = fake_cpa(true).await;
    let resp_cpa = fake_cpa(true).await;
    let dir = tempfile::tempdir().unwrap();
    let http = spawn_with_default_interval(&http_cpa, &dir, "http");
    let resp = spawn_with_default_interval(&resp_cpa, &dir, "resp");
    let started = eventually(Duration::from_secs(20), async || {
        http_cpa.stats().queue_requests > 0 && resp_cpa.stats().resp_pops > 0
    })
    .await;
    assert!(started, "{}\n{}", http.log_text(), resp.log_text());
    let (h0, r0, t0) = (http_cpa.stats(), resp_cpa.stats(), Instant::now());
    tokio::time::sleep(window).await;
    let (h1, r1, secs) = (
        http_cpa.stats(),
        resp_cpa.stats(),
        t0.elapsed().as_secs_f64(),
    );
    let per_min = |a: u64, b: u64| (b - a) as f64 * 60.0 / secs;
    let bcrypt = |s: &SimStats| s.queue_requests + s.resp_auths + s.auth_failures;
    let http_polls = per_min(h0.queue_requests, h1.queue_requests);
    let http_bcrypt = per_min(bcrypt(&h0), bcrypt(&h1));
    let resp_pops = per_min(r0.resp_pops, r1.resp_pops);
    let resp_bcrypt = per_min(bcrypt(&r0), bcrypt(&r1));
    eprintln!(
        "CPA-side cost over {secs:.1} s, per minute: HTTP {http_polls:.1} queue polls = {http_bcrypt:.1} bcrypt checks; \
         RESP {resp_pops:.1} pops, {resp_bcrypt:.1} bcrypt checks ({} AUTH on {} connection in all)",
        r1.resp_auths, r1.resp_connections
    );
    // HTTP at 5 s: 12 polls a minute, each one bcrypt check. A loaded machine only slows the
    // loop down, so the upper bound is the promise and the lower one just proves it polls.
    assert!((6.0..=16.0).contains(&http_polls), "{http_polls}");
    assert_eq!(http_polls, http_bcrypt);
    // RESP at 1 s: about 60 pops a minute and no bcrypt check after the one AUTH.
    assert!((30.0..=66.0).contains(&resp_pops), "{resp_pops}");
    assert_eq!(resp_bcrypt, 0.0);
    assert_eq!((r1.resp_auths, r1.resp_connections), (1, 1));
}

/// The fake CPA's RESP side, spoken to with the exporter's own RESP codec.
mod fake_resp {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use cpa_usage_exporter::cpa::resp::{encode_command, parse_reply, OwnedReply, Parsed};
    use fake_cpa::{FakeCpa, Fault, SimConfig};

    const KEY: &str = "sim-management-key";

    struct Client {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    impl Client {
        async fn connect(cpa: &FakeCpa) -> Client {
            let addr = cpa.url().trim_start_matches("http://").to_owned();
            Client {
                stream: TcpStream::connect(addr).await.expect("connect"),
                buf: Vec::new(),
            }
        }

        /// Send a command, return its reply (`None`: the connection closed).
        async fn call(&mut self, args: &[&str]) -> Option<OwnedReply> {
            let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            self.stream
                .write_all(&encode_command(&args))
                .await
                .expect("write");
            self.reply().await
        }

        async fn reply(&mut self) -> Option<OwnedReply> {
            loop {
                if let Ok(Parsed::Complete(reply, len)) = parse_reply(&self.buf, 1 << 20) {
                    let owned = reply.to_owned_reply();
                    self.buf.drain(..len);
                    return Some(owned);
                }
                let mut chunk = [0u8; 4096];
                let read =
                    tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk));
                match read.await.expect("reply in time") {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        }
    }

    fn err(text: &str) -> Option<OwnedReply> {
        Some(OwnedReply::Error(text.as_bytes().to_vec()))
    }

    fn bulks(items: &[&str]) -> Option<OwnedReply> {
        Some(OwnedReply::Array(Some(
            items
                .iter()
                .map(|i| OwnedReply::Bulk(Some(i.as_bytes().to_vec())))
                .collect(),
        )))
    }

    async fn start(cfg: SimConfig) -> FakeCpa {
        FakeCpa::start(cfg).await.expect("start")
    }

    #[tokio::test]
    async fn auth_first_and_noauth_counts_toward_the_shared_ban() {
        let cpa = start(SimConfig::default()).await;
        let mut c = Client::connect(&cpa).await;
        assert_eq!(
            c.call(&["PING"]).await,
            err("NOAUTH Authentication required.")
        );
        assert_eq!(
            c.call(&["HELLO", "3"]).await,
            err("NOAUTH Authentication required.")
        );
        assert_eq!(cpa.stats().auth_failures, 2, "NOAUTH is a failed login");
        assert_eq!(
            c.call(&["AUTH", "wrong"]).await,
            err("ERR invalid management key")
        );
        assert_eq!(
            c.call(&["AUTH"]).await,
            err("ERR wrong number of arguments for 'auth' command")
        );
        assert_eq!(cpa.stats().auth_failures, 4);
        // The connection stays usable after a refusal.
        assert_eq!(
            c.call(&["AUTH", "default", KEY]).await,
            Some(OwnedReply::Simple(b"OK".to_vec()))
        );
        let stats = cpa.stats();
        assert_eq!((stats.resp_auths, stats.resp_connections), (1, 1));
        // A success resets the count; five failures from this IP ban it for HTTP too.
        let mut other = Client::connect(&cpa).await;
        for _ in 0..5 {
            assert_eq!(
                other.call(&["PING"]).await,
                err("NOAUTH Authentication required.")
            );
        }
        match other.call(&["AUTH", KEY]).await {
            Some(OwnedReply::Error(e)) => {
                let e = String::from_utf8_lossy(&e).into_owned();
                assert!(
                    e.starts_with("ERR IP banned due to too many failed attempts. Try again in "),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        let http = reqwest::Client::new()
            .get(format!("{}/v0/management/usage-queue", cpa.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("http");
        assert_eq!(http.status(), 403, "the ban is shared with HTTP");
    }

    #[tokio::test]
    async fn lpop_and_rpop_pop_the_oldest_from_the_http_queue() {
        let cpa = start(SimConfig::default()).await;
        for e in [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#] {
            cpa.push_raw(e);
        }
        let mut c = Client::connect(&cpa).await;
        assert_eq!(
            c.call(&["AUTH", KEY]).await,
            Some(OwnedReply::Simple(b"OK".to_vec()))
        );
        assert_eq!(
            c.call(&["LPOP", "usage", "2"]).await,
            bulks(&[r#"{"n":1}"#, r#"{"n":2}"#])
        );
        assert_eq!(
            c.call(&["RPOP", "usage"]).await,
            Some(OwnedReply::Bulk(Some(br#"{"n":3}"#.to_vec())))
        );
        assert_eq!(
            c.call(&["LPOP", "usage"]).await,
            Some(OwnedReply::Bulk(None))
        );
        assert_eq!(c.call(&["lpop", "usage", "100"]).await, bulks(&[]));
        assert_eq!(
            c.call(&["LPOP", "errors", "2"]).await,
            err("ERR unsupported channel 'errors'")
        );
        assert_eq!(
            c.call(&["LPOP", "usage", "x"]).await,
            err("ERR value is not an integer or out of range")
        );
        assert_eq!(
            c.call(&["GET", "k"]).await,
            err("ERR unknown command 'get'")
        );
        let stats = cpa.stats();
        assert_eq!(
            (stats.popped, stats.resp_pops, stats.queue_requests),
            (3, 4, 0),
            "HTTP queue_requests count HTTP pops only"
        );
        assert_eq!((stats.resp_auths, stats.auth_failures), (1, 0));
    }

    #[tokio::test]
    async fn payloads_go_out_as_published() {
        let cpa = start(SimConfig::default()).await;
        // Not JSON: HTTP wraps it in a JSON string, RESP sends the bytes. A JSON string
        // payload (double-encoded record) is JSON, so it goes out as it is on both.
        cpa.push_raw("not json");
        cpa.push_raw(r#""{\"n\":2}""#);
        let mut c = Client::connect(&cpa).await;
        c.call(&["AUTH", KEY]).await;
        assert_eq!(
            c.call(&["LPOP", "usage", "5"]).await,
            bulks(&["not json", r#""{\"n\":2}""#])
        );
    }

    #[tokio::test]
    async fn disabled_resp_answers_like_http_and_disabled_management_closes() {
        let cpa = start(SimConfig {
            resp_enabled: false,
            ..SimConfig::default()
        })
        .await;
        let mut c = Client::connect(&cpa).await;
        c.stream
            .write_all(&encode_command(&[b"AUTH", KEY.as_bytes()]))
            .await
            .unwrap();
        let mut text = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.stream.read_to_end(&mut text)).await;
        assert!(
            text.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&text)
        );
        let stats = cpa.stats();
        assert_eq!((stats.resp_connections, stats.auth_failures), (0, 0));

        let cpa = start(SimConfig::default()).await;
        cpa.set_management_key("");
        let mut c = Client::connect(&cpa).await;
        assert_eq!(c.call(&["AUTH", KEY]).await, None);
    }

    #[tokio::test]
    async fn faults_apply_to_resp_pops() {
        let cpa = start(SimConfig::default()).await;
        cpa.push_raw("1");
        let mut c = Client::connect(&cpa).await;
        c.call(&["AUTH", KEY]).await;
        cpa.set_fault(Some(Fault::ResetConnection));
        assert_eq!(c.call(&["LPOP", "usage", "5"]).await, None);
        assert_eq!(cpa.stats().queued, 1, "a reset pops nothing");
        cpa.set_fault(Some(Fault::Delay(Duration::from_millis(50))));
        let mut c = Client::connect(&cpa).await;
        c.call(&["AUTH", KEY]).await;
        assert_eq!(c.call(&["LPOP", "usage", "5"]).await, bulks(&["1"]));
        cpa.set_fault(None);
        // Not an array: a protocol error, then the connection closes.
        c.stream.write_all(b"$4\r\nPING\r\n").await.unwrap();
        assert_eq!(c.reply().await, err("ERR protocol error"));
        assert_eq!(c.reply().await, None);
    }
}
