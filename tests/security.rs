//! Security: protected endpoints (exporter-toolkit web config: TLS with reload, basic auth,
//! bearer token), slow clients, where the management key may go (no redirects, no proxy from
//! the environment), planted secrets at trace level in every component, private state files.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use cpa_usage_exporter::http::{self, ConnLimits, Protection, ServeOptions, WebConfig};
use cpa_usage_exporter::metrics::LabelOptions;
use cpa_usage_exporter::metrics::Shared;
use cpa_usage_exporter::store::State;
use fake_cpa::{FakeCpa, Fault, Routes, SimConfig, Workload, WorkloadMix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "planted-management-key-9fQ2";

async fn fake_cpa() -> FakeCpa {
    FakeCpa::start(SimConfig {
        management_key: KEY.to_owned(),
        routes: Routes::Both,
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA")
}

fn setup<'a>(cpa_url: String, dir: &'a tempfile::TempDir, name: &str) -> Setup<'a> {
    Setup {
        cpa_url,
        key: KEY,
        db: Box::leak(dir.path().join(format!("{name}.db")).into_boxed_path()),
        log: dir.path().join(format!("{name}.log")),
        extra: Vec::new(),
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate PEM, key PEM).
fn self_signed() -> (String, String) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate");
    (ck.cert.pem(), ck.key_pair.serialize_pem())
}

/// Replace a file the way deployment tools do: write beside it, then rename over it.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A client that trusts only `ca_pem`, with a fresh connection pool.
fn tls_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn bcrypt_hash(password: &str) -> String {
    // Cost 4 (the minimum) keeps the debug-build tests fast; production hashes use 10 or more.
    bcrypt::hash(password, 4).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_scrapes_and_a_replaced_certificate_is_used_for_new_connections() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a) = self_signed();
    std::fs::write(dir.path().join("cert.pem"), &cert_a).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key_a).unwrap();
    // Relative names resolve against the web config's directory.
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  min_version: TLS12\n",
    )
    .unwrap();
    let mut s = setup(cpa.url(), &dir, "tls");
    s.extra
        .push(("CPA_EXPORTER_WEB_CONFIG", web.display().to_string()));
    let exporter = Exporter::spawn(&s);
    let url = |path: &str| format!("https://127.0.0.1:{}{path}", exporter.port);

    let resp = tls_client(&cert_a).get(url("/metrics")).send().await;
    let resp = resp.unwrap_or_else(|e| panic!("TLS scrape: {e}; log:\n{}", exporter.log_text()));
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("cpa_up"));
    // Plain HTTP on the TLS port gets nothing.
    assert!(plain_client()
        .get(exporter.url("/metrics"))
        .send()
        .await
        .is_err());
    // The container healthcheck reads the same web config and speaks TLS.
    let health = std::process::Command::new(BIN)
        .arg("healthcheck")
        .env_clear()
        .env("CPA_EXPORTER_LISTEN", format!("0.0.0.0:{}", exporter.port))
        .env("CPA_EXPORTER_WEB_CONFIG", &web)
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );

    // Rotate: the new certificate is served to new connections, the old one no longer.
    let (cert_b, key_b) = self_signed();
    replace(&dir.path().join("key.pem"), &key_b);
    replace(&dir.path().join("cert.pem"), &cert_b);
    let resp = tls_client(&cert_b).get(url("/healthz")).send().await;
    let resp = resp.unwrap_or_else(|e| panic!("after reload: {e}; log:\n{}", exporter.log_text()));
    assert_eq!(resp.status(), 200);
    assert!(tls_client(&cert_a)
        .get(url("/healthz"))
        .send()
        .await
        .is_err());
    assert!(exporter
        .log_text()
        .contains("TLS certificate and key reloaded"));

    // A broken replacement keeps the certificate in force.
    replace(&dir.path().join("cert.pem"), "not a certificate");
    let resp = tls_client(&cert_b).get(url("/healthz")).send().await;
    assert_eq!(resp.expect("old certificate kept").status(), 200);
    assert!(exporter
        .log_text()
        .contains("keeping the previous certificate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_configured() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test client CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(vec!["prometheus".to_owned()]).unwrap();
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n",
    )
    .unwrap();
    let mut s = setup(cpa.url(), &dir, "mtls");
    s.extra
        .push(("CPA_EXPORTER_WEB_CONFIG", web.display().to_string()));
    let exporter = Exporter::spawn(&s);
    let url = format!("https://127.0.0.1:{}/metrics", exporter.port);
    assert!(tls_client(&cert).get(&url).send().await.is_err());
    let identity = format!("{}{}", client.pem(), client_key.serialize_pem());
    let with_cert = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let resp = with_cert.get(&url).send().await;
    let resp = resp.unwrap_or_else(|e| panic!("mTLS scrape: {e}; log:\n{}", exporter.log_text()));
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_bearer_token_guard_everything_but_healthz() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "scrape-token-1\n").unwrap();
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "basic_auth_users:\n  prometheus: '{}'\nbearer_token_file: token\n\
             http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n",
            bcrypt_hash("good-password")
        ),
    )
    .unwrap();
    let mut s = setup(cpa.url(), &dir, "auth");
    s.extra
        .push(("CPA_EXPORTER_WEB_CONFIG", web.display().to_string()));
    s.extra.push(("CPA_EXPORTER_LOG_LEVEL", "trace".into()));
    let exporter = Exporter::spawn(&s);
    let client = plain_client();
    let get = |path: &str| client.get(exporter.url(path));

    let ok = get("/metrics")
        .basic_auth("prometheus", Some("good-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-content-type-options"], "nosniff");
    assert!(ok.text().await.unwrap().contains("cpa_up"));
    // Cached: the second scrape with the same credentials is served too.
    let again = get("/metrics").basic_auth("prometheus", Some("good-password"));
    assert_eq!(again.send().await.unwrap().status(), 200);

    for (what, req) in [
        (
            "wrong password",
            get("/metrics").basic_auth("prometheus", Some("bad")),
        ),
        (
            "unknown user",
            get("/metrics").basic_auth("nobody", Some("good-password")),
        ),
        ("no credentials", get("/metrics")),
        ("no credentials on /readyz", get("/readyz")),
        ("no credentials on /", get("/")),
        ("no credentials on an unknown path", get("/nope")),
        ("wrong token", get("/metrics").bearer_auth("scrape-token-2")),
    ] {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{what}");
        let challenges: Vec<_> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert!(
            challenges.iter().any(|c| c.starts_with("Basic realm="))
                && challenges.iter().any(|c| c.starts_with("Bearer realm=")),
            "{what}: {challenges:?}"
        );
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    }
    assert_eq!(get("/healthz").send().await.unwrap().status(), 200);
    let bearer = get("/metrics").bearer_auth("scrape-token-1");
    assert_eq!(bearer.send().await.unwrap().status(), 200);

    // A rotated token works at once; the old one no longer.
    replace(&token_file, "scrape-token-2");
    let bearer = get("/metrics").bearer_auth("scrape-token-2");
    assert_eq!(bearer.send().await.unwrap().status(), 200);
    let old = get("/metrics").bearer_auth("scrape-token-1");
    assert_eq!(old.send().await.unwrap().status(), 401);

    let log = exporter.log_text();
    for secret in ["good-password", "scrape-token", "$2b$04$"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    assert!(log.contains("credentials cross the network in clear text"));
}

/// Run the binary with `env` (the key and a temporary db added) and return (success, stderr).
fn run_to_exit(args: &[&str], env: &[(&str, String)], dir: &Path) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("CPA_MANAGEMENT_KEY", KEY)
        .env("CPA_EXPORTER_DB", dir.join("exit.db"))
        .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_bad_web_config_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("basic_auth_user:\n  a: b\n", "basic_auth_user"),
        (
            "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  certfile: x\n",
            "certfile",
        ),
        (
            "tls_server_config:\n  cert_file: missing.pem\n  key_file: k.pem\n",
            "cert_file",
        ),
        (
            "basic_auth_users:\n  alice: hunter2\n",
            "basic_auth_users.alice",
        ),
        (
            "bearer_token_file: /nonexistent/token\n",
            "bearer_token_file",
        ),
        (
            "tls_server_config:\n  cert_file: c\n  key_file: k\n  cipher_suites: [X]\n",
            "cipher_suites",
        ),
    ];
    for (text, key) in cases {
        let web = dir.path().join("web.yml");
        std::fs::write(&web, text).unwrap();
        let (ok, out) = run_to_exit(
            &["--web.config.file", web.to_str().unwrap()],
            &[],
            dir.path(),
        );
        assert!(!ok, "{text}");
        assert!(
            out.contains(key) && out.contains("web config file"),
            "{key}: {out}"
        );
        assert!(!out.contains("hunter2"), "{out}");
    }
    // The env var and the file key name the same setting.
    let web = dir.path().join("web.yml");
    std::fs::write(&web, "nope: 1\n").unwrap();
    let (ok, out) = run_to_exit(
        &[],
        &[("CPA_EXPORTER_WEB_CONFIG", web.display().to_string())],
        dir.path(),
    );
    assert!(!ok && out.contains("nope"), "{out}");
    let config = dir.path().join("config.yml");
    std::fs::write(&config, format!("web-config-file: {}\n", web.display())).unwrap();
    let (ok, out) = run_to_exit(&["--config", config.to_str().unwrap()], &[], dir.path());
    assert!(!ok && out.contains("nope"), "{out}");
}

/// A raw TCP server that records each connection's request head and answers `response`.
struct Recorder {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl Recorder {
    async fn start(response: impl Fn(u16) -> String + Send + Sync + 'static) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (h, c) = (heads.clone(), connections.clone());
        let response = Arc::new(response);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (h, response) = (h.clone(), response.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    let read = async {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
                    h.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let _ = stream.write_all(response(port).as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Recorder {
            port,
            heads,
            connections,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn http_response(status: &str, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_refused_and_the_key_never_follows_them() {
    let target = Recorder::start(|_| http_response("200 OK", "", "[]")).await;
    let target_port = target.port;
    let redirector = Recorder::start(move |_| {
        http_response(
            "302 Found",
            &format!(
                "Location: http://127.0.0.1:{target_port}/v0/management/usage-queue?count=1000\r\n"
            ),
            "",
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", redirector.port);
    for transport in ["http", "auto"] {
        let mut s = setup(url.clone(), &dir, transport);
        s.extra.push(("CPA_TRANSPORT", transport.into()));
        s.extra.push(("CPA_EXPORTER_LOG_LEVEL", "trace".into()));
        let exporter = Exporter::spawn(&s);
        let seen = eventually(Duration::from_secs(10), async || {
            exporter.log_text().contains("CPA answered HTTP 302")
        })
        .await;
        assert!(seen, "{transport}: log:\n{}", exporter.log_text());
        assert!(!exporter.log_text().contains(KEY));
    }
    let (ok, out) = run_to_exit(
        &["check", "--consumer-window", "0s"],
        &[
            ("CPA_URL", url.clone()),
            ("CPA_EXPORTER_LOG_LEVEL", "trace".into()),
        ],
        dir.path(),
    );
    assert!(!ok, "{out}");
    assert!(!out.contains(KEY), "{out}");
    assert!(redirector.connections.load(Ordering::SeqCst) > 0);
    assert_eq!(
        target.connections.load(Ordering::SeqCst),
        0,
        "the redirect target was contacted: {:?}",
        target.heads()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_variables_are_ignored_and_only_an_explicit_proxy_is_used() {
    let cpa = fake_cpa().await;
    let env_proxy = Recorder::start(|_| http_response("502 Bad Gateway", "", "")).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy_url = format!("http://127.0.0.1:{}", env_proxy.port);
    let expected = push_workload(&cpa, 3, WorkloadMix::default(), 300);
    let mut s = setup(cpa.url(), &dir, "envproxy");
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        s.extra.push((var, proxy_url.clone()));
    }
    // HTTP, so that reqwest (which would honour these variables by default) carries the pops.
    s.extra.push(("CPA_TRANSPORT", "http".into()));
    let exporter = Exporter::spawn(&s);
    let done = eventually(Duration::from_secs(30), async || {
        accounted(&exporter.scrape().await) >= 300.0
    })
    .await;
    assert!(done, "not drained; log:\n{}", exporter.log_text());
    assert_eq!(
        Expected::observed(&exporter.scrape().await).requests,
        expected.requests
    );
    assert_eq!(env_proxy.connections.load(Ordering::SeqCst), 0);
    drop(exporter);

    // The explicit opt-in: a forwarding proxy (a TCP pipe to CPA) carries every request.
    let pipe = TcpPipe::start(cpa.url().trim_start_matches("http://").parse().unwrap()).await;
    push_workload(&cpa, 4, WorkloadMix::default(), 200);
    let mut s = setup(cpa.url(), &dir, "optin");
    s.extra.push((
        "CPA_EXPORTER_CPA_PROXY",
        format!("http://127.0.0.1:{}", pipe.port),
    ));
    let exporter = Exporter::spawn(&s);
    let done = eventually(Duration::from_secs(30), async || {
        accounted(&exporter.scrape().await) >= 200.0
    })
    .await;
    assert!(
        done,
        "not drained via the proxy; log:\n{}",
        exporter.log_text()
    );
    let first = pipe.first_lines.lock().unwrap().clone();
    assert!(
        first
            .iter()
            .any(|l| l.starts_with(&format!("GET {}/v8/management/", cpa.url()))),
        "{first:?}"
    );
    // With a proxy, `auto` means HTTP: RESP would bypass the proxy.
    assert!(
        exporter.log_text().contains("transport=\"http\"")
            || exporter.log_text().contains("transport=http")
    );
}

/// A forward proxy reduced to a TCP pipe to one upstream (HTTP/1.1 servers accept the
/// absolute-form request target a proxy client sends).
struct TcpPipe {
    port: u16,
    first_lines: Arc<Mutex<Vec<String>>>,
}

impl TcpPipe {
    async fn start(upstream: SocketAddr) -> TcpPipe {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let first_lines = Arc::new(Mutex::new(Vec::new()));
        let lines = first_lines.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let lines = lines.clone();
                tokio::spawn(async move {
                    let mut first = vec![0u8; 256];
                    let Ok(n) = client.read(&mut first).await else {
                        return;
                    };
                    first.truncate(n);
                    let text = String::from_utf8_lossy(&first);
                    lines
                        .lock()
                        .unwrap()
                        .push(text.lines().next().unwrap_or_default().to_owned());
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    if server.write_all(&first).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        TcpPipe { port, first_lines }
    }
}

/// Keys, e-mails, upstream keys, error bodies and client IPs never reach a log line at trace
/// level, `/metrics`, the landing page or the database, through every component: the RESP and
/// HTTP transports, the management poller (v0 config with plaintext client keys, credentials
/// listing with e-mails), refusals of a wrong key, CPA error bodies, and `check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_stay_out_of_trace_logs_of_every_component() {
    let cpa = fake_cpa().await;
    let mix = WorkloadMix {
        failed: 0.3,
        invalid: 0.05,
        ..WorkloadMix::default()
    };
    let mut credentials = Workload::new(21, mix).credentials();
    for c in &mut credentials {
        c.status_message = format!("refresh token revoked for {}", c.file_name);
    }
    // E-mail addresses and their local parts (credential names show them masked: `a***@`).
    let emails: Vec<String> = credentials
        .iter()
        .filter(|c| !c.email.is_empty())
        .flat_map(|c| {
            let local = c.email.split('@').next().unwrap_or_default();
            [c.email.clone(), format!("{local}@")]
        })
        .collect();
    assert!(!emails.is_empty());
    cpa.set_credentials(credentials);
    let dir = tempfile::tempdir().unwrap();
    let mut texts: Vec<(String, String)> = Vec::new();
    let wrong_key = "planted-wrong-key-Lk47";

    for (name, transport, api) in [("resp", "resp", "v0"), ("http", "http", "v8")] {
        push_workload(&cpa, 13, mix, 1_000);
        let mut s = setup(cpa.url(), &dir, name);
        s.extra.push(("CPA_EXPORTER_LOG_LEVEL", "trace".into()));
        s.extra.push(("CPA_TRANSPORT", transport.into()));
        s.extra.push(("CPA_API_VERSION", api.into()));
        s.extra
            .push(("CPA_EXPORTER_CREDENTIALS_INTERVAL", "5s".into()));
        s.extra
            .push(("CPA_EXPORTER_SETTINGS_INTERVAL", "10s".into()));
        let exporter = Exporter::spawn(&s);
        let ok = eventually(Duration::from_secs(30), async || {
            let text = exporter.scrape_text().await;
            cpa.stats().queued == 0
                && text.contains("cpa_credential_info{")
                && text.contains("cpa_usage_statistics_enabled ")
        })
        .await;
        assert!(ok, "{name}: not drained; log:\n{}", exporter.log_text());
        // CPA error bodies: a fault for a few polls.
        cpa.set_fault(Some(Fault::Status(500)));
        tokio::time::sleep(Duration::from_millis(800)).await;
        cpa.set_fault(None);
        for path in ["/metrics", "/"] {
            let body = reqwest::get(exporter.url(path)).await.unwrap().text().await;
            texts.push((format!("{name} {path}"), body.unwrap()));
        }
        exporter.sigterm();
        let log = exporter.log.clone();
        assert!(exporter.wait_exit(Duration::from_secs(10)).success());
        let log = std::fs::read_to_string(log).unwrap();
        assert!(log.contains("TRACE"), "{name}: trace logging was on");
        texts.push((format!("{name} log"), log));
        let mut db = std::fs::read(s.db).unwrap();
        for suffix in ["-wal", "-shm"] {
            db.extend(std::fs::read(format!("{}{suffix}", s.db.display())).unwrap_or_default());
        }
        texts.push((
            format!("{name} database"),
            String::from_utf8_lossy(&db).into(),
        ));
    }

    // A wrong key over both transports: one refusal each, then the long backoff.
    for transport in ["http", "resp"] {
        let mut s = setup(cpa.url(), &dir, &format!("wrong-{transport}"));
        s.key = wrong_key;
        s.extra.push(("CPA_EXPORTER_LOG_LEVEL", "trace".into()));
        s.extra.push(("CPA_TRANSPORT", transport.into()));
        let exporter = Exporter::spawn(&s);
        let refused = eventually(Duration::from_secs(10), async || {
            exporter.log_text().contains("wrong key")
        })
        .await;
        assert!(refused, "{transport}: {}", exporter.log_text());
        texts.push((
            format!("wrong key over {transport} log"),
            exporter.log_text(),
        ));
    }

    // `check`, with the right key and with a wrong one.
    push_workload(&cpa, 17, mix, 100);
    for (name, key) in [("check", KEY), ("check with a wrong key", wrong_key)] {
        let db = dir.path().join("check.db");
        let out = Command::new(BIN)
            .args(["check", "--consumer-window", "1s"])
            .env_clear()
            .env("CPA_URL", cpa.url())
            .env("CPA_MANAGEMENT_KEY", key)
            .env("CPA_EXPORTER_DB", &db)
            .env("CPA_EXPORTER_LOG_LEVEL", "trace")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("key"), "{name}: {text}");
        texts.push((name.to_owned(), text));
    }

    let mut secrets: Vec<&str> = vec![
        KEY,
        wrong_key,
        "sk-client-",
        "sk-upstream-",
        "203.0.113.7",
        "198.51.100.23",
        "192.0.2.88",
        "Bad Gateway",
        "too long",
        // CPA's HTTP error body (over RESP, CPA's short `-ERR` text is shown, key removed).
        "simulated fault: HTTP",
        "refresh token",
    ];
    secrets.extend(fake_cpa::CLIENT_API_KEYS);
    secrets.extend(emails.iter().map(String::as_str));
    for secret in secrets {
        for (place, text) in &texts {
            assert!(!text.contains(secret), "{secret} found in the {place}");
        }
    }
}

#[test]
fn the_state_database_and_its_wal_and_shm_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("private.db");
    let port = free_port();
    // A permissive umask, as in many containers: the files must be 0600 anyway.
    let mut child = Command::new("sh")
        .args(["-c", "umask 022 && exec \"$0\" demo --rate 50", BIN])
        .env_clear()
        .env("CPA_EXPORTER_DB", &db)
        .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CPA_EXPORTER_POLL_INTERVAL", "200ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let files = ["", "-wal", "-shm"].map(|s| PathBuf::from(format!("{}{s}", db.display())));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !files.iter().all(|f| f.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let a few batches commit while the files are open.
    std::thread::sleep(Duration::from_millis(500));
    let modes: Vec<(PathBuf, Option<u32>)> = files
        .iter()
        .map(|f| {
            let mode = std::fs::metadata(f)
                .ok()
                .map(|m| m.permissions().mode() & 0o777);
            (f.clone(), mode)
        })
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    for (file, mode) in modes {
        assert_eq!(mode, Some(0o600), "{}", file.display());
    }
}

/// The HTTP server in this process, with `limits` and `protection`.
async fn serve_in_process(limits: ConnLimits, protection: Protection) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = Arc::new(Shared::new(
        State::default(),
        LabelOptions::default(),
        PathBuf::from("/nonexistent/state.db"),
    ));
    let (tx, rx) = tokio::sync::watch::channel(false);
    // The sender lives as long as the test's runtime.
    std::mem::forget(tx);
    tokio::spawn(http::serve(
        listener,
        shared,
        ServeOptions {
            ready_window: Duration::from_secs(30),
            protection,
            limits,
        },
        rx,
    ));
    addr
}

const SHORT: ConnLimits = ConnLimits {
    max_connections: 1,
    header_read_timeout: Duration::from_millis(500),
    max_age: Duration::from_millis(1000),
    close_grace: Duration::from_millis(500),
};

/// Time until a scrape of `url` succeeds with `client`.
async fn scrape_time(client: &reqwest::Client, url: &str) -> Duration {
    let start = Instant::now();
    let resp = client.get(url).send().await.expect("scrape");
    assert_eq!(resp.status(), 200);
    resp.bytes().await.expect("body");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_cannot_hold_the_only_connection_slot() {
    let addr = serve_in_process(SHORT, Protection::default()).await;
    let url = format!("http://{addr}/metrics");
    let client = plain_client();
    assert!(scrape_time(&client, &url).await < Duration::from_secs(1));

    // (what the client does, the bound on how long it may hold the slot)
    let stalls: [(&str, &[u8], Duration); 3] = [
        ("connects and sends nothing", b"", SHORT.header_read_timeout),
        (
            "sends half the headers",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
            SHORT.header_read_timeout,
        ),
        (
            "sends headers, then stalls in the body",
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc",
            SHORT.max_age + SHORT.close_grace,
        ),
    ];
    for (what, bytes, bound) in stalls {
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(bytes).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waited = scrape_time(&plain_client(), &url).await;
        assert!(
            waited < bound + Duration::from_millis(1500),
            "{what}: a scrape waited {waited:?}"
        );
        // The server closed the stalled connection (EOF or reset), it did not just time out.
        let mut buf = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut buf)).await;
        assert!(
            closed.is_ok(),
            "{what}: the stalled connection is still open"
        );
    }

    // A client that pipelines requests and never reads the responses.
    let mut hog = TcpStream::connect(addr).await.unwrap();
    let writer = tokio::spawn(async move {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
        for _ in 0..100 {
            if hog.write_all(&request).await.is_err() {
                break;
            }
        }
        hog
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waited = scrape_time(&plain_client(), &url).await;
    assert!(
        waited < SHORT.max_age + SHORT.close_grace + Duration::from_millis(1500),
        "behind a client that never reads, a scrape waited {waited:?}"
    );
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_says_hello_cannot_hold_a_tls_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    let web = WebConfig::parse(
        &dir.path().join("web.yml"),
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n",
    )
    .unwrap();
    let addr = serve_in_process(SHORT, Protection::from_config(web).unwrap()).await;
    let url = format!("https://127.0.0.1:{}/metrics", addr.port());
    let _silent = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waited = scrape_time(&tls_client(&cert), &url).await;
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
}

/// The real binary with its default bounds (128 connections): 200 idle and 200 trickling
/// connections, reopened whenever closed, do not starve scrapes. The server evicts the
/// connection idle the longest to admit a new one, so every scrape answers (the figures are in
/// docs/benchmarks.md; the timeout here is only a generous bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_idle_and_trickling_connections_do_not_starve_scrapes() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::spawn(&setup(cpa.url(), &dir, "idle"));
    let took = stress::scrapes_behind_hostile_connections(&exporter, 5).await;
    eprintln!("5 scrapes behind 400 idle or trickling connections: {took:?}");
}

/// The real binary with `basic_auth_users` (hashes at the usual cost 10) and the exporter's
/// web config.
fn exporter_with_passwords(cpa: &FakeCpa, dir: &tempfile::TempDir, name: &str) -> Exporter {
    let web = stress::web_config_with_password(dir.path());
    let mut s = setup(cpa.url(), dir, name);
    s.extra
        .push(("CPA_EXPORTER_WEB_CONFIG", web.display().to_string()));
    Exporter::spawn(&s)
}

/// A flood of wrong passwords with `basic_auth_users` (the hash at the usual cost 10): a first,
/// uncached, correct login still gets in and `/healthz` still answers, because a repeated wrong
/// credential is rejected from a cache and checks past a small queue are refused at once (429).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_flood_does_not_lock_out_the_right_password() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = exporter_with_passwords(&cpa, &dir, "flood");
    let f = stress::password_flood(
        &exporter,
        stress::Flood::RepeatedPassword,
        stress::FLOODED_USER,
    )
    .await;
    eprintln!("200 clients flooding a wrong password: {f:?}");
    assert_eq!(f.login_status, 200, "{f:?}");
}

/// A brute force that varies its passwords misses the cache of rejections, so every attempt
/// wants a bcrypt check. It fills only its own user's queue: another user's first login, and a
/// known user's while unknown names are flooded, are queued and checked, not answered 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brute_force_on_one_user_name_does_not_shut_out_another() {
    let cpa = fake_cpa().await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = exporter_with_passwords(&cpa, &dir, "brute");
    let f = stress::password_flood(
        &exporter,
        stress::Flood::VaryingPasswords,
        stress::OTHER_USER,
    )
    .await;
    eprintln!("200 clients varying passwords for another user: {f:?}");
    assert_eq!(f.login_status, 200, "{f:?}");
    let f =
        stress::password_flood(&exporter, stress::Flood::UnknownUsers, stress::FLOODED_USER).await;
    eprintln!("200 clients trying unknown user names: {f:?}");
    assert_eq!(f.login_status, 200, "{f:?}");
}

/// The event log carries request ids, so it is a private file of its own: a symbolic link
/// planted at its path is refused at start (its target left untouched), something that is not
/// a regular file too, and an existing file readable by others is made private.
#[test]
fn the_event_log_follows_no_link_and_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let start = |events: &Path| {
        Command::new(BIN)
            .env_clear()
            .env("CPA_URL", format!("http://127.0.0.1:{}", free_port()))
            .env("CPA_MANAGEMENT_KEY", KEY)
            .env("CPA_EXPORTER_DB", dir.path().join("events.db"))
            .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("CPA_EXPORTER_EVENT_LOG", events)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // Refused: the process ends by itself at start. Returns whether it did, and its stderr.
    let refused = |mut child: std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let ended = child.try_wait().unwrap().is_some_and(|s| !s.success());
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        (ended, String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let target = dir.path().join("elsewhere.log");
    std::fs::write(&target, "kept\n").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (ended, stderr) = refused(start(&link));
    assert!(ended, "started through a link: {stderr}");
    assert!(stderr.contains("--event-log"), "{stderr}");
    assert!(stderr.contains(&link.display().to_string()), "{stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "kept\n");
    assert_eq!(mode(&target), 0o644, "the link's target is not touched");

    let (ended, stderr) = refused(start(dir.path()));
    assert!(ended, "started on a directory: {stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");

    let existing = dir.path().join("existing.log");
    std::fs::write(&existing, "{}\n").unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = start(&existing);
    let deadline = Instant::now() + Duration::from_secs(20);
    while mode(&existing) != 0o600 && Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        mode(&existing),
        0o600,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "{}\n");
}
