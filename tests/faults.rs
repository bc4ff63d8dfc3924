//! Faults on both sides of the exporter: CPA misbehaving (refused, reset mid-body, slow, 5xx,
//! redirects, oversized or malformed bodies, hostile records) and a state database that cannot
//! commit. In every case the exporter says so in one clear log line, counts it in a metric, and
//! keeps serving `/metrics`.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fake_cpa::{FakeCpa, Fault, SimConfig, WorkloadMix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "faults-test-management-key";

async fn fake_cpa() -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA")
}

/// These tests are about popped batches (held, retried, committed), so they pop: RESP unless a
/// test names its transport. The subscription has its own tests (tests/subscribe.rs).
fn setup<'a>(url: String, dir: &'a tempfile::TempDir, extra: &[(&'a str, &str)]) -> Setup<'a> {
    let mut extra: Vec<(&'a str, String)> =
        extra.iter().map(|(k, v)| (*k, v.to_string())).collect();
    if !extra.iter().any(|(k, _)| *k == "CPA_TRANSPORT") {
        extra.push(("CPA_TRANSPORT", "resp".to_owned()));
    }
    Setup {
        cpa_url: url,
        key: KEY,
        db: Box::leak(dir.path().join("state.db").into_boxed_path()),
        log: dir.path().join("exporter.log"),
        extra,
    }
}

/// Wait until the log says `text`; fail with the log otherwise.
async fn says(exporter: &Exporter, text: &str) {
    let said = eventually(Duration::from_secs(15), async || {
        exporter.log_text().contains(text)
    })
    .await;
    assert!(
        said,
        "the log never said {text:?}:\n{}",
        exporter.log_text()
    );
}

/// `/metrics` answers, and so do `/healthz` and `/`.
async fn still_serving(exporter: &Exporter) -> Metrics {
    for path in ["/healthz", "/"] {
        let r = reqwest::get(exporter.url(path)).await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    let r = reqwest::get(exporter.url("/metrics")).await.unwrap();
    assert!(r.status().is_success());
    Metrics::parse(&r.text().await.unwrap())
}

/// An HTTP server that answers the n-th request with `responses[n]` (the last one repeats), as
/// raw bytes, then closes the connection. Returns its URL and a request counter.
async fn raw_server(responses: Vec<Vec<u8>>) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if head.is_empty() {
                continue;
            }
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let response = &responses[n.min(responses.len() - 1)];
            let _ = conn.write_all(response).await;
            let _ = conn.shutdown().await;
        }
    });
    (url, hits)
}

fn http_200(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

const REC: &str = r#"{"timestamp":"2026-11-24T10:00:00Z","provider":"codex","model":"gpt-5.4","auth_index":"0123456789abcdef","latency_ms":900,"tokens":{"input_tokens":10,"output_tokens":5,"total_tokens":15}}"#;

fn rec_with(field: &str, value: &str) -> String {
    REC.replacen(field, value, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port());
    let exporter = Exporter::spawn(&setup(url, &dir, &[]));
    says(&exporter, "cannot reach CPA").await;
    let m = still_serving(&exporter).await;
    assert_eq!(m.get("cpa_up"), Some(0.0));
    assert!(m.sum("cpa_exporter_polls_total", &[("result", "unreachable")]) >= 1.0);
    assert!(
        exporter.log_text().contains("refused"),
        "{}",
        exporter.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_reset_mid_body_is_counted_and_said_lost() {
    // Headers promise 4000 bytes; 60 arrive, then the connection closes.
    let mut cut =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
            .to_vec();
    // The first element arrived whole: it is a popped record like any other, and is kept.
    cut.extend_from_slice(format!("[{REC},").as_bytes());
    cut.extend_from_slice(&REC.as_bytes()[..60]);
    let (url, _) = raw_server(vec![cut, http_200(b"[]")]).await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(url, &dir, &[("CPA_TRANSPORT", "http")]));
    says(&exporter, "broke off mid-body").await;
    says(&exporter, "the rest of the response is lost").await;
    let m = still_serving(&exporter).await;
    assert!(m.sum("cpa_exporter_polls_total", &[("result", "bad_response")]) >= 1.0);
    assert_eq!(
        m.sum("cpa_exporter_records_total", &[("outcome", "ingested")]),
        1.0
    );
    // It recovers by itself on the next poll.
    let up = eventually(Duration::from_secs(10), async || {
        exporter.scrape().await.get("cpa_up") == Some(1.0)
    })
    .await;
    assert!(up, "{}", exporter.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_slower_than_the_timeout_is_abandoned_over_http_and_resp() {
    for transport in ["http", "resp"] {
        let cpa = fake_cpa().await;
        cpa.set_fault(Some(Fault::Delay(Duration::from_millis(2500))));
        let dir = tempfile::tempdir().unwrap();
        let s = setup(
            cpa.url(),
            &dir,
            &[
                ("CPA_TRANSPORT", transport),
                ("CPA_EXPORTER_HTTP_TIMEOUT", "1s"),
            ],
        );
        let exporter = Exporter::spawn(&s);
        says(&exporter, "did not answer within the timeout").await;
        let m = still_serving(&exporter).await;
        assert_eq!(m.get("cpa_up"), Some(0.0), "{transport}");
        assert!(
            m.sum("cpa_exporter_polls_total", &[("result", "unreachable")]) >= 1.0,
            "{transport}"
        );
        cpa.set_fault(None);
        let up = eventually(Duration::from_secs(15), async || {
            exporter.scrape().await.get("cpa_up") == Some(1.0)
        })
        .await;
        assert!(up, "{transport}: {}", exporter.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_and_nothing_is_popped() {
    let cpa = fake_cpa().await;
    push_workload(&cpa, 1, WorkloadMix::default(), 100);
    cpa.set_fault(Some(Fault::Status(503)));
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(cpa.url(), &dir, &[("CPA_TRANSPORT", "http")]));
    says(&exporter, "CPA answered HTTP 503").await;
    let m = still_serving(&exporter).await;
    assert!(m.sum("cpa_exporter_polls_total", &[("result", "http_error")]) >= 1.0);
    assert_eq!(m.get("cpa_up"), Some(0.0));
    assert_eq!(cpa.stats().popped, 0);
    cpa.set_fault(None);
    let drained = eventually(Duration::from_secs(15), async || {
        accounted(&exporter.scrape().await) == 100.0
    })
    .await;
    assert!(drained, "{}", exporter.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed() {
    let (elsewhere, elsewhere_hits) = raw_server(vec![http_200(b"[]")]).await;
    let redirect = format!(
        "HTTP/1.1 302 Found\r\nLocation: {elsewhere}/v8/management/observability/usage/queue?count=1000\r\nContent-Length: 0\r\n\r\n"
    );
    let (url, hits) = raw_server(vec![redirect.into_bytes()]).await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(url, &dir, &[("CPA_TRANSPORT", "http")]));
    says(&exporter, "CPA answered HTTP 302").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = still_serving(&exporter).await;
    assert!(m.sum("cpa_exporter_polls_total", &[("result", "http_error")]) >= 1.0);
    assert!(hits.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        elsewhere_hits.load(Ordering::SeqCst),
        0,
        "the exporter followed the redirect"
    );
}

/// 3 000 records carrying a 70 KB `fail.body` (a field the exporter never reads) and 2 000
/// small ones: whole pops of 70 MB, over the old 64 MiB response limit, that CPA has already
/// removed from its queue. The response is streamed element by element, so every record counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_lose_no_records_over_http_and_resp() {
    let body = "e".repeat(70_000);
    let big = rec_with(
        r#""latency_ms":900"#,
        &format!(r#""latency_ms":900,"fail":{{"status_code":200,"body":"{body}"}}"#),
    );
    for transport in ["http", "resp"] {
        let cpa = fake_cpa().await;
        for i in 0..5_000 {
            cpa.push_raw(if i % 5 < 3 { &big } else { REC });
        }
        let dir = tempfile::tempdir().unwrap();
        let exporter = Exporter::spawn(&setup(cpa.url(), &dir, &[("CPA_TRANSPORT", transport)]));
        let all = eventually(Duration::from_secs(60), async || {
            accounted(&exporter.scrape().await) == 5_000.0
        })
        .await;
        let m = still_serving(&exporter).await;
        assert!(all, "{transport}: {}", exporter.log_text());
        assert_eq!(
            m.sum("cpa_exporter_records_total", &[("outcome", "ingested")]),
            5_000.0,
            "{transport}"
        );
        assert_eq!(
            m.sum("cpa_exporter_polls_total", &[("result", "bad_response")]),
            0.0,
            "{transport}"
        );
    }
}

/// An element over `max-response-bytes` is skipped unread and counted as invalid with its own
/// reason; the records around it count, and the connection is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_element_over_the_size_limit_is_counted_invalid_over_http_and_resp() {
    let big = rec_with(
        r#""latency_ms":900"#,
        &format!(
            r#""latency_ms":900,"fail":{{"status_code":200,"body":"{}"}}"#,
            "e".repeat(70_000)
        ),
    );
    for transport in ["http", "resp"] {
        let cpa = fake_cpa().await;
        for i in 0..100 {
            cpa.push_raw(if i % 10 == 0 { &big } else { REC });
        }
        let dir = tempfile::tempdir().unwrap();
        let s = setup(
            cpa.url(),
            &dir,
            &[
                ("CPA_TRANSPORT", transport),
                ("CPA_EXPORTER_MAX_RESPONSE_BYTES", "64KiB"),
            ],
        );
        let exporter = Exporter::spawn(&s);
        let all = eventually(Duration::from_secs(15), async || {
            accounted(&exporter.scrape().await) == 100.0
        })
        .await;
        assert!(all, "{transport}: {}", exporter.log_text());
        says(&exporter, "too_large=10").await;
        let m = still_serving(&exporter).await;
        let invalid = |reason| m.sum("cpa_exporter_invalid_records_total", &[("reason", reason)]);
        assert_eq!(invalid("too_large"), 10.0, "{transport}");
        assert_eq!(
            m.sum("cpa_exporter_records_total", &[("outcome", "ingested")]),
            90.0,
            "{transport}"
        );
        assert_eq!(m.get("cpa_up"), Some(1.0), "{transport}");
    }
}

#[test]
fn the_size_limit_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .env_clear()
        .env("CPA_MANAGEMENT_KEY", "k")
        .env("CPA_EXPORTER_DB", dir.path().join("x.db"))
        .env("CPA_EXPORTER_MAX_RESPONSE_BYTES", "12 parsecs")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("maximum response size (from CPA_EXPORTER_MAX_RESPONSE_BYTES)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_an_array() {
    let (url, _) = raw_server(vec![http_200(br#"{"error":"something else"}"#)]).await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(url, &dir, &[("CPA_TRANSPORT", "http")]));
    says(&exporter, "not a JSON array").await;
    says(&exporter, "the rest of the response is lost").await;
    let m = still_serving(&exporter).await;
    assert!(m.sum("cpa_exporter_polls_total", &[("result", "bad_response")]) >= 1.0);
    assert_eq!(m.get("cpa_up"), Some(0.0));
}

/// Elements nested 100 000 deep (as an object, inside a known field, wrapped in a string) each
/// count once as `too_deep`; the records around them are ingested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_elements_are_counted_not_fatal_over_http_and_resp() {
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let elements = [
        REC.to_owned(),
        format!(
            r#"{{"timestamp":"2026-11-24T10:00:00Z","x":{}}}"#,
            deep(100_000)
        ),
        rec_with(
            r#""latency_ms":900"#,
            &format!(r#""latency_ms":{}"#, deep(50_000)),
        ),
        serde_json::to_string(&format!(r#"{{"timestamp":"t","x":{}}}"#, deep(1_000))).unwrap(),
        REC.to_owned(),
    ];
    for transport in ["http", "resp"] {
        let cpa = fake_cpa().await;
        for e in &elements {
            cpa.push_raw(e);
        }
        let dir = tempfile::tempdir().unwrap();
        let exporter = Exporter::spawn(&setup(cpa.url(), &dir, &[("CPA_TRANSPORT", transport)]));
        let done = eventually(Duration::from_secs(15), async || {
            accounted(&exporter.scrape().await) == 5.0
        })
        .await;
        assert!(done, "{transport}: {}", exporter.log_text());
        let m = still_serving(&exporter).await;
        assert_eq!(
            m.sum(
                "cpa_exporter_invalid_records_total",
                &[("reason", "too_deep")]
            ),
            3.0,
            "{transport}"
        );
        assert_eq!(
            m.sum("cpa_exporter_records_total", &[("outcome", "ingested")]),
            2.0
        );
        assert_eq!(m.sum("cpa_requests_total", &[]), 2.0);
        says(&exporter, "reasons=\"too_deep=3\"").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_out_of_range_are_invalid_and_numeric_strings_are_accepted() {
    let cpa = fake_cpa().await;
    let bad = [
        r#""input_tokens":-5"#,
        r#""input_tokens":1.5"#,
        r#""input_tokens":9007199254740993"#,
        r#""input_tokens":18446744073709551616"#,
        r#""input_tokens":1e400"#,
        r#""input_tokens":"lots""#,
    ];
    for b in bad {
        cpa.push_raw(&rec_with(r#""input_tokens":10"#, b));
    }
    cpa.push_raw(&rec_with(r#""latency_ms":900"#, r#""latency_ms":-1"#));
    // A numeric string and an integral float are counts like any other.
    cpa.push_raw(&rec_with(r#""input_tokens":10"#, r#""input_tokens":"10""#));
    cpa.push_raw(&rec_with(r#""input_tokens":10"#, r#""input_tokens":10.0"#));
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(cpa.url(), &dir, &[("CPA_TRANSPORT", "http")]));
    let done = eventually(Duration::from_secs(15), async || {
        accounted(&exporter.scrape().await) == 9.0
    })
    .await;
    assert!(done, "{}", exporter.log_text());
    let m = still_serving(&exporter).await;
    assert_eq!(
        m.sum(
            "cpa_exporter_invalid_records_total",
            &[("reason", "invalid_number")]
        ),
        7.0
    );
    assert_eq!(m.sum("cpa_requests_total", &[]), 2.0);
    assert_eq!(m.sum("cpa_tokens_total", &[]), 30.0);
    says(&exporter, "reasons=\"invalid_number=7\"").await;
}

/// Bytes that are not UTF-8 and control characters in label values: the record is kept with
/// U+FFFD and `?` in its labels; a raw control character (invalid JSON) spoils only its element.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_and_control_characters_in_labels() {
    let mut body = b"[".to_vec();
    body.extend_from_slice(REC.split("gpt-5.4").next().unwrap().as_bytes());
    body.extend_from_slice(b"gpt-\xff\xfe");
    body.extend_from_slice(REC.split("gpt-5.4").nth(1).unwrap().as_bytes());
    body.extend_from_slice(b",");
    body.extend_from_slice(
        REC.replace("gpt-5.4", r"bell\u0007\u009b\nmodel")
            .as_bytes(),
    );
    body.extend_from_slice(b",");
    body.extend_from_slice(REC.replace("gpt-5.4", "raw\x07control").as_bytes());
    body.extend_from_slice(b",");
    body.extend_from_slice(REC.replace("codex", &"p".repeat(500)).as_bytes());
    body.extend_from_slice(b"]");
    let (url, _) = raw_server(vec![http_200(&body), http_200(b"[]")]).await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(url, &dir, &[("CPA_TRANSPORT", "http")]));
    let done = eventually(Duration::from_secs(15), async || {
        accounted(&exporter.scrape().await) == 4.0
    })
    .await;
    assert!(done, "{}", exporter.log_text());
    let m = still_serving(&exporter).await;
    assert_eq!(m.sum("cpa_requests_total", &[]), 3.0);
    assert_eq!(
        m.sum("cpa_requests_total", &[("model", "gpt-\u{fffd}\u{fffd}")]),
        1.0
    );
    assert_eq!(
        m.sum("cpa_requests_total", &[("model", "bell???model")]),
        1.0
    );
    let long: Vec<_> = m
        .series("cpa_requests_total")
        .into_keys()
        .filter(|l| l["provider"].starts_with("ppp"))
        .collect();
    assert_eq!(long.len(), 1);
    assert_eq!(
        long[0]["provider"].len(),
        128,
        "label values are cut to 128 bytes"
    );
    assert_eq!(
        m.sum(
            "cpa_exporter_invalid_records_total",
            &[("reason", "not_json")]
        ),
        1.0
    );
    says(&exporter, "repaired_utf8=1").await;
    // promtool-level sanity: every line of the exposition is still well-formed text.
    let text = exporter.scrape_text().await;
    assert!(!text.chars().any(|c| c.is_control() && c != '\n'));
}

/// 100 000 distinct model names: the series limit holds, the overflow is counted, sums stay exact
/// and `/metrics` keeps answering quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_model_names_stay_within_the_series_limit() {
    let cpa = fake_cpa().await;
    let n = 100_000usize;
    for i in 0..n {
        cpa.push_raw(&format!(
            r#"{{"timestamp":"2026-11-24T10:00:00Z","provider":"codex","model":"m-{i}","tokens":{{"input_tokens":1,"total_tokens":1}}}}"#
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(
        cpa.url(),
        &dir,
        &[("CPA_EXPORTER_BATCH_SIZE", "10000")],
    ));
    let done = eventually(Duration::from_secs(90), async || {
        accounted(&exporter.scrape().await) == n as f64
    })
    .await;
    assert!(done, "{}", exporter.log_text());
    let t = Instant::now();
    let m = still_serving(&exporter).await;
    let scrape = t.elapsed();
    assert_eq!(m.sum("cpa_requests_total", &[]), n as f64);
    assert_eq!(m.sum("cpa_tokens_total", &[]), n as f64);
    for family in ["requests", "tokens", "zero_token_requests"] {
        assert!(
            m.sum("cpa_exporter_series", &[("family", family)]) <= 10_001.0,
            "{family}"
        );
    }
    assert_eq!(
        m.sum("cpa_exporter_series", &[("family", "requests")]),
        10_001.0
    );
    assert_eq!(
        m.sum(
            "cpa_exporter_series_overflow_total",
            &[("family", "requests")]
        ),
        (n - 10_000) as f64
    );
    assert_eq!(
        m.sum("cpa_requests_total", &[("model", "__other__")]),
        (n - 10_000) as f64
    );
    assert!(exporter
        .log_text()
        .contains("family=\"requests\" series_limit=10000"));
    says(&exporter, "reached its series limit").await;
    println!("scrape with 100 000 model names ingested: {scrape:?}");
}

// ---------------------------------------------------------------------------------------------
// The state database cannot commit
// ---------------------------------------------------------------------------------------------

async fn ready_status(exporter: &Exporter) -> (u16, String) {
    let r = reqwest::get(exporter.url("/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// Another process holds SQLite's write lock: commits fail after the busy timeout. The exporter
/// holds the batch, pops nothing more, reports it, and commits by itself once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_holds_the_batch_and_recovers() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let s = setup(cpa.url(), &dir, &[("CPA_EXPORTER_BATCH_SIZE", "300")]);
    let exporter = Exporter::spawn(&s);
    let up = eventually(Duration::from_secs(10), async || {
        exporter.scrape().await.get("cpa_up") == Some(1.0)
    })
    .await;
    assert!(up);
    let lock = rusqlite::Connection::open(s.db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let expected = push_workload_at_once(&cpa, 21, WorkloadMix::default(), 1_000);
    let failed = eventually(Duration::from_secs(20), async || {
        exporter
            .scrape()
            .await
            .get("cpa_exporter_store_errors_total")
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(failed, "{}", exporter.log_text());
    says(&exporter, "cannot commit the batch to the state database").await;
    says(&exporter, "holding it and not popping more").await;
    let (status, body) = ready_status(&exporter).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot commit"), "{body}");
    let m = still_serving(&exporter).await;
    assert_eq!(cpa.stats().popped, 300, "popped more while holding a batch");
    assert_eq!(accounted(&m), 0.0);
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let drained = eventually(Duration::from_secs(30), async || {
        accounted(&exporter.scrape().await) == 1_000.0
    })
    .await;
    assert!(drained, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    assert_eq!(Expected::observed(&m).requests, expected.requests);
    let ready = eventually(Duration::from_secs(10), async || {
        ready_status(&exporter).await.0 == 200
    })
    .await;
    assert!(ready);
}

/// A full disk, for real: the process may not grow any file past its current write-ahead log
/// (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored, so writes fail with EFBIG like ENOSPC). Lifting the
/// limit is the disk getting space again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_the_batch_and_recovers() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let s = setup(cpa.url(), &dir, &[("CPA_EXPORTER_BATCH_SIZE", "300")]);
    let exporter = spawn_ignoring_sigxfsz(&s);
    push_workload(&cpa, 22, WorkloadMix::default(), 300);
    let drained = eventually(Duration::from_secs(15), async || {
        accounted(&exporter.scrape().await) == 300.0
    })
    .await;
    assert!(drained, "{}", exporter.log_text());
    let wal = std::fs::metadata(format!("{}-wal", s.db.display()))
        .map(|m| m.len())
        .unwrap_or(0);
    let log = std::fs::metadata(&exporter.log).map(|m| m.len()).unwrap();
    // Room for the log to grow, none for the database to.
    let limit = wal.max(4096 * 16);
    assert!(log + 16_384 < limit, "log {log}, limit {limit}");
    let pid = exporter.child.id().to_string();
    let set = |value: String| {
        let status = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--fsize={value}")])
            .status()
            .unwrap();
        assert!(status.success());
    };
    set(format!("{limit}:unlimited"));
    let expected = push_workload_at_once(&cpa, 23, WorkloadMix::default(), 1_000);
    let failed = eventually(Duration::from_secs(20), async || {
        exporter
            .scrape()
            .await
            .get("cpa_exporter_store_errors_total")
            .is_some_and(|n| n >= 2.0)
    })
    .await;
    assert!(failed, "{}", exporter.log_text());
    says(&exporter, "cannot commit the batch to the state database").await;
    assert_eq!(ready_status(&exporter).await.0, 503);
    // Small batches popped while the workload was still being pushed may have fitted in the
    // write-ahead log and committed; what matters is that exactly one batch is held and no
    // more is popped while it is.
    let held = cpa.stats().popped as f64 - accounted(&exporter.scrape().await);
    assert!(
        held > 0.0 && held <= 300.0,
        "held {held} records, expected one batch"
    );
    let popped = cpa.stats().popped;
    still_serving(&exporter).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cpa.stats().popped,
        popped,
        "popped more while holding a batch"
    );
    set("unlimited".into());
    let recovered = eventually(Duration::from_secs(30), async || {
        accounted(&exporter.scrape().await) == 1_300.0
    })
    .await;
    assert!(recovered, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    let requests: f64 = expected.requests.values().sum();
    assert!(m.sum("cpa_requests_total", &[]) >= requests);
    exporter.sigterm();
    assert!(exporter.wait_exit(Duration::from_secs(10)).success());
    let (store, _) =
        cpa_usage_exporter::store::Store::open(s.db, cpa_usage_exporter::store::Limits::default())
            .unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

/// Like `Exporter::spawn`, through `sh` so that SIGXFSZ is ignored (inherited over `exec`).
fn spawn_ignoring_sigxfsz(setup: &Setup<'_>) -> Exporter {
    let mut sh = Command::new("sh");
    sh.args(["-c", r#"trap "" XFSZ; exec "$0""#, BIN]);
    Exporter::spawn_via(setup, sh)
}

#[test]
fn a_database_that_cannot_be_opened_stops_the_exporter_at_start() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be.
    let out = Command::new(BIN)
        .env_clear()
        .env("CPA_MANAGEMENT_KEY", "k")
        .env("CPA_EXPORTER_DB", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("state database (--db / CPA_EXPORTER_DB)"),
        "{stderr}"
    );
}

/// The exporter paused (SIGSTOP) for longer than CPA's queue retention, then down across a
/// restart for longer than it: each stretch is one gap, counted and said, though every poll
/// around it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_or_downtime_longer_than_the_retention_is_counted_and_said() {
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        retention: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA");
    let dir = tempfile::tempdir().unwrap();
    let s = setup(cpa.url(), &dir, &[("CPA_TRANSPORT", "http")]);
    let gaps = |m: &Metrics| m.get("cpa_exporter_drain_gaps_total");
    let exporter = Exporter::spawn(&s);
    let known = eventually(Duration::from_secs(15), async || {
        exporter
            .scrape()
            .await
            .get("cpa_usage_queue_retention_seconds")
            == Some(3.0)
    })
    .await;
    assert!(known, "{}", exporter.log_text());
    assert_eq!(gaps(&exporter.scrape().await), Some(0.0));
    let pid = exporter.child.id().to_string();
    let signal = |sig: &str| {
        let status = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    tokio::time::sleep(Duration::from_secs(6)).await;
    signal("-CONT");
    let counted = eventually(Duration::from_secs(10), async || {
        gaps(&exporter.scrape().await) == Some(1.0)
    })
    .await;
    assert!(counted, "{}", exporter.log_text());
    says(&exporter, "longer than CPA's queue retention").await;
    let m = exporter.scrape().await;
    let lost = m.get("cpa_exporter_drain_gap_seconds_total").unwrap();
    assert!((2.0..6.0).contains(&lost), "{lost}");
    assert_eq!(m.get("cpa_up"), Some(1.0));

    // Down across a restart: the last pop before it is in the database.
    exporter.sigterm();
    exporter.wait_exit(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let exporter = Exporter::spawn(&s);
    let counted = eventually(Duration::from_secs(15), async || {
        gaps(&exporter.scrape().await) == Some(1.0)
    })
    .await;
    assert!(counted, "{}", exporter.log_text());
    says(&exporter, "longer than CPA's queue retention").await;
}

/// Lines of the event log at `path` after its first `skip` (a filler written before the start),
/// each with its newline: a line without one was cut.
fn event_lines(path: &std::path::Path, skip: usize) -> Vec<String> {
    let text = std::fs::read(path).unwrap();
    let text = String::from_utf8(text).expect("the event log is UTF-8");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the event log ends in a cut line: {:?}",
        &text[text.len().saturating_sub(200)..]
    );
    text.lines().skip(skip).map(str::to_owned).collect()
}

/// The event log's disk fills up in the middle of a batch, then gets room again. No line is
/// left cut (one would run into the next, and a log store would drop both), and the counts are
/// exact: every line offered is either in the file or counted as failed, never both. Here the
/// files may not grow past a size (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full disk), which needs
/// no privilege.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_event_log_cuts_no_line_and_counts_exactly() {
    if have("prlimit") {
        full_event_log_disk(FullDisk::FileSizeLimit).await;
    }
}

/// The same on a real full file system (ENOSPC): a 64 KiB tmpfs, grown to 4 MiB for the room.
/// Mounting needs root (CAP_SYS_ADMIN), which CI's container lacks: skipped without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tmpfs_under_the_event_log_cuts_no_line_and_counts_exactly() {
    full_event_log_disk(FullDisk::Tmpfs).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FullDisk {
    FileSizeLimit,
    Tmpfs,
}

/// Unmounts its tmpfs when dropped (after the exporter using it).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

async fn full_event_log_disk(how: FullDisk) {
    // FileSizeLimit: the database and its write-ahead log stay far below LIMIT; the event log
    // starts ROOM bytes under it.
    const LIMIT: u64 = 8 * 1024 * 1024;
    const ROOM: u64 = 40_000;
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let (events, filler_lines, _mounted) = match how {
        FullDisk::FileSizeLimit => {
            let events = dir.path().join("events.log");
            let filler = format!("{{\"filler\":\"{}\"}}\n", "x".repeat(85));
            let filler_lines = ((LIMIT - ROOM) / filler.len() as u64) as usize;
            std::fs::write(&events, filler.repeat(filler_lines)).unwrap();
            (events, filler_lines, None)
        }
        FullDisk::Tmpfs => {
            let disk = dir.path().join("disk");
            std::fs::create_dir(&disk).unwrap();
            let mounted = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                .arg(&disk)
                .output();
            if !mounted.is_ok_and(|o| o.status.success()) {
                eprintln!("skipping: cannot mount a tmpfs here (needs root)");
                return;
            }
            (disk.join("events.log"), 0, Some(Mounted(disk)))
        }
    };
    let events_env = events.display().to_string();
    let s = setup(
        cpa.url(),
        &dir,
        &[
            ("CPA_EXPORTER_BATCH_SIZE", "50"),
            ("CPA_EXPORTER_EVENT_LOG", &events_env),
            ("CPA_EXPORTER_EVENT_LOG_MAX_SIZE", "1GiB"),
        ],
    );
    let exporter = spawn_ignoring_sigxfsz(&s);
    let pid = exporter.child.id().to_string();
    let set = |value: &str| {
        let status = match how {
            FullDisk::FileSizeLimit => Command::new("prlimit")
                .args(["--pid", &pid, &format!("--fsize={value}")])
                .status(),
            FullDisk::Tmpfs => Command::new("mount")
                .args(["-o", &format!("remount,size={value}")])
                .arg(events.parent().unwrap())
                .status(),
        };
        assert!(status.unwrap().success());
    };
    if how == FullDisk::FileSizeLimit {
        set(&format!("{LIMIT}:unlimited"));
    }
    let offered = |m: &Metrics| m.sum("cpa_requests_total", &[]);
    let lines = |m: &Metrics| m.get("cpa_exporter_event_log_lines_total").unwrap_or(0.0);
    let failed = |m: &Metrics| m.sum("cpa_exporter_event_log_failures_total", &[]);
    // Until every element is accounted for and the writer has settled its lines (one per
    // attempt; the mix has a few invalid elements and duplicates, which have none).
    let settled = async |elements: f64| {
        eventually(Duration::from_secs(30), async || {
            let m = exporter.scrape().await;
            accounted(&m) == elements && lines(&m) + failed(&m) == offered(&m)
        })
        .await
    };
    push_workload(&cpa, 31, WorkloadMix::default(), 550);
    let full = settled(550.0).await;
    let m = exporter.scrape().await;
    assert!(full, "{:?}\n{}", m.0, exporter.log_text());
    let (written, dropped) = (lines(&m), failed(&m));
    assert!(
        written > 0.0 && dropped > 0.0,
        "the disk filled mid-way: {written} written, {dropped} dropped"
    );
    assert_eq!(
        m.sum(
            "cpa_exporter_event_log_failures_total",
            &[("reason", "write")]
        ),
        dropped
    );
    says(&exporter, "cannot write the event log").await;
    assert_eq!(event_lines(&events, filler_lines).len() as f64, written);

    // Room again: the next lines start on a line of their own.
    set(match how {
        FullDisk::FileSizeLimit => "unlimited",
        FullDisk::Tmpfs => "4m",
    });
    push_workload(&cpa, 32, WorkloadMix::default(), 100);
    assert!(settled(650.0).await, "{}", exporter.log_text());
    let m = exporter.scrape().await;
    let in_file = event_lines(&events, filler_lines);
    for line in &in_file {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "a cut line: {line}");
    }
    assert_eq!(in_file.len() as f64, lines(&m));
    assert_eq!(
        failed(&m),
        dropped,
        "every line after the room came back is written"
    );
    assert_eq!(lines(&m) + failed(&m), offered(&m));
    eprintln!(
        "full disk ({how:?}): {written} lines written and {dropped} dropped while full, then \
         {} in all of {} offered; the file holds {} lines after its filler",
        lines(&m),
        offered(&m),
        in_file.len()
    );
    drop(exporter);
}

/// A second exporter on a database another one is using is refused at start, before it pops
/// anything: its batches could never commit (`UNIQUE constraint failed`) and would be lost.
/// `check` commits what it pops, so it is refused beside a running exporter too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_exporter_on_the_same_database_is_refused_at_start() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let s = setup(cpa.url(), &dir, &[]);
    let first = Exporter::spawn(&s);
    push_workload(&cpa, 41, WorkloadMix::default(), 200);
    drained(&first, &cpa, 200.0).await;
    let popped = cpa.stats().popped;
    let db = s.db.display().to_string();

    let second_log = dir.path().join("second.log");
    let mut second = Command::new(BIN)
        .env_clear()
        .env("CPA_URL", cpa.url())
        .env("CPA_MANAGEMENT_KEY", KEY)
        .env("CPA_EXPORTER_DB", s.db)
        .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .stderr(std::fs::File::create(&second_log).unwrap())
        .spawn()
        .unwrap();
    let exited = eventually(Duration::from_secs(20), async || {
        second.try_wait().unwrap().is_some()
    })
    .await;
    let _ = second.kill();
    let status = second.wait().unwrap();
    let stderr = std::fs::read_to_string(&second_log).unwrap();
    assert!(
        exited,
        "the second exporter runs beside the first:\n{stderr}"
    );
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&db), "{stderr}");
    assert!(stderr.contains("another cpa-usage-exporter"), "{stderr}");

    let check = Command::new(BIN)
        .args(["check", "--consumer-window", "1s"])
        .env_clear()
        .env("CPA_URL", cpa.url())
        .env("CPA_MANAGEMENT_KEY", KEY)
        .env("CPA_EXPORTER_DB", s.db)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success(), "{stdout}");
    let database = stdout
        .lines()
        .find(|l| l.contains("database"))
        .unwrap_or_default();
    assert!(database.starts_with("FAIL"), "{stdout}");
    assert!(database.contains("another cpa-usage-exporter"), "{stdout}");
    assert!(database.contains("stop the exporter"), "{stdout}");
    assert_eq!(
        cpa.stats().popped,
        popped,
        "nothing popped beside the first"
    );

    // The first one carries on; once it stops, the database is free again.
    push_workload(&cpa, 42, WorkloadMix::default(), 100);
    drained(&first, &cpa, 300.0).await;
    first.sigterm();
    assert!(first.wait_exit(Duration::from_secs(10)).success());
    let next = Exporter::spawn(&s);
    drained(&next, &cpa, 300.0).await;
}

/// The state database is deleted, or replaced by another file, under a running exporter: its
/// commits go to a file nobody will open again, and a restart would start from zero. It is
/// noticed: `/readyz` fails naming the file, the log says so once, and
/// `cpa_exporter_store_healthy` drops to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_database_deleted_or_replaced_under_the_exporter_is_noticed() {
    let cpa = fake_cpa().await;
    for replace in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let s = setup(cpa.url(), &dir, &[]);
        let exporter = Exporter::spawn(&s);
        push_workload(&cpa, 51, WorkloadMix::default(), 100);
        drained(&exporter, &cpa, 100.0).await;
        let ready = eventually(Duration::from_secs(15), async || {
            ready_status(&exporter).await.0 == 200
        })
        .await;
        assert!(ready, "{}", exporter.log_text());
        assert_eq!(
            exporter.scrape().await.get("cpa_exporter_store_healthy"),
            Some(1.0)
        );
        if replace {
            let other = dir.path().join("restored.db");
            std::fs::write(&other, b"").unwrap();
            std::fs::rename(&other, s.db).unwrap();
        } else {
            std::fs::remove_file(s.db).unwrap();
        }
        let noticed = eventually(Duration::from_secs(20), async || {
            ready_status(&exporter).await.0 == 503
        })
        .await;
        assert!(noticed, "{}", exporter.log_text());
        let (_, body) = ready_status(&exporter).await;
        let db = s.db.display().to_string();
        assert!(body.contains(&db), "{body}");
        let what = if replace { "replaced" } else { "deleted" };
        assert!(body.contains(what), "{body}");
        assert_eq!(
            exporter.scrape().await.get("cpa_exporter_store_healthy"),
            Some(0.0)
        );
        // More batches commit meanwhile; the log says it once.
        push_workload(&cpa, 52, WorkloadMix::default(), 50);
        drained(&exporter, &cpa, 150.0).await;
        let log = exporter.log_text();
        let said: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(what) && l.contains(&db))
            .collect();
        assert_eq!(said.len(), 1, "{log}");
        assert!(said[0].contains("ERROR"), "{log}");
        assert_eq!(ready_status(&exporter).await.0, 503);
    }
}
