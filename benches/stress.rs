//! Hostile loads on the real (release) binary: peak memory under scrapes at the default series
//! limit, scrapes behind 400 idle or trickling connections, a password flood.
//! `cargo bench --bench stress`; the figures go in docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{stress, Exporter, Setup};
use fake_cpa::{FakeCpa, SimConfig};

const KEY: &str = "stress-bench-management-key";

fn setup<'a>(
    cpa: &FakeCpa,
    dir: &'a tempfile::TempDir,
    extra: Vec<(&'a str, String)>,
) -> Setup<'a> {
    Setup {
        cpa_url: cpa.url(),
        key: KEY,
        db: Box::leak(dir.path().join("state.db").into_boxed_path()),
        log: dir.path().join("exporter.log"),
        extra,
    }
}

fn main() {
    // `cargo test --benches` runs this file too; keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cpa = FakeCpa::start(SimConfig {
            management_key: KEY.to_owned(),
            retention: Duration::from_secs(3600),
            ..SimConfig::default()
        })
        .await
        .expect("fake CPA");

        for requests in [1_000, 10_000] {
            let dir = tempfile::tempdir().unwrap();
            let series = stress::fill_state(&dir.path().join("state.db"), requests);
            let exporter = Exporter::spawn(&setup(&cpa, &dir, Vec::new()));
            let text = stress::scrape(&exporter, false, false).await;
            let samples = text.lines().filter(|l| !l.starts_with('#')).count();
            let bytes = text.len();
            drop(text);
            let m = stress::memory_under_scrapes(&exporter, samples).await;
            println!(
                "{series:>6} series, {samples} samples ({:.1} MB of text): VmHWM idle {:.1} MiB, after a text scrape {:.1}, a gzip scrape {:.1}, ten parallel scrapes {:.1}",
                bytes as f64 / 1e6,
                m.idle as f64 / 1024.0,
                m.text as f64 / 1024.0,
                m.gzip as f64 / 1024.0,
                m.parallel as f64 / 1024.0,
            );
        }

        let dir = tempfile::tempdir().unwrap();
        let exporter = Exporter::spawn(&setup(&cpa, &dir, Vec::new()));
        let took = stress::scrapes_behind_hostile_connections(&exporter, 5).await;
        println!(
            "5 scrapes behind 200 idle + 200 trickling connections: all answered, slowest {:.0} ms ({:?})",
            took.iter().max().unwrap().as_secs_f64() * 1e3,
            took.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
        );
        drop(exporter);

        let floods = [
            (stress::Flood::RepeatedPassword, stress::FLOODED_USER, "a wrong password"),
            (stress::Flood::VaryingPasswords, stress::OTHER_USER, "varying passwords of one user, another user's"),
            (stress::Flood::UnknownUsers, stress::FLOODED_USER, "unknown user names, a known user's"),
        ];
        for (flood, login, what) in floods {
            let dir = tempfile::tempdir().unwrap();
            let web = stress::web_config_with_password(dir.path());
            let exporter = Exporter::spawn(&setup(
                &cpa,
                &dir,
                vec![("CPA_EXPORTER_WEB_CONFIG", web.display().to_string())],
            ));
            let f = stress::password_flood(&exporter, flood, login).await;
            println!(
                "200 clients flooding {what} (bcrypt cost 10): /healthz {:.0} ms, first correct login {} in {:.0} ms ({} wrong attempts refused)",
                f.healthz.as_secs_f64() * 1e3,
                f.login_status,
                f.first_login.as_secs_f64() * 1e3,
                f.refused
            );
        }
    });
}
