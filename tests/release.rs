//! `.github/workflows/release.yml`, which only GitHub can run: actionlint on it, its `run:`
//! scripts through `bash -n`, and what it publishes against what the README, compose.yaml and
//! the Dockerfile expect.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

const WORKFLOW: &str = ".github/workflows/release.yml";
const TARGETS: [&str; 2] = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn workflow() -> Value {
    serde_norway::from_str(&text(WORKFLOW)).unwrap_or_else(|e| panic!("{WORKFLOW}: {e}"))
}

/// Every step of every job, as (job, step).
fn steps(w: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (job, j) in w["jobs"].as_mapping().expect("jobs") {
        for step in j["steps"].as_sequence().expect("steps") {
            out.push((job.as_str().unwrap_or_default().to_owned(), step.clone()));
        }
    }
    out
}

#[test]
fn actionlint_accepts_every_workflow() {
    if !common::have("actionlint") {
        return;
    }
    let files: Vec<PathBuf> = std::fs::read_dir(root().join(".github/workflows"))
        .expect("workflows")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    assert!(!files.is_empty());
    let out = Command::new("actionlint")
        .args(&files)
        .current_dir(root())
        .output()
        .expect("actionlint");
    assert!(
        out.status.success(),
        "actionlint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_run_script_is_valid_bash() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (job, step)) in steps(&workflow()).into_iter().enumerate() {
        let Some(script) = step["run"].as_str() else {
            continue;
        };
        // `${{ ... }}` is substituted by GitHub before the shell sees the script.
        let mut script = script.to_owned();
        while let Some(start) = script.find("${{") {
            let end = script[start..].find("}}").expect("closed expression") + start;
            script.replace_range(start..end + 2, "github_expression");
        }
        let file = dir.path().join(format!("{i}.sh"));
        std::fs::write(&file, script).expect("write");
        let out = Command::new("bash")
            .arg("-n")
            .arg(&file)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{job}: {}\n{}",
            step["run"].as_str().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_version_tag_publishes_static_binaries_an_image_and_checksums() {
    let w = workflow();
    assert_eq!(w["on"]["push"]["tags"].as_sequence().map(Vec::len), Some(1));
    assert!(w["on"]["push"]["branches"].is_null());
    let jobs = &w["jobs"];
    let targets: Vec<&str> = jobs["binaries"]["strategy"]["matrix"]["target"]
        .as_sequence()
        .expect("a target matrix")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(targets, TARGETS);
    let all = text(WORKFLOW);
    assert!(all.contains("grep -q 'statically linked'"));
    assert!(all.contains("platforms: linux/amd64,linux/arm64"));
    assert!(all.contains("sha256sum"));
    assert!(all.contains("SHA256SUMS"));
    // Releases only after the same tests as every commit.
    for job in ["binaries", "image"] {
        assert_eq!(jobs[job]["needs"], "test", "{job}");
    }
    assert!(steps(&w)
        .iter()
        .any(|(job, s)| job == "test" && s["run"] == "bash .ci/run"));
    // Everything packed next to the binary exists.
    for file in [
        "LICENSE",
        "README.md",
        "deploy/systemd/cpa-usage-exporter.service",
    ] {
        assert!(all.contains(file) && root().join(file).is_file(), "{file}");
    }
}

#[test]
fn the_workflow_builds_with_the_dockerfiles_rust() {
    let dockerfile = text("Dockerfile");
    let rust = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION=");
    let all = text(WORKFLOW);
    assert!(all.contains(&format!("container: rust:{rust}-bookworm")));
    assert!(all.contains(&format!("rustup toolchain install {rust} ")));
}

#[test]
fn the_readme_downloads_what_the_workflow_publishes() {
    let readme = text("README.md");
    for target in TARGETS {
        let asset = format!("cpa-usage-exporter-{target}.tar.gz");
        assert!(
            readme.contains(&asset) || readme.contains("cpa-usage-exporter-$(uname -m)"),
            "README.md does not download {asset}"
        );
    }
    assert!(readme.contains(
        "https://github.com/cpa-usage-exporter/cpa-usage-exporter/releases/latest/download"
    ));
    assert!(readme.contains("SHA256SUMS"));
    assert!(Path::new(&root().join(WORKFLOW)).is_file());
}
