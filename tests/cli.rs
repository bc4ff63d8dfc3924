//! What a user sees on the command line before anything runs: `--help` and start-up errors.

mod common;

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(common::BIN)
        .args(args)
        .env_clear()
        .output()
        .expect("run the exporter")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_shows_the_default_of_every_setting() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for shown in [
        "[default: 0.0.0.0:9317]",
        "[default: ./cpa-usage-exporter.db]",
        "[default: 1000]",
        "[default: http://127.0.0.1:8317]",
        "[default: 30s]",
        "[default: 64MiB]",
        "[default: the built-in table]",
        "default 1s over RESP, 5s over HTTP",
        "series-limit: 10000",
        "series-retirement: 30d",
    ] {
        assert!(help.contains(shown), "--help lacks `{shown}`:\n{help}");
    }
    // Every flag that takes a value says what happens without it.
    let options = help.split("Options:").nth(1).expect("an options section");
    for entry in options.split("\n      --").skip(1) {
        let flag = entry.split_whitespace().next().unwrap_or_default();
        if flag == "config" {
            continue;
        }
        assert!(
            entry.contains("default"),
            "--{flag} shows no default:\n{entry}"
        );
    }
}

#[test]
fn demo_help_says_where_its_own_defaults_differ() {
    let out = run(&["demo", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains(cpa_usage_exporter::config::DEMO_DB) && help.contains("polls every second"),
        "{help}"
    );
}

#[test]
fn startup_errors_say_each_thing_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no/such/dir/state.db");
    let out = run(&[
        "--management-key",
        "k",
        "--db",
        missing.to_str().expect("utf-8 path"),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--db / CPA_EXPORTER_DB"), "{err}");
    assert_each_line_new(&err);

    // A port that is taken: the listener fails after the store opened.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let db = dir.path().join("state.db");
    let out = run(&[
        "--management-key",
        "k",
        "--db",
        db.to_str().expect("utf-8 path"),
        "--listen",
        &addr,
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert_each_line_new(&err);
}

/// No line of the error repeats text that an earlier line already said.
fn assert_each_line_new(err: &str) {
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("error:") || l.trim_start().starts_with("caused by:"))
        .collect();
    assert!(!lines.is_empty(), "{err}");
    for (i, line) in lines.iter().enumerate().skip(1) {
        let text = line.trim_start().trim_start_matches("caused by:").trim();
        assert!(
            !lines[..i].iter().any(|earlier| earlier.contains(text)),
            "`{text}` is said twice:\n{err}"
        );
    }
}

#[test]
fn an_error_says_where_the_value_came_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.yml");
    std::fs::write(&file, "batch-size: 0\n").expect("write the file");
    let file = file.to_str().expect("utf-8 path");
    let with_env = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(common::BIN);
        cmd.args(args).env_clear();
        if let Some(v) = env {
            cmd.env("CPA_EXPORTER_BATCH_SIZE", v);
        }
        stderr(&cmd.output().expect("run the exporter"))
    };
    // The file beats the default, the environment beats the file, a flag beats both, also when
    // it is given after a subcommand.
    let e = with_env(&["--config", file], None);
    assert!(e.contains("invalid batch size (`batch-size` in "), "{e}");
    let e = with_env(&["--config", file], Some("-1"));
    assert!(e.contains("(from CPA_EXPORTER_BATCH_SIZE): `-1`"), "{e}");
    let e = with_env(
        &["--config", file, "check", "--batch-size", "x"],
        Some("-1"),
    );
    assert!(e.contains("(from --batch-size): `x`"), "{e}");
    // A value that is not a single one is refused naming its key.
    std::fs::write(dir.path().join("config.yml"), "db: [a, b]\n").expect("write the file");
    let e = with_env(&["--config", file], None);
    assert!(e.contains("db: expected a single value"), "{e}");
}

/// The demo's start-up line, read from its stderr (`None` if it exits or stays silent).
fn demo_start_line(hold: Option<&str>) -> Option<String> {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(common::BIN);
    cmd.args(["demo", "--rate", "1"])
        .env_clear()
        .env(
            "CPA_EXPORTER_LISTEN",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .env("CPA_EXPORTER_DB", dir.path().join("demo.db"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(hold) = hold {
        cmd.env("CPA_EXPORTER_NEW_SERIES_HOLD", hold);
    }
    let mut child = cmd.spawn().expect("spawn demo");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("demo:") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let line = rx.recv_timeout(std::time::Duration::from_secs(20)).ok();
    child.kill().expect("kill demo");
    child.wait().expect("wait demo");
    line
}

#[test]
fn demo_says_its_counters_read_zero_during_the_new_series_hold() {
    let line = demo_start_line(None).expect("the demo's start-up line");
    assert!(
        line.contains("new series read 0 for their first 60s")
            && line.contains("--new-series-hold 0"),
        "{line}"
    );
    // Without a hold there is nothing to wait for, and nothing is said.
    let line = demo_start_line(Some("0")).expect("the demo's start-up line");
    assert!(!line.contains("read 0"), "{line}");
}
