#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use cpa_usage_exporter::config::{self, Command, Config, LogFormat, Secret};
use cpa_usage_exporter::sim::{self, FakeCpa, SimConfig};
use cpa_usage_exporter::{app, check};

fn init_logging(config: &Config) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(config.log_level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Print an error with its causes, one per line after the first.
fn report(e: &dyn std::error::Error) -> ExitCode {
    let mut msg = format!("error: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(&format!("\n  caused by: {c}"));
        cause = c.source();
    }
    eprintln!("{msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let (command, mut config) = match Config::from_args() {
        Ok(v) => v,
        Err(e) => return report(&e),
    };
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&e),
    };
    if let Some(Command::Check { consumer_window }) = command {
        let opts = check::CheckOptions {
            consumer_window: consumer_window.into(),
        };
        return runtime.block_on(check::run_cli(&config, opts));
    }
    let result = runtime.block_on(async move {
        match command {
            // `check` has returned above.
            None | Some(Command::Check { .. }) => app::run(config).await,
            Some(Command::Demo { rate }) => {
                // The demo keeps its own state file and polls faster, unless told otherwise.
                if config.db.as_os_str() == config::DEFAULT_DB {
                    config.db = "./cpa-usage-exporter-demo.db".into();
                }
                config.poll_interval.get_or_insert(Duration::from_secs(1));
                run_demo(config, rate).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

async fn run_demo(mut config: Config, rate: f64) -> Result<(), app::StartError> {
    let key = format!("demo-{:016x}", rand_seed());
    let cpa = FakeCpa::start(SimConfig {
        management_key: key.clone(),
        ..SimConfig::default()
    })
    .await
    .map_err(|source| app::StartError::Listen {
        addr: "127.0.0.1:0".parse().unwrap_or(config.listen),
        source,
    })?;
    config.cpa_url = cpa.url();
    tracing::info!(cpa = %cpa.url(), rate, "demo: simulated CPA with generated traffic");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let traffic = tokio::spawn(sim::run_traffic(cpa.clone(), rand_seed(), rate, stop_rx));
    let result = app::run_with_key(config, Secret::new(key), app::shutdown_signal()).await;
    stop_tx.send_replace(true);
    let _ = traffic.await;
    cpa.shutdown();
    result
}

/// A seed that differs between runs; quality does not matter for simulated traffic.
fn rand_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) ^ (u64::from(std::process::id()) << 32)
}
