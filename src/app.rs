//! Wiring: open the store, serve HTTP, run the drain loop until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::config::{Config, Secret};
use crate::cpa::mgmt::MAX_MGMT_BODY_BYTES;
use crate::cpa::resp::RespOptions;
use crate::cpa::source::{AnySource, BuildError, SourceOptions};
use crate::cpa::ClientOptions;
use crate::cpa::Transport;
use crate::metrics::Shared;
use crate::pipeline::drain::{self, DrainOptions};
use crate::pipeline::errors::{self, ErrorsChannel};
use crate::pipeline::events::{EventLog, Target as EventLogTarget};
use crate::pipeline::poller::{self, PollerOptions};
use crate::store::budget::{Budgets, META_PREFIX};
use crate::store::{State, Store, StoreError};

/// A start-up failure, said in terms of the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the management key is required: set CPA_MANAGEMENT_KEY_FILE / --management-key-file (or CPA_MANAGEMENT_KEY), or try `cpa-usage-exporter demo`")]
    MissingKey,
    #[error("state database (--db / CPA_EXPORTER_DB): {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen on {addr} (--listen / CPA_EXPORTER_LISTEN): {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("prices file (--prices-file / CPA_EXPORTER_PRICES_FILE): {0}")]
    Prices(#[from] crate::pricing::PriceError),
    #[error("cannot build the HTTP client for CPA: {0}")]
    Client(#[from] reqwest::Error),
    #[error("{0}")]
    Transport(#[from] BuildError),
    #[error("web config file (--web.config.file / CPA_EXPORTER_WEB_CONFIG)")]
    WebConfig(#[from] crate::http::WebConfigError),
    #[error(transparent)]
    Errors(#[from] errors::StartError),
    #[error("event log (--event-log / CPA_EXPORTER_EVENT_LOG): cannot open {path}: {source}")]
    EventLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Resolves once SIGTERM or SIGINT arrives. The handlers are installed by the call, not at the
/// first poll: a signal during start-up (store, listener) then stops the exporter cleanly
/// instead of killing it with the default action. Call it inside the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    async fn recv(signal: std::io::Result<Signal>) {
        match signal {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    }
    let term = recv(signal(SignalKind::terminate()));
    let int = recv(signal(SignalKind::interrupt()));
    async move {
        tokio::select! {
            _ = term => {},
            _ = int => {},
        }
    }
}

/// The idle interval as configured, or per transport while `auto` has not decided.
fn poll_interval_text(config: &Config) -> String {
    let text = |resp| humantime::format_duration(config.idle_interval(resp)).to_string();
    match config.transport {
        Transport::Http => text(false),
        Transport::Resp | Transport::Subscribe => text(true),
        Transport::Auto if config.poll_interval.is_some() => text(false),
        Transport::Auto => format!("{} over RESP, {} over HTTP", text(true), text(false)),
    }
}

/// The embedded price table, extended by the configured file, with the configured aliases.
pub fn load_pricing(config: &Config) -> Result<crate::pricing::Pricing, StartError> {
    let table = match &config.prices_file {
        Some(path) => crate::pricing::PriceTable::load(path)?,
        None => crate::pricing::PriceTable::embedded(),
    };
    Ok(crate::pricing::Pricing {
        table,
        aliases: config.model_aliases.clone(),
    })
}

/// How long `/readyz` tolerates no successful poll.
fn ready_window(config: &Config) -> Duration {
    (config.idle_interval(false) * 3 + config.http_timeout).max(Duration::from_secs(30))
}

/// Run the exporter against the configured CPA until a signal; the batch in hand is finished.
pub async fn run(config: Config) -> Result<(), StartError> {
    let key = config
        .management_key
        .clone()
        .ok_or(StartError::MissingKey)?;
    run_with_key(config, key, shutdown_signal()).await
}

/// Open the state database with the configured budgets and the spend it recorded for them.
pub fn open_store(config: &Config) -> Result<(Store, State), StoreError> {
    let (store, mut state) = Store::open(&config.db, config.limits)?;
    state.budgets = Budgets::new(config.budgets.clone());
    let spent = store.meta_rows(META_PREFIX)?;
    state
        .budgets
        .restore(spent.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Ok((store, state))
}

pub async fn run_with_key(
    config: Config,
    key: Secret,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let protection = match &config.web_config_file {
        Some(path) => crate::http::Protection::load(path)?,
        None => crate::http::Protection::default(),
    };
    let (store, state) = open_store(&config)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let poller_key = key.clone();
    let errors_key = key.clone();
    let client = AnySource::new(SourceOptions {
        base_url: config.cpa_url.clone(),
        key,
        transport: config.transport,
        api_version: config.api_version,
        timeout: config.http_timeout,
        max_body_bytes: config.max_response_bytes,
        http_idle: config.idle_interval(false),
        resp_idle: config.idle_interval(true),
        proxy: config.cpa_proxy.clone(),
    })?;
    let poll_interval = client.idle_interval();
    let pricing = load_pricing(&config)?;
    let shared = Arc::new(Shared::new(state, config.labels.clone(), config.db.clone()));
    let event_log = match config.event_log.clone() {
        None => None,
        Some(target) => {
            let path = match &target {
                EventLogTarget::Stdout => "stdout".to_owned(),
                EventLogTarget::File { path, .. } => path.display().to_string(),
            };
            let log = EventLog::start(target, shared.clone())
                .map_err(|source| StartError::EventLog { path, source })?;
            Some(Arc::new(log))
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let local = listener.local_addr().unwrap_or(config.listen);
    info!(
        listen = %local,
        cpa = %config.cpa_url,
        db = %config.db.display(),
        batch_size = config.batch_size,
        transport = config.transport.name(),
        poll_interval = %poll_interval_text(&config),
        tls = protection.is_tls(),
        auth = protection.requires_auth(),
        cpa_proxy = config.cpa_proxy.is_some(),
        "cpa-usage-exporter {} started",
        env!("CARGO_PKG_VERSION")
    );
    let store_shared = shared.clone();
    tokio::spawn(store.file_watch().run(stop_rx.clone(), move |why| {
        tracing::error!("{why}");
        store_shared.live.set_store_lost(why);
    }));
    let server = tokio::spawn(crate::http::serve(
        listener,
        shared.clone(),
        crate::http::ServeOptions {
            ready_window: ready_window(&config),
            protection,
            limits: crate::http::ConnLimits::default(),
        },
        stop_rx.clone(),
    ));
    let poller = poller::spawn(
        ClientOptions {
            base_url: config.cpa_url.clone(),
            key: poller_key,
            api_version: config.api_version,
            timeout: config.http_timeout,
            max_body_bytes: MAX_MGMT_BODY_BYTES,
            proxy: config.cpa_proxy.clone(),
        },
        PollerOptions {
            settings_interval: config.settings_interval,
            credentials_interval: config.credentials_interval,
            idle_interval: poll_interval,
            series_limit: config.limits.series_per_family,
        },
        shared.clone(),
        stop_rx.clone(),
    )?;
    let errors = start_errors_channel(&config, errors_key, &shared)?;
    let drain = drain::spawn(
        client,
        store,
        shared,
        DrainOptions {
            batch_size: config.batch_size,
            // The source's own idle interval wins once its transport is known.
            poll_interval,
            pricing,
            event_log,
        },
        stop_rx,
    );
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {},
        _ = stop => {
            info!("shutting down: finishing the batch in hand");
            stop_tx.send_replace(true);
            drain.await;
        }
    }
    stop_tx.send_replace(true);
    if let Some(errors) = errors {
        errors.stop().await;
    }
    poller.abort();
    let _ = server.await;
    Ok(())
}

/// CPA's errors channel, beside a drain loop that subscribes (or, with `auto`, may): its reader
/// logs in only once the drain loop subscribes with an accepted key.
fn start_errors_channel(
    config: &Config,
    key: Secret,
    shared: &Arc<Shared>,
) -> Result<Option<ErrorsChannel>, StartError> {
    if !matches!(config.transport, Transport::Subscribe | Transport::Auto) {
        return Ok(None);
    }
    let opts = RespOptions {
        base_url: config.cpa_url.clone(),
        key,
        timeout: config.http_timeout,
        max_reply_bytes: config.max_response_bytes,
    };
    Ok(Some(errors::start(
        opts,
        shared.clone(),
        config.limits.series_per_family,
    )?))
}
