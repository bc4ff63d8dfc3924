//! `deploy/systemd/cpa-usage-exporter.service`, the unit for the bare binary.
//!
//! No systemd runs as PID 1 in CI (nor in most containers), so the unit cannot be started
//! there. It is checked three ways instead: `systemd-analyze verify` (Debian's `systemd`
//! package, which parses every directive the way systemd does); its hardening and credential
//! wiring read as directives; and its command line and environment, with the paths systemd
//! would substitute pointed at a temporary directory, run the real exporter against the fake
//! CPA until it is ready.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fake_cpa::{FakeCpa, SimConfig};

const UNIT: &str = "deploy/systemd/cpa-usage-exporter.service";
const INSTALLED_BIN: &str = "/usr/local/bin/cpa-usage-exporter";

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(UNIT))
        .unwrap_or_else(|e| panic!("{UNIT}: {e}"))
}

/// `(section, key, value)` for every directive, comments and blank lines dropped.
fn directives(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{UNIT}: `{line}` is not KEY=VALUE"));
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    out
}

/// Every value of a `[Service]` key, in order.
fn service(key: &str) -> Vec<String> {
    directives(&unit_text())
        .into_iter()
        .filter(|(s, k, _)| s == "Service" && k == key)
        .map(|(_, _, v)| v)
        .collect()
}

fn one(key: &str) -> String {
    let values = service(key);
    assert_eq!(values.len(), 1, "{UNIT}: one {key}=, found {values:?}");
    values[0].clone()
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_without_a_warning() {
    if !common::have("systemd-analyze") {
        return;
    }
    // verify also checks that ExecStart's binary exists: point it at the one just built.
    let dir = tempfile::tempdir().expect("tempdir");
    let text = unit_text();
    assert!(text.contains(&format!("ExecStart={INSTALLED_BIN} ")));
    let unit = dir.path().join("cpa-usage-exporter.service");
    std::fs::write(&unit, text.replace(INSTALLED_BIN, common::BIN)).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze");
    // Unknown keys and invalid values are only warnings (exit 0): any output is a failure.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
}

#[test]
fn the_unit_runs_unprivileged_hardened_and_bounded() {
    let dynamic = service("DynamicUser") == ["yes"];
    assert!(
        dynamic || !service("User").is_empty(),
        "a dynamic or dedicated user"
    );
    for (key, want) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        ("SystemCallArchitectures", "native"),
        ("StateDirectory", "cpa-usage-exporter"),
        ("UMask", "0077"),
    ] {
        assert_eq!(one(key), want, "{key}");
    }
    assert!(service("SystemCallFilter").contains(&"@system-service".to_owned()));
    // The container's budget (compose.yaml, Kubernetes): 64 MiB.
    assert_eq!(one("MemoryMax"), "64M");
    // Time to commit the batch in hand on SIGTERM.
    assert_eq!(one("TimeoutStopSec"), "30s");
}

#[test]
fn the_key_arrives_as_a_credential_and_the_state_in_the_state_directory() {
    let credential = one("LoadCredential");
    let (name, source) = credential.split_once(':').expect("NAME:PATH");
    assert!(source.starts_with("/etc/"), "{source}");
    assert!(
        one("ExecStart").contains(&format!(
            "--management-key-file=${{CREDENTIALS_DIRECTORY}}/{name}"
        )),
        "ExecStart reads the credential"
    );
    // The key is never in the environment or on the command line.
    for env in service("Environment") {
        assert!(!env.starts_with("CPA_MANAGEMENT_KEY="), "{env}");
    }
    assert!(!one("ExecStart").contains("--management-key="));
    let state = one("StateDirectory");
    assert!(
        service("Environment")
            .iter()
            .any(|e| e.starts_with(&format!("CPA_EXPORTER_DB=%S/{state}/"))),
        "the database lives in the StateDirectory"
    );
}

/// The environment and arguments systemd would give the exporter, with `%S` (the state root)
/// and `$CREDENTIALS_DIRECTORY` mapped into `root`.
fn as_systemd_would_run_it(root: &Path) -> (Vec<String>, Vec<(String, String)>) {
    let expand = |s: &str| {
        s.replace("%S", &root.join("state").to_string_lossy())
            .replace(
                "${CREDENTIALS_DIRECTORY}",
                &root.join("credentials").to_string_lossy(),
            )
    };
    let exec = one("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some(INSTALLED_BIN));
    let args = words.map(expand).collect();
    let env = service("Environment")
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').expect("NAME=VALUE");
            (k.to_owned(), expand(v))
        })
        .collect();
    (args, env)
}

#[test]
fn every_variable_the_unit_sets_is_one_the_exporter_reads() {
    let help = Command::new(common::BIN)
        .arg("--help")
        .env_clear()
        .output()
        .expect("--help");
    let help = String::from_utf8_lossy(&help.stdout);
    let (_, env) = as_systemd_would_run_it(Path::new("/x"));
    for (name, _) in env {
        assert!(
            help.contains(&format!("[env: {name}")),
            "{UNIT} sets {name}, which the exporter does not read"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_units_command_line_runs_a_ready_exporter() {
    const KEY: &str = "systemd-unit-test-key";
    let cpa = FakeCpa::start(SimConfig {
        management_key: KEY.into(),
        ..SimConfig::default()
    })
    .await
    .expect("fake CPA");
    let root = tempfile::tempdir().expect("tempdir");
    // What systemd prepares: the credential file and the StateDirectory.
    let credentials = root.path().join("credentials");
    std::fs::create_dir_all(&credentials).expect("credentials dir");
    let (name, _) = one("LoadCredential")
        .split_once(':')
        .map(|(n, p)| (n.to_owned(), p.to_owned()))
        .expect("NAME:PATH");
    std::fs::write(credentials.join(&name), format!("{KEY}\n")).expect("credential");
    let state: PathBuf = root.path().join("state").join(one("StateDirectory"));
    std::fs::create_dir_all(&state).expect("state dir");

    let (args, env) = as_systemd_would_run_it(root.path());
    let port = common::free_port();
    let log = root.path().join("exporter.log");
    let mut cmd = Command::new(common::BIN);
    cmd.args(&args)
        .env_clear()
        .envs(env)
        // What /etc/default/cpa-usage-exporter would say on this machine.
        .env("CPA_URL", cpa.url())
        .env("CPA_EXPORTER_LISTEN", format!("127.0.0.1:{port}"))
        .current_dir(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    let mut child = cmd.spawn().expect("spawn");
    let ready = common::eventually(Duration::from_secs(20), async || {
        reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ready, "not ready; log:\n{log}");
    assert!(
        state.join("cpa-usage-exporter.db").is_file(),
        "the database is in the StateDirectory"
    );
    assert!(!log.contains(KEY), "the key leaked into the log");
    cpa.shutdown();
}
