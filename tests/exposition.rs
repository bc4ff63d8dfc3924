//! The exposition formats, checked by Prometheus' own `promtool` where it is installed (CI
//! installs it; a CI run without it fails rather than skipping).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn demo() -> (std::process::Child, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(BIN)
        .args(["demo", "--rate", "200"])
        .env_clear()
        .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CPA_EXPORTER_DB", dir.path().join("demo.db"))
        .env("CPA_EXPORTER_POLL_INTERVAL", "200ms")
        .env("CPA_EXPORTER_NEW_SERIES_HOLD", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, port, dir)
}

async fn get(port: u16, accept: Option<&str>) -> (String, String) {
    let mut req = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/metrics"));
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let resp = req.send().await.unwrap();
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    (ct, resp.text().await.unwrap())
}

#[tokio::test]
async fn demo_serves_both_formats_and_promtool_accepts_the_text() {
    let (mut child, port, _dir) = demo();
    let ready = eventually(Duration::from_secs(20), async || {
        let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
            return false;
        };
        let text = resp.text().await.unwrap_or_default();
        Metrics::parse(&text).sum("cpa_requests_total", &[]) > 0.0
            && Metrics::parse(&text).sum("cpa_time_to_first_token_seconds_count", &[]) > 0.0
    })
    .await;
    assert!(ready, "demo produced no traffic within 20 s");

    let (ct, text) = get(port, None).await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    assert!(text.contains("# TYPE cpa_requests_total counter"));
    for family in [
        "cpa_up",
        "cpa_exporter_build_info",
        "process_resident_memory_bytes",
        "cpa_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(family), "{family} missing");
    }

    let (ct, om) = get(
        port,
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .await;
    assert!(ct.starts_with("application/openmetrics-text; version=1.0.0"));
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE cpa_requests counter"));

    // Exemplars: in OpenMetrics, on latency and time-to-first-token buckets (and failure
    // counters), naming a record by CPA's 8-hex request_id; never in text 0.0.4.
    let with_exemplar: Vec<&str> = om.lines().filter(|l| l.contains(" # {")).collect();
    for family in [
        "cpa_request_duration_seconds_bucket{",
        "cpa_time_to_first_token_seconds_bucket{",
    ] {
        assert!(
            with_exemplar.iter().any(|l| l.starts_with(family)),
            "no exemplar on {family}"
        );
    }
    for line in &with_exemplar {
        assert!(
            [
                "cpa_request_duration_seconds_bucket{",
                "cpa_time_to_first_token_seconds_bucket{",
                "cpa_request_failures_total{",
            ]
            .iter()
            .any(|f| line.starts_with(f)),
            "exemplar on another family: {line}"
        );
        let (_, exemplar) = line.split_once(" # ").unwrap();
        let id = exemplar
            .strip_prefix("{request_id=\"")
            .and_then(|r| r.split_once("\"} "))
            .map(|(id, _)| id)
            .unwrap_or_else(|| panic!("malformed exemplar: {line}"));
        assert!(
            id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{line}"
        );
        // ` value timestamp` after the label set.
        assert_eq!(exemplar.split(' ').count(), 3, "{line}");
    }
    let (_, plain) = get(port, None).await;
    // Help texts may name `request_id`; no sample line carries one.
    for line in plain.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("request_id") && !line.contains(" # "),
            "{line}"
        );
    }

    // q-values are honoured: q=0 refuses a format or an encoding.
    let (ct, _) = get(port, Some("application/openmetrics-text;q=0, text/plain")).await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let (ct, _) = get(
        port,
        Some("application/openmetrics-text;q=0.2, text/plain;q=0.9"),
    )
    .await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{port}/metrics");
    for (accept_encoding, gzip) in [
        ("gzip", true),
        ("gzip;q=0", false),
        ("gzip;q=0, identity", false),
    ] {
        let resp = client
            .get(&url)
            .header("Accept-Encoding", accept_encoding)
            .send()
            .await
            .unwrap();
        let encoding = resp.headers().get("content-encoding").cloned();
        let body = resp.bytes().await.unwrap();
        assert_eq!(
            encoding.is_some_and(|e| e == "gzip"),
            gzip,
            "{accept_encoding}"
        );
        let text = if gzip {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut t)
                .unwrap();
            t
        } else {
            String::from_utf8(body.to_vec()).unwrap()
        };
        assert!(
            text.contains("# TYPE cpa_requests_total counter"),
            "{accept_encoding}"
        );
    }

    match Command::new("promtool").arg("--version").output() {
        Ok(_) => {
            let mut p = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = p.wait_with_output().unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && said.trim().is_empty(),
                "promtool check metrics: {said}"
            );
        }
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("promtool is not installed; .ci/run installs it")
        }
        Err(_) => eprintln!("promtool not installed: skipping `promtool check metrics`"),
    }
    let _ = child.kill();
    let _ = child.wait();
}
