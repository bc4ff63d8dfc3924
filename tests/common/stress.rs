//! Hostile loads on the real binary, shared by the tests (which check that every answer comes,
//! complete) and `cargo bench --bench stress` (which reports the figures).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpa_usage_exporter::families::Family;
use cpa_usage_exporter::ingest::from_body;
use cpa_usage_exporter::pricing::Pricing;
use cpa_usage_exporter::store::{Limits, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Exporter;

/// Fill a state database to the default series limit: every capped family holds 10 000 label
/// sets (about 430 000 samples, 48 MB of text 0.0.4), or `requests` series in the requests
/// family for smaller states. Returns the stored series.
pub fn fill_state(db: &Path, requests: usize) -> usize {
    let pricing = Pricing::embedded();
    let (mut store, mut state) = Store::open(db, Limits::default()).unwrap();
    let mut i = 0usize;
    while state.series_count(Family::Requests) < requests.min(10_000) {
        let elems: Vec<String> = (0..1000.min(requests))
            .map(|_| {
                i += 1;
                format!(
                    r#"{{"timestamp":"2026-11-24T10:00:00Z","provider":"codex","model":"model-{i}","auth_index":"{:016x}","api_key":"sk-{}","endpoint":"POST /v1/responses","latency_ms":{},"ttft_ms":{},"failed":{},"tokens":{{"input_tokens":100,"output_tokens":20,"cached_tokens":50,"reasoning_tokens":5,"total_tokens":125}}}}"#,
                    i % 389,
                    i % 7,
                    i % 30_000,
                    i % 3_000,
                    i.is_multiple_of(2)
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
        // Now, so that series retirement leaves them be.
        store
            .commit(&mut plan, cpa_usage_exporter::time::unix_now() as i64)
            .unwrap();
        store.apply(&mut state, plan);
    }
    state.total_series()
}

pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Reset the process's peak resident memory to its current size (Linux: `5 > clear_refs`).
pub fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// A complete body: it ends where the exposition ends, with at least `samples` samples.
fn assert_complete(body: &str, samples: usize, what: &str) {
    let n = body.lines().filter(|l| !l.starts_with('#')).count();
    assert!(n >= samples, "{what}: only {n} samples of {samples}");
    assert!(
        body.lines()
            .last()
            .is_some_and(|l| l.starts_with("process_max_fds") || l == "# EOF"),
        "{what}: the body does not end with the exposition's last line"
    );
}

/// `/metrics`, decoded, with the given encoding and format asked for.
pub async fn scrape(exporter: &Exporter, gzip: bool, openmetrics: bool) -> String {
    let client = new_client(Duration::from_secs(120));
    let mut req = client
        .get(exporter.url("/metrics"))
        .header("X-Prometheus-Scrape-Timeout-Seconds", "110");
    if gzip {
        req = req.header("Accept-Encoding", "gzip");
    }
    if openmetrics {
        req = req.header("Accept", "application/openmetrics-text;version=1.0.0");
    }
    let resp = req.send().await.expect("scrape");
    assert_eq!(resp.status(), 200);
    let gzipped = resp
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v == "gzip");
    assert_eq!(gzipped, gzip);
    let bytes = resp.bytes().await.expect("whole body");
    if gzipped {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
            .expect("valid gzip");
        text
    } else {
        String::from_utf8(bytes.to_vec()).unwrap()
    }
}

/// Peak resident memory (KiB) of the exporter: idle, then after one text scrape, one gzip
/// scrape and ten parallel scrapes (text, gzip and OpenMetrics), each body checked complete.
#[derive(Debug)]
pub struct MemoryFigures {
    pub idle: u64,
    pub text: u64,
    pub gzip: u64,
    pub parallel: u64,
}

pub async fn memory_under_scrapes(exporter: &Exporter, samples: usize) -> MemoryFigures {
    let pid = exporter.child.id();
    let idle = vm_hwm_kib(pid);
    assert_complete(&scrape(exporter, false, false).await, samples, "text");
    let text = vm_hwm_kib(pid);
    assert_complete(&scrape(exporter, true, false).await, samples, "gzip");
    let gzip = vm_hwm_kib(pid);
    let bodies = futures_join((0..10).map(|i| scrape(exporter, i % 3 == 0, i % 3 == 1))).await;
    for (i, body) in bodies.iter().enumerate() {
        assert_complete(body, samples, &format!("parallel scrape {i}"));
    }
    let parallel = vm_hwm_kib(pid);
    MemoryFigures {
        idle,
        text,
        gzip,
        parallel,
    }
}

/// Run futures that borrow from the caller concurrently, in order of results.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}

/// Hostile connections that keep coming back: `idle` ones send nothing, the others trickle one
/// header byte every 2 s. Each is reopened as soon as the server closes it.
pub fn hostile_connections(
    port: u16,
    idle: usize,
    trickling: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..idle + trickling)
        .map(|i| {
            tokio::spawn(async move {
                loop {
                    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let mut buf = [0u8; 64];
                    if i < idle {
                        let _ = c.read(&mut buf).await;
                        continue;
                    }
                    for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
                        if c.write_all(&[*byte]).await.is_err() {
                            break;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {},
                            _ = c.read(&mut buf) => break,
                        }
                    }
                }
            })
        })
        .collect()
}

/// `n` scrapes one after another (each on a new connection, 10 s timeout, 0.5 s apart) behind
/// 200 idle and 200 trickling connections; their durations.
pub async fn scrapes_behind_hostile_connections(exporter: &Exporter, n: usize) -> Vec<Duration> {
    let hostile = hostile_connections(exporter.port, 200, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut took = Vec::new();
    for i in 0..n {
        let client = new_client(Duration::from_secs(10));
        let start = Instant::now();
        let resp = client
            .get(exporter.url("/metrics"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("scrape {i} behind 400 hostile connections: {e}"));
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.expect("whole body").contains("cpa_up"));
        took.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for h in hostile {
        h.abort();
    }
    took
}

/// What a password flood leaves to others.
#[derive(Debug)]
pub struct FloodFigures {
    pub healthz: Duration,
    /// The first, uncached, correct login's status (200, or 429 if the flood shut it out).
    pub login_status: u16,
    pub first_login: Duration,
    /// Wrong-password requests answered (401 or 429) while it ran.
    pub refused: usize,
}

/// The users of [`web_config_with_password`]; both have the password [`RIGHT_PASSWORD`].
pub const FLOODED_USER: &str = "prometheus";
pub const OTHER_USER: &str = "grafana";
pub const RIGHT_PASSWORD: &str = "right-password";

/// Who a password flood aims at, and how.
#[derive(Debug, Clone, Copy)]
pub enum Flood {
    /// `prometheus` with one wrong password, again and again.
    RepeatedPassword,
    /// `prometheus` with a new wrong password each time, as a brute force does.
    VaryingPasswords,
    /// A new user name that does not exist, each time with a new password.
    UnknownUsers,
}

impl Flood {
    /// The `n`-th attempt of flooding client `client`.
    fn attempt(self, client: usize, n: usize) -> (String, String) {
        match self {
            Flood::RepeatedPassword => (FLOODED_USER.to_owned(), "wrong-password".to_owned()),
            Flood::VaryingPasswords => (FLOODED_USER.to_owned(), format!("guess-{client}-{n}")),
            Flood::UnknownUsers => (
                format!("nobody-{client}-{n}"),
                format!("guess-{client}-{n}"),
            ),
        }
    }
}

/// 200 clients sending `flood`'s wrong credentials as fast as they are answered; after 2 s,
/// time `/healthz` and a first login of `login` with the right password.
pub async fn password_flood(exporter: &Exporter, flood: Flood, login: &str) -> FloodFigures {
    let url = exporter.url("/metrics");
    let refused = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..200)
        .map(|client| {
            let (url, refused) = (url.clone(), refused.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder().no_proxy().build().unwrap();
                for n in 0.. {
                    let (user, password) = flood.attempt(client, n);
                    let r = http.get(&url).basic_auth(user, Some(password)).send().await;
                    match r.map(|r| r.status().as_u16()) {
                        Ok(401 | 429) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(other) => panic!("a wrong password got {other}"),
                        // An idle keep-alive connection evicted for a newcomer.
                        Err(_) => {}
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = new_client(Duration::from_secs(20));
    let start = Instant::now();
    let health = client.get(exporter.url("/healthz")).send().await;
    let healthz = start.elapsed();
    assert_eq!(health.expect("/healthz during the flood").status(), 200);
    // The login opens its own connection, as a scraper's first scrape does: a kept-alive one
    // may be closed between two requests when a newcomer needs its slot (HTTP/1.1 keep-alive
    // allows that; Go's client, Prometheus', retries such a GET, reqwest does not).
    let client = new_client(Duration::from_secs(20));
    let start = Instant::now();
    let login = client
        .get(&url)
        .basic_auth(login, Some(RIGHT_PASSWORD))
        .send()
        .await
        .expect("the right password during the flood");
    let first_login = start.elapsed();
    for c in clients {
        c.abort();
    }
    FloodFigures {
        healthz,
        login_status: login.status().as_u16(),
        first_login,
        refused: refused.load(Ordering::Relaxed),
    }
}

/// A web config with two users, [`FLOODED_USER`] and [`OTHER_USER`], whose password
/// [`RIGHT_PASSWORD`] is hashed at bcrypt's usual cost 10.
pub fn web_config_with_password(dir: &Path) -> std::path::PathBuf {
    let web = dir.join("web.yml");
    let users: String = [FLOODED_USER, OTHER_USER]
        .iter()
        .map(|u| format!("  {u}: '{}'\n", bcrypt::hash(RIGHT_PASSWORD, 10).unwrap()))
        .collect();
    std::fs::write(&web, format!("basic_auth_users:\n{users}")).unwrap();
    web
}

/// A client that ignores proxy variables and gives up after `timeout`; each has its own
/// connections.
fn new_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .unwrap()
}
