#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use cpa_usage_exporter::config::{self, Command, Config, LogFormat, Secret};
use cpa_usage_exporter::{app, check};
use fake_cpa::{FakeCpa, SimConfig};

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
    eprintln!("{}", error_chain(e));
    ExitCode::FAILURE
}

/// The error and its causes. Many errors already end with their cause's text (`...: {source}`);
/// a cause whose text is already on the line above adds nothing and is left out.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = format!("error: {e}");
    let mut last = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !last.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
            last = text;
        }
        cause = c.source();
    }
    msg
}

fn main() -> ExitCode {
    let (command, mut config) = match Config::from_args() {
        Ok(v) => v,
        Err(e) => return report(&e),
    };
    init_logging(&config);
    if let Some(Command::Healthcheck) = command {
        return healthcheck(config.listen, listens_with_tls(&config));
    }
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
            // `check` and `healthcheck` have returned above.
            None | Some(Command::Check { .. } | Command::Healthcheck) => app::run(config).await,
            Some(Command::Demo { rate }) => {
                // The demo keeps its own state file and polls faster, unless told otherwise.
                if config.db.as_os_str() == config::DEFAULT_DB {
                    config.db = config::DEMO_DB.into();
                }
                config.poll_interval.get_or_insert(Duration::from_secs(1));
                if config.budgets.is_empty() {
                    config.budgets = demo_budgets();
                }
                run_demo(config, rate).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

/// Budgets for two of the simulated client keys, so the demo shows the budget gauges.
fn demo_budgets() -> Vec<cpa_usage_exporter::store::budget::Budget> {
    use cpa_usage_exporter::labels::api_key_label;
    use cpa_usage_exporter::store::budget::{Budget, Period};
    use fake_cpa::CLIENT_API_KEYS;
    vec![
        Budget {
            api_key: api_key_label(CLIENT_API_KEYS[0]),
            usd: 25.0,
            period: Period::Day,
        },
        Budget {
            api_key: api_key_label(CLIENT_API_KEYS[1]),
            usd: 500.0,
            period: Period::Month,
        },
    ]
}

/// `healthcheck`: GET /healthz on the listen address (loopback when it listens on every
/// address), with plain std I/O so the distroless image needs no curl. Exit 0 on a 200.
/// Whether the web config puts TLS on the listener (then the healthcheck must speak it too).
fn listens_with_tls(config: &Config) -> bool {
    config.web_config_file.as_deref().is_some_and(|path| {
        cpa_usage_exporter::http::web_config::WebConfig::load(path)
            .map(|w| w.tls.is_some())
            .unwrap_or(false)
    })
}

/// `healthcheck` over TLS: liveness on loopback, so the certificate is not verified (it names
/// the public host, not 127.0.0.1). Listeners that require client certificates cannot be
/// checked this way; disable the image's HEALTHCHECK for them.
fn healthcheck_tls(addr: std::net::SocketAddr, timeout: Duration) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .no_proxy()
            .timeout(timeout)
            .build()
            .map_err(|e| e.to_string())?;
        let resp = client
            .get(format!("https://{addr}/healthz"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!("HTTP/1.1 {}", resp.status().as_u16()))
    })
}

fn healthcheck(listen: std::net::SocketAddr, tls: bool) -> ExitCode {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let timeout = Duration::from_secs(3);
    let status_line = || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut head = Vec::new();
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 1024 {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&head);
        Ok(text.lines().next().unwrap_or_default().trim().to_owned())
    };
    let scheme = if tls { "https" } else { "http" };
    let result = if tls {
        healthcheck_tls(addr, timeout)
    } else {
        status_line().map_err(|e| e.to_string())
    };
    match result {
        Ok(line) if line.split_whitespace().nth(1) == Some("200") => ExitCode::SUCCESS,
        Ok(line) => {
            eprintln!("unhealthy: {scheme}://{addr}/healthz answered `{line}`");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {scheme}://{addr}/healthz: {e}");
            ExitCode::FAILURE
        }
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
    tracing::info!(
        cpa = %cpa.url(),
        rate,
        "demo: simulated CPA with generated traffic{}",
        hold_note(config.limits.new_series_hold)
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let traffic = tokio::spawn(fake_cpa::run_traffic(
        cpa.clone(),
        rand_seed(),
        rate,
        stop_rx,
    ));
    let result = app::run_with_key(config, Secret::new(key), app::shutdown_signal()).await;
    stop_tx.send_replace(true);
    let _ = traffic.await;
    cpa.shutdown();
    result
}

/// Why the demo's counters stay at 0 at first: every new series is held at 0 for the hold (so
/// Prometheus sees its first increase), and in the demo every series is new. The hold is kept:
/// the demo is meant to be scraped, and a shorter one would lose increases there.
fn hold_note(hold: Duration) -> String {
    if hold.is_zero() {
        return String::new();
    }
    format!(
        "; new series read 0 for their first {}s (new-series-hold, so that Prometheus sees every increase): \
         expect zeros until then, or start with --new-series-hold 0 to see values at once",
        hold.as_secs()
    )
}

/// A seed that differs between runs; quality does not matter for simulated traffic.
fn rand_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Embeds(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Wraps(#[source] std::io::Error);

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = Embeds(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&e), "error: outer: disk on fire");
        let e = Wraps(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&e), "error: outer\n  caused by: disk on fire");
    }
}
