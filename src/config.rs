//! Configuration: command-line flags, environment variables and an optional YAML file, in that
//! order of precedence, over built-in defaults. Everything is validated at start; an error names
//! the setting and where its value came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::cpa::{ApiVersion, Transport};
use crate::families::label;
use crate::labels::{api_key_label, sanitize};
use crate::metrics::LabelOptions;
use crate::store::budget::{Budget, Period};
use crate::store::Limits;

/// Re-exported: the binary and the tests name them through the configuration.
pub use crate::secret::Secret;

#[derive(Parser, Debug)]
#[command(name = "cpa-usage-exporter", version, about = "Prometheus exporter for CLIProxyAPI usage", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Run against a built-in simulated CPA with realistic traffic (no CPA or key needed). Keeps
    /// its state in ./cpa-usage-exporter-demo.db and polls every second unless told otherwise.
    Demo {
        /// Mean simulated upstream attempts per second.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
    },
    /// Diagnose the setup (CPA, routes, key, settings, other queue consumers, database) and exit;
    /// non-zero when a check failed. Tries the key once.
    Check {
        /// How long to watch CPA's attempt counters for another queue consumer (0s skips it).
        #[arg(long, default_value = "15s", value_name = "DURATION")]
        consumer_window: humantime::Duration,
    },
    /// Exit 0 if the exporter on the listen address answers /healthz with 200, else 1. For
    /// container HEALTHCHECKs: the runtime image has no shell, curl or wget.
    #[command(hide = true)]
    Healthcheck,
}

/// Settings that may come from flags or the environment. All are strings here and parsed in
/// [`Config::resolve`], so flag, env and file values share one validation and one error format.
#[derive(Args, Debug)]
pub struct Flags {
    /// YAML configuration file.
    #[arg(long, env = "CPA_EXPORTER_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// CPA base URL.
    #[arg(long, env = "CPA_URL", global = true, value_name = "URL")]
    pub cpa_url: Option<String>,
    /// CPA management key (prefer --management-key-file: flags are visible in `ps`).
    #[arg(
        long,
        env = "CPA_MANAGEMENT_KEY",
        hide_env_values = true,
        global = true,
        value_name = "KEY"
    )]
    pub management_key: Option<String>,
    /// File holding the CPA management key (wins over --management-key).
    #[arg(
        long,
        env = "CPA_MANAGEMENT_KEY_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub management_key_file: Option<String>,
    /// How to pop the queue: auto (RESP if CPA speaks it, else HTTP), http or resp.
    #[arg(
        long,
        env = "CPA_TRANSPORT",
        global = true,
        value_name = "auto|http|resp"
    )]
    pub transport: Option<String>,
    /// CPA management API routes: auto (v8, falling back to v0), v0 or v8.
    #[arg(
        long,
        env = "CPA_API_VERSION",
        global = true,
        value_name = "auto|v0|v8"
    )]
    pub api_version: Option<String>,
    /// Address to serve /metrics on.
    #[arg(long, env = "CPA_EXPORTER_LISTEN", global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// SQLite state file.
    #[arg(long, env = "CPA_EXPORTER_DB", global = true, value_name = "FILE")]
    pub db: Option<String>,
    /// Records popped per request.
    #[arg(long, env = "CPA_EXPORTER_BATCH_SIZE", global = true, value_name = "N")]
    pub batch_size: Option<String>,
    /// Wait between polls when the queue is drained (default 1s over RESP, 5s over HTTP).
    #[arg(
        long,
        env = "CPA_EXPORTER_POLL_INTERVAL",
        global = true,
        value_name = "DURATION"
    )]
    pub poll_interval: Option<String>,
    /// How often CPA's usage settings are read.
    #[arg(
        long,
        env = "CPA_EXPORTER_SETTINGS_INTERVAL",
        global = true,
        value_name = "DURATION"
    )]
    pub settings_interval: Option<String>,
    /// How often CPA's credentials listing is read (0s turns it off).
    #[arg(
        long,
        env = "CPA_EXPORTER_CREDENTIALS_INTERVAL",
        global = true,
        value_name = "DURATION"
    )]
    pub credentials_interval: Option<String>,
    /// Price table for cpa_cost_usd_total: this project's YAML format or LiteLLM's JSON.
    #[arg(
        long,
        env = "CPA_EXPORTER_PRICES_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub prices_file: Option<String>,
    /// Timeout of one request to CPA.
    #[arg(
        long,
        env = "CPA_EXPORTER_HTTP_TIMEOUT",
        global = true,
        value_name = "DURATION"
    )]
    pub http_timeout: Option<String>,
    /// Proxy for requests to CPA (http:// or https:// URL). Default: none; proxy environment
    /// variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY) are ignored for CPA.
    #[arg(
        long,
        env = "CPA_EXPORTER_CPA_PROXY",
        global = true,
        value_name = "URL"
    )]
    pub cpa_proxy: Option<String>,
    /// Web configuration file (Prometheus exporter-toolkit format): TLS, basic auth, bearer token.
    #[arg(
        long = "web.config.file",
        alias = "web-config-file",
        env = "CPA_EXPORTER_WEB_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    pub web_config_file: Option<String>,
    /// Largest queue response accepted from CPA, e.g. 64MiB (records in a larger one are lost).
    #[arg(
        long,
        env = "CPA_EXPORTER_MAX_RESPONSE_BYTES",
        global = true,
        value_name = "BYTES"
    )]
    pub max_response_bytes: Option<String>,
    /// How long a new series is shown at zero before its value, so Prometheus' rate() counts its
    /// first increment; more than twice the longest scrape interval (0 = off).
    #[arg(
        long,
        env = "CPA_EXPORTER_NEW_SERIES_HOLD",
        global = true,
        value_name = "DURATION"
    )]
    pub new_series_hold: Option<String>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(
        long,
        env = "CPA_EXPORTER_LOG_LEVEL",
        global = true,
        value_name = "LEVEL"
    )]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(
        long,
        env = "CPA_EXPORTER_LOG_FORMAT",
        global = true,
        value_name = "FORMAT"
    )]
    pub log_format: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Labels that can be dropped from every family (their series are summed on output).
pub const DROPPABLE_LABELS: [&str; 4] = [
    label::CREDENTIAL,
    label::API_KEY,
    label::REQUESTED_MODEL,
    label::ENDPOINT,
];

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub cpa_url: String,
    pub management_key: Option<Secret>,
    pub api_version: ApiVersion,
    pub transport: Transport,
    pub listen: SocketAddr,
    pub db: PathBuf,
    pub batch_size: usize,
    /// Idle wait between polls; `None` means the transport's default (see [`Config::idle_interval`]).
    pub poll_interval: Option<Duration>,
    pub settings_interval: Duration,
    /// `None`: the credentials listing is not polled.
    pub credentials_interval: Option<Duration>,
    /// Quota series of a credential disappear after this long without an observation.
    pub quota_retention: Duration,
    pub prices_file: Option<PathBuf>,
    /// Model name as CPA reports it -> name in the price table.
    pub model_aliases: HashMap<String, String>,
    pub http_timeout: Duration,
    /// Proxy for requests to CPA; `None`: direct (proxy environment variables are ignored).
    /// A secret because the URL may carry proxy credentials.
    pub cpa_proxy: Option<Secret>,
    /// Exporter-toolkit web configuration: TLS and credentials for the HTTP endpoints.
    pub web_config_file: Option<PathBuf>,
    /// Largest queue response (HTTP body or RESP reply) accepted from CPA.
    pub max_response_bytes: usize,
    pub log_level: tracing::Level,
    pub log_format: LogFormat,
    pub labels: LabelOptions,
    pub limits: Limits,
    pub budgets: Vec<Budget>,
}

/// Idle poll interval over HTTP: each poll costs CPA one bcrypt check (about 70 ms of CPU).
pub const HTTP_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Idle poll interval over RESP: after the one AUTH per connection a pop costs CPA nothing.
pub const RESP_POLL_INTERVAL: Duration = Duration::from_secs(1);

impl Config {
    /// The idle wait between polls for the transport in use.
    pub fn idle_interval(&self, resp: bool) -> Duration {
        self.poll_interval.unwrap_or(if resp {
            RESP_POLL_INTERVAL
        } else {
            HTTP_POLL_INTERVAL
        })
    }
}

pub const DEFAULT_CPA_URL: &str = "http://127.0.0.1:8317";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9317";
pub const DEFAULT_DB: &str = "./cpa-usage-exporter.db";
/// The `demo` subcommand's state file, kept apart from real counters.
pub const DEMO_DB: &str = "./cpa-usage-exporter-demo.db";

#[derive(Debug, thiserror::Error)]
#[error("invalid {what} ({origin}): {problem}")]
pub struct ConfigError {
    what: &'static str,
    origin: String,
    problem: String,
}

impl ConfigError {
    fn file(path: &Path, problem: impl fmt::Display) -> ConfigError {
        ConfigError {
            what: "configuration file",
            origin: path.display().to_string(),
            problem: problem.to_string(),
        }
    }
}

/// One scalar setting: its human name and its three spellings.
struct Spec {
    what: &'static str,
    id: &'static str,
    env: &'static str,
    default: Option<&'static str>,
}

impl Spec {
    fn file_key(&self) -> String {
        self.id.replace('_', "-")
    }
}

const fn spec(
    what: &'static str,
    id: &'static str,
    env: &'static str,
    default: Option<&'static str>,
) -> Spec {
    Spec {
        what,
        id,
        env,
        default,
    }
}

const CPA_URL: Spec = spec("CPA URL", "cpa_url", "CPA_URL", Some(DEFAULT_CPA_URL));
const KEY: Spec = spec(
    "management key",
    "management_key",
    "CPA_MANAGEMENT_KEY",
    None,
);
const KEY_FILE: Spec = spec(
    "management key file",
    "management_key_file",
    "CPA_MANAGEMENT_KEY_FILE",
    None,
);
const API_VERSION: Spec = spec(
    "API version",
    "api_version",
    "CPA_API_VERSION",
    Some("auto"),
);
const TRANSPORT: Spec = spec("transport", "transport", "CPA_TRANSPORT", Some("auto"));
const LISTEN: Spec = spec(
    "listen address",
    "listen",
    "CPA_EXPORTER_LISTEN",
    Some(DEFAULT_LISTEN),
);
const DB: Spec = spec(
    "state database path",
    "db",
    "CPA_EXPORTER_DB",
    Some(DEFAULT_DB),
);
const BATCH: Spec = spec(
    "batch size",
    "batch_size",
    "CPA_EXPORTER_BATCH_SIZE",
    Some("1000"),
);
const POLL: Spec = spec(
    "poll interval",
    "poll_interval",
    "CPA_EXPORTER_POLL_INTERVAL",
    None,
);
const SETTINGS: Spec = spec(
    "settings interval",
    "settings_interval",
    "CPA_EXPORTER_SETTINGS_INTERVAL",
    Some("2m"),
);
const CREDENTIALS: Spec = spec(
    "credentials interval",
    "credentials_interval",
    "CPA_EXPORTER_CREDENTIALS_INTERVAL",
    Some("30s"),
);
const PRICES: Spec = spec(
    "prices file",
    "prices_file",
    "CPA_EXPORTER_PRICES_FILE",
    None,
);
const TIMEOUT: Spec = spec(
    "HTTP timeout",
    "http_timeout",
    "CPA_EXPORTER_HTTP_TIMEOUT",
    Some("30s"),
);
const CPA_PROXY: Spec = spec("CPA proxy", "cpa_proxy", "CPA_EXPORTER_CPA_PROXY", None);
const WEB_CONFIG: Spec = spec(
    "web config file",
    "web_config_file",
    "CPA_EXPORTER_WEB_CONFIG",
    None,
);
const LOG_LEVEL: Spec = spec(
    "log level",
    "log_level",
    "CPA_EXPORTER_LOG_LEVEL",
    Some("info"),
);
const LOG_FORMAT: Spec = spec(
    "log format",
    "log_format",
    "CPA_EXPORTER_LOG_FORMAT",
    Some("text"),
);
// File-only settings.
const SERIES_LIMIT: Spec = spec("series limit", "series_limit", "", Some("10000"));
const DEDUP_WINDOW: Spec = spec("dedup window", "dedup_window", "", Some("100000"));
const QUOTA_RETENTION: Spec = spec("quota retention", "quota_retention", "", Some("24h"));
const SERIES_RETIREMENT: Spec = spec("series retirement", "series_retirement", "", Some("30d"));
const MAX_RESPONSE: Spec = spec(
    "maximum response size",
    "max_response_bytes",
    "CPA_EXPORTER_MAX_RESPONSE_BYTES",
    Some("64MiB"),
);

const NEW_SERIES_HOLD: Spec = spec(
    "new-series hold",
    "new_series_hold",
    "CPA_EXPORTER_NEW_SERIES_HOLD",
    Some(DEFAULT_NEW_SERIES_HOLD),
);
/// Default of `new-series-hold`: four scrapes at Prometheus' usual 15 s, two at 30 s.
pub const DEFAULT_NEW_SERIES_HOLD: &str = "1m";

const SCALARS: [&Spec; 23] = [
    &CPA_PROXY,
    &WEB_CONFIG,
    &CPA_URL,
    &KEY,
    &KEY_FILE,
    &API_VERSION,
    &TRANSPORT,
    &LISTEN,
    &DB,
    &BATCH,
    &POLL,
    &SETTINGS,
    &CREDENTIALS,
    &PRICES,
    &TIMEOUT,
    &LOG_LEVEL,
    &LOG_FORMAT,
    &SERIES_LIMIT,
    &DEDUP_WINDOW,
    &QUOTA_RETENTION,
    &SERIES_RETIREMENT,
    &MAX_RESPONSE,
    &NEW_SERIES_HOLD,
];
/// Sections of the file that are not scalars.
const SECTIONS: [&str; 3] = ["labels", "model-aliases", "budgets"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LabelsFile {
    #[serde(default)]
    drop: Vec<String>,
    /// Client key (plaintext or `sha256:<12 hex>`) -> alias.
    #[serde(default)]
    api_key_aliases: BTreeMap<String, String>,
    /// `auth_index` -> display name.
    #[serde(default)]
    credential_names: BTreeMap<String, String>,
    #[serde(default)]
    unmask_credential_names: bool,
}

/// The parsed YAML file: scalars as text (validated like flags), plus the `labels` section.
/// One entry of `budgets`: a client API key (plaintext, `sha256:` display hash or alias), an
/// amount and a period.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BudgetFile {
    api_key: String,
    usd: f64,
    period: String,
}

#[derive(Debug, Default)]
struct FileConfig {
    path: Option<PathBuf>,
    scalars: HashMap<String, String>,
    labels: LabelsFile,
    model_aliases: BTreeMap<String, String>,
    budgets: Vec<BudgetFile>,
}

impl FileConfig {
    fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::file(path, e))?;
        let doc: serde_norway::Value =
            serde_norway::from_str(&text).map_err(|e| ConfigError::file(path, e))?;
        let mut file = FileConfig {
            path: Some(path.to_owned()),
            ..FileConfig::default()
        };
        let map = match doc {
            serde_norway::Value::Null => return Ok(file),
            serde_norway::Value::Mapping(m) => m,
            _ => return Err(ConfigError::file(path, "expected a mapping of settings")),
        };
        for (k, v) in map {
            let key = k
                .as_str()
                .ok_or_else(|| ConfigError::file(path, "setting names must be strings"))?
                .to_owned();
            if key == "labels" {
                file.labels = serde_norway::from_value(v)
                    .map_err(|e| ConfigError::file(path, format!("labels: {e}")))?;
                continue;
            }
            if key == "budgets" {
                file.budgets = serde_norway::from_value(v)
                    .map_err(|e| ConfigError::file(path, format!("budgets: {e}")))?;
                continue;
            }
            if key == "model-aliases" {
                file.model_aliases = serde_norway::from_value(v)
                    .map_err(|e| ConfigError::file(path, format!("model-aliases: {e}")))?;
                continue;
            }
            if !SCALARS.iter().any(|s| s.file_key() == key) {
                let known: Vec<String> = SCALARS.iter().map(|s| s.file_key()).collect();
                return Err(ConfigError::file(
                    path,
                    format!(
                        "unknown setting `{key}` (known: {}, {})",
                        SECTIONS.join(", "),
                        known.join(", ")
                    ),
                ));
            }
            let text = match v {
                serde_norway::Value::String(s) => s,
                serde_norway::Value::Number(n) => n.to_string(),
                serde_norway::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(ConfigError::file(
                        path,
                        format!("{key}: expected a single value"),
                    ))
                }
            };
            file.scalars.insert(key, text);
        }
        Ok(file)
    }
}

/// The command line, with every built-in default in `--help`. They are shown, not set as clap
/// defaults: a clap default would always win over the configuration file.
pub fn command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut file_only = Vec::new();
    for spec in SCALARS {
        let default = match spec.default {
            Some(d) => d,
            // Its help already says: it depends on the transport.
            None if spec.id == POLL.id => continue,
            None if spec.id == PRICES.id => "the built-in table",
            None => "none",
        };
        if spec.env.is_empty() {
            file_only.push(format!("  {}: {default}", spec.file_key()));
            continue;
        }
        cmd = cmd.mut_arg(spec.id, |arg| {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            arg.help(format!("{help} [default: {default}]"))
        });
    }
    cmd.after_help(format!(
        "Precedence: flags, then environment variables, then the --config file, then the \
         defaults.\nOnly in the --config file (with their defaults): labels, model-aliases,\n{}",
        file_only.join("\n")
    ))
}

/// Where a raw value came from, for error messages.
struct Raw {
    value: Option<String>,
    origin: String,
}

impl Config {
    /// Parse the process arguments and environment.
    pub fn from_args() -> Result<(Option<Command>, Config), ConfigError> {
        let matches = command().get_matches();
        let cli =
            <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let config = Config::resolve(&cli.flags, &matches)?;
        Ok((cli.command, config))
    }

    /// Merge flags/env (`flags` + `matches` tell which is which), the file, and defaults.
    pub fn resolve(flags: &Flags, matches: &ArgMatches) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let pick = |spec: &Spec, cli: &Option<String>| -> Raw {
            if let Some(v) = cli {
                // A global flag given after a subcommand lives in the subcommand's matches.
                let source = matches.value_source(spec.id).or_else(|| {
                    matches
                        .subcommand()
                        .and_then(|(_, m)| m.value_source(spec.id))
                });
                let origin = match source {
                    Some(ValueSource::EnvVariable) => format!("from {}", spec.env),
                    _ => format!("from --{}", spec.id.replace('_', "-")),
                };
                return Raw {
                    value: Some(v.clone()),
                    origin,
                };
            }
            if let Some(v) = file.scalars.get(&spec.file_key()) {
                let origin = match &file.path {
                    Some(p) => format!("`{}` in {}", spec.file_key(), p.display()),
                    None => spec.file_key(),
                };
                return Raw {
                    value: Some(v.clone()),
                    origin,
                };
            }
            Raw {
                value: spec.default.map(str::to_owned),
                origin: "default".to_owned(),
            }
        };
        let err = |spec: &Spec, raw: &Raw, problem: String| ConfigError {
            what: spec.what,
            origin: raw.origin.clone(),
            problem,
        };
        let required = |spec: &Spec, raw: Raw| -> Result<(String, Raw), ConfigError> {
            match &raw.value {
                Some(v) => Ok((v.clone(), raw)),
                None => Err(err(spec, &raw, "missing".into())),
            }
        };

        let (url, raw) = required(&CPA_URL, pick(&CPA_URL, &flags.cpa_url))?;
        let cpa_url = parse_url(&url).map_err(|p| err(&CPA_URL, &raw, p))?;

        let key_file = pick(&KEY_FILE, &flags.management_key_file);
        let management_key = match &key_file.value {
            Some(path) => {
                Some(read_key_file(Path::new(path)).map_err(|p| err(&KEY_FILE, &key_file, p))?)
            }
            None => {
                let raw = pick(&KEY, &flags.management_key);
                match raw.value.as_deref().map(str::trim) {
                    None => None,
                    Some("") => return Err(err(&KEY, &raw, "is empty".into())),
                    Some(k) => Some(Secret::new(k)),
                }
            }
        };

        let (v, raw) = required(&API_VERSION, pick(&API_VERSION, &flags.api_version))?;
        let api_version = choice::<ApiVersion>(&v, true).map_err(|p| err(&API_VERSION, &raw, p))?;

        let (v, raw) = required(&TRANSPORT, pick(&TRANSPORT, &flags.transport))?;
        let transport = choice::<Transport>(&v, true).map_err(|p| err(&TRANSPORT, &raw, p))?;

        let (v, raw) = required(&LISTEN, pick(&LISTEN, &flags.listen))?;
        let listen = parse_listen(&v).map_err(|p| err(&LISTEN, &raw, p))?;

        let (v, raw) = required(&DB, pick(&DB, &flags.db))?;
        if v.trim().is_empty() {
            return Err(err(&DB, &raw, "is empty".into()));
        }
        let db = PathBuf::from(v);

        let (v, raw) = required(&BATCH, pick(&BATCH, &flags.batch_size))?;
        let batch_size = parse_int(&v, 1, 100_000).map_err(|p| err(&BATCH, &raw, p))? as usize;

        let raw = pick(&POLL, &flags.poll_interval);
        let poll_interval = match &raw.value {
            None => None,
            Some(v) => Some(
                parse_duration(v, Duration::from_millis(100), Duration::from_secs(600))
                    .map_err(|p| err(&POLL, &raw, p))?,
            ),
        };

        let (v, raw) = required(&SETTINGS, pick(&SETTINGS, &flags.settings_interval))?;
        let settings_interval =
            parse_duration(&v, Duration::from_secs(10), Duration::from_secs(3600))
                .map_err(|p| err(&SETTINGS, &raw, p))?;

        let (v, raw) = required(
            &CREDENTIALS,
            pick(&CREDENTIALS, &flags.credentials_interval),
        )?;
        let credentials_interval = match humantime::parse_duration(v.trim()) {
            Ok(d) if d.is_zero() => None,
            _ => Some(
                parse_duration(&v, Duration::from_secs(5), Duration::from_secs(3600))
                    .map_err(|p| err(&CREDENTIALS, &raw, p))?,
            ),
        };

        let raw = pick(&PRICES, &flags.prices_file);
        let prices_file = match raw.value.as_deref().map(str::trim) {
            None => None,
            Some("") => return Err(err(&PRICES, &raw, "is empty".into())),
            Some(p) => Some(PathBuf::from(p)),
        };

        let (v, raw) = required(&QUOTA_RETENTION, pick(&QUOTA_RETENTION, &None))?;
        let quota_retention = parse_duration(
            &v,
            Duration::from_secs(60),
            Duration::from_secs(90 * 86_400),
        )
        .map_err(|p| err(&QUOTA_RETENTION, &raw, p))?;

        let (v, raw) = required(&TIMEOUT, pick(&TIMEOUT, &flags.http_timeout))?;
        let http_timeout = parse_duration(&v, Duration::from_secs(1), Duration::from_secs(300))
            .map_err(|p| err(&TIMEOUT, &raw, p))?;

        let raw = pick(&CPA_PROXY, &flags.cpa_proxy);
        let cpa_proxy = match raw.value.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(v) => Some(parse_proxy(v).map_err(|p| err(&CPA_PROXY, &raw, p))?),
        };
        // RESP is a raw TCP protocol: it cannot go through an HTTP proxy, and `auto` would probe
        // it directly, bypassing the proxy. With a proxy, CPA is reached over HTTP only.
        let transport = match (transport, &cpa_proxy) {
            (Transport::Resp, Some(_)) => {
                return Err(err(
                    &CPA_PROXY,
                    &raw,
                    "RESP cannot go through an HTTP proxy: use --transport http (or auto)".into(),
                ))
            }
            (Transport::Auto, Some(_)) => Transport::Http,
            (t, _) => t,
        };

        let raw = pick(&WEB_CONFIG, &flags.web_config_file);
        let web_config_file = match raw.value.as_deref().map(str::trim) {
            None => None,
            Some("") => return Err(err(&WEB_CONFIG, &raw, "is empty".into())),
            Some(p) => Some(PathBuf::from(p)),
        };

        let (v, raw) = required(&LOG_LEVEL, pick(&LOG_LEVEL, &flags.log_level))?;
        let log_level = v.parse::<tracing::Level>().map_err(|_| {
            err(
                &LOG_LEVEL,
                &raw,
                format!("`{v}`: expected error, warn, info, debug or trace"),
            )
        })?;

        let (v, raw) = required(&LOG_FORMAT, pick(&LOG_FORMAT, &flags.log_format))?;
        let log_format = choice::<LogFormat>(&v, false).map_err(|p| err(&LOG_FORMAT, &raw, p))?;

        let (v, raw) = required(&SERIES_LIMIT, pick(&SERIES_LIMIT, &None))?;
        let series_per_family =
            parse_int(&v, 10, 1_000_000).map_err(|p| err(&SERIES_LIMIT, &raw, p))? as usize;
        let (v, raw) = required(&SERIES_RETIREMENT, pick(&SERIES_RETIREMENT, &None))?;
        let series_retirement = match v.trim() {
            "0" | "off" => None,
            _ => Some(
                parse_duration(
                    &v,
                    Duration::from_secs(60),
                    Duration::from_secs(3650 * 86_400),
                )
                .map_err(|p| err(&SERIES_RETIREMENT, &raw, format!("{p}, or 0/off")))?,
            ),
        };
        let (v, raw) = required(
            &MAX_RESPONSE,
            pick(&MAX_RESPONSE, &flags.max_response_bytes),
        )?;
        let max_response_bytes =
            parse_bytes(&v, 64 * 1024, 1 << 30).map_err(|p| err(&MAX_RESPONSE, &raw, p))?;
        let (v, raw) = required(
            &NEW_SERIES_HOLD,
            pick(&NEW_SERIES_HOLD, &flags.new_series_hold),
        )?;
        let new_series_hold = match v.trim() {
            "0" | "0s" | "off" => Duration::ZERO,
            _ => parse_duration(&v, Duration::from_secs(1), Duration::from_secs(3600))
                .map_err(|p| err(&NEW_SERIES_HOLD, &raw, format!("{p}, or 0/off")))?,
        };
        let (v, raw) = required(&DEDUP_WINDOW, pick(&DEDUP_WINDOW, &None))?;
        let dedup_window =
            parse_int(&v, 0, 10_000_000).map_err(|p| err(&DEDUP_WINDOW, &raw, p))? as usize;

        let labels = label_options(&file)?;
        let budgets = budgets(&file, &labels)?;
        Ok(Config {
            cpa_url,
            management_key,
            api_version,
            transport,
            listen,
            db,
            batch_size,
            poll_interval,
            settings_interval,
            credentials_interval,
            quota_retention,
            prices_file,
            model_aliases: file.model_aliases.clone().into_iter().collect(),
            http_timeout,
            cpa_proxy,
            web_config_file,
            max_response_bytes,
            log_level,
            log_format,
            labels,
            limits: Limits {
                series_per_family,
                dedup_window,
                quota_retention,
                series_retirement,
                new_series_hold,
            },
            budgets,
        })
    }
}

/// Whether `key` is a display hash, `sha256:` and 12 hex digits.
fn is_key_hash(key: &str) -> bool {
    key.len() == 19 && key.starts_with("sha256:") && key[7..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Resolve `budgets` to stored key labels: a display hash is taken as is, then an alias from
/// `labels.api-key-aliases`, else the value is a plaintext key and is hashed here (it is not kept).
fn budgets(file: &FileConfig, labels: &LabelOptions) -> Result<Vec<Budget>, ConfigError> {
    let mut out: Vec<Budget> = Vec::new();
    for (i, b) in file.budgets.iter().enumerate() {
        let origin = match &file.path {
            Some(p) => format!("`budgets[{i}]` in {}", p.display()),
            None => format!("budgets[{i}]"),
        };
        let fail = |problem: String| ConfigError {
            what: "budget",
            origin: origin.clone(),
            problem,
        };
        let key = b.api_key.trim();
        if key.is_empty() {
            return Err(fail("api-key is empty".into()));
        }
        let api_key = if is_key_hash(key) {
            key.to_ascii_lowercase()
        } else if let Some((hash, _)) = labels.api_key_aliases.iter().find(|(_, a)| *a == key) {
            hash.clone()
        } else {
            api_key_label(key)
        };
        if !(b.usd.is_finite() && b.usd > 0.0) {
            return Err(fail(format!(
                "usd for {api_key} must be a positive amount, got {}",
                b.usd
            )));
        }
        let period = Period::parse(&b.period).ok_or_else(|| {
            fail(format!(
                "period `{}` for {api_key}: expected day or month",
                b.period
            ))
        })?;
        if out
            .iter()
            .any(|o| o.api_key == api_key && o.period == period)
        {
            return Err(fail(format!(
                "a second {} budget for {api_key}",
                period.as_str()
            )));
        }
        out.push(Budget {
            api_key,
            usd: b.usd,
            period,
        });
    }
    Ok(out)
}

fn label_options(file: &FileConfig) -> Result<LabelOptions, ConfigError> {
    let origin = |key: &str| match &file.path {
        Some(p) => format!("`labels.{key}` in {}", p.display()),
        None => format!("labels.{key}"),
    };
    let mut drop = Vec::new();
    for name in &file.labels.drop {
        let known = DROPPABLE_LABELS
            .iter()
            .find(|l| **l == name.as_str())
            .ok_or_else(|| ConfigError {
                what: "label to drop",
                origin: origin("drop"),
                problem: format!(
                    "`{name}`: only {} can be dropped",
                    DROPPABLE_LABELS.join(", ")
                ),
            })?;
        if !drop.contains(known) {
            drop.push(*known);
        }
    }
    let mut api_key_aliases = HashMap::new();
    for (key, alias) in &file.labels.api_key_aliases {
        let hashed = if is_key_hash(key) {
            key.to_ascii_lowercase()
        } else {
            api_key_label(key)
        };
        if alias.trim().is_empty() {
            return Err(ConfigError {
                what: "API key alias",
                origin: origin("api-key-aliases"),
                problem: format!("the alias for {hashed} is empty"),
            });
        }
        api_key_aliases.insert(hashed, sanitize(alias.trim()).into_owned());
    }
    let mut credential_names = HashMap::new();
    for (index, name) in &file.labels.credential_names {
        if name.trim().is_empty() {
            return Err(ConfigError {
                what: "credential name",
                origin: origin("credential-names"),
                problem: format!("the name for credential {index} is empty"),
            });
        }
        credential_names.insert(
            sanitize(index.trim()).into_owned(),
            sanitize(name.trim()).into_owned(),
        );
    }
    Ok(LabelOptions {
        drop,
        api_key_aliases,
        credential_names,
        unmask_credential_names: file.labels.unmask_credential_names,
    })
}

fn parse_url(v: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(v.trim()).map_err(|e| format!("`{v}`: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{v}`: the scheme must be http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials in a URL end up in logs; the key has its own settings.
        return Err("must not contain credentials; use the management key settings".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{v}`: must not have a query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// A proxy URL. The value is never quoted back: it may carry credentials.
fn parse_proxy(v: &str) -> Result<Secret, String> {
    let url = reqwest::Url::parse(v).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the scheme must be http or https".into());
    }
    if url.host_str().is_none() {
        return Err("the URL has no host".into());
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err("expected scheme://[user:password@]host:port, without a path".into());
    }
    Ok(Secret::new(v))
}

fn parse_listen(v: &str) -> Result<SocketAddr, String> {
    // `:9317` (Go style, as node_exporter accepts) means all interfaces.
    let full = if v.starts_with(':') {
        format!("0.0.0.0{v}")
    } else {
        v.to_owned()
    };
    full.parse()
        .map_err(|_| format!("`{v}`: expected HOST:PORT with an IP address, e.g. 0.0.0.0:9317"))
}

fn parse_int(v: &str, min: u64, max: u64) -> Result<u64, String> {
    match v.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{v}`: expected a whole number from {min} to {max}"
        )),
    }
}

/// A size in bytes: a whole number, optionally with a KiB, MiB or GiB suffix.
fn parse_bytes(v: &str, min: usize, max: usize) -> Result<usize, String> {
    let t = v.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, ""),
    };
    let scale: usize = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        _ => 0,
    };
    let human = |n: usize| format!("{} MiB", n as f64 / 1048576.0);
    match digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
    {
        Some(n) if scale > 0 && (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{v}`: expected a size from {} to {} (a number of bytes, or with KiB, MiB, GiB)",
            human(min),
            human(max)
        )),
    }
}

/// One of an enum's values by name: `ValueEnum` names them once, for this and for clap.
fn choice<T: ValueEnum>(v: &str, ignore_case: bool) -> Result<T, String> {
    T::from_str(v, ignore_case).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|x| x.to_possible_value())
            .map(|p| p.get_name().to_owned())
            .collect();
        let expected = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        let shown = if ignore_case {
            v.to_ascii_lowercase()
        } else {
            v.to_owned()
        };
        format!("`{shown}`: expected {expected}")
    })
}

fn parse_duration(v: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(v.trim())
        .map_err(|e| format!("`{v}`: {e} (examples: 500ms, 5s, 2m)"))?;
    if d < min || d > max {
        return Err(format!(
            "`{v}`: must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

fn read_key_file(path: &Path) -> Result<Secret, String> {
    // The error text names the file and the OS reason, never the content.
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    fn resolve(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["cpa-usage-exporter"];
        argv.extend_from_slice(args);
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        Config::resolve(&cli.flags, &matches)
    }

    #[test]
    fn a_wrong_choice_names_the_choices() {
        for (args, says) in [
            (["--api-version", "V9"], "`v9`: expected auto, v0 or v8"),
            (["--transport", "XX"], "`xx`: expected auto, http or resp"),
            (["--log-format", "Json"], "`Json`: expected text or json"),
        ] {
            let e = resolve(&args).unwrap_err().to_string();
            assert!(e.ends_with(says), "{e}");
        }
        assert_eq!(
            resolve(&["--transport", "RESP"]).unwrap().transport,
            Transport::Resp
        );
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.cpa_url, "http://127.0.0.1:8317");
        assert_eq!(c.listen, "0.0.0.0:9317".parse().unwrap());
        assert_eq!(c.db, PathBuf::from("./cpa-usage-exporter.db"));
        assert_eq!(c.batch_size, 1000);
        assert_eq!(c.poll_interval, None);
        assert_eq!(c.idle_interval(false), Duration::from_secs(5));
        assert_eq!(c.idle_interval(true), Duration::from_secs(1));
        assert_eq!(c.api_version, ApiVersion::Auto);
        assert_eq!(c.transport, Transport::Auto);
        assert_eq!(c.credentials_interval, Some(Duration::from_secs(30)));
        assert_eq!(c.quota_retention, Duration::from_secs(86_400));
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let f = file("batch-size: 50\npoll-interval: 2m\nlisten: ':9999'\n");
        let path = f.path().to_str().unwrap();
        let c = resolve(&["--config", path, "--batch-size", "7"]).unwrap();
        assert_eq!(c.batch_size, 7);
        assert_eq!(c.poll_interval, Some(Duration::from_secs(120)));
        assert_eq!(c.listen, "0.0.0.0:9999".parse().unwrap());
    }

    #[test]
    fn errors_name_the_setting_and_its_origin() {
        let e = resolve(&["--batch-size", "0"]).unwrap_err().to_string();
        assert!(
            e.contains("batch size") && e.contains("--batch-size"),
            "{e}"
        );
        let e = resolve(&["--poll-interval", "soon"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("poll interval") && e.contains("soon"), "{e}");
        let f = file("api-version: v9\n");
        let e = resolve(&["--config", f.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("API version") && e.contains("`api-version` in"),
            "{e}"
        );
        let f = file("batchsize: 1\n");
        let e = resolve(&["--config", f.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown setting `batchsize`"), "{e}");
        let e = resolve(&["--cpa-url", "ftp://x"]).unwrap_err().to_string();
        assert!(e.contains("CPA URL"), "{e}");
    }

    #[test]
    fn the_key_file_wins_and_the_key_never_prints() {
        let f = file("  file-secret\n");
        let c = resolve(&[
            "--management-key",
            "flag-secret",
            "--management-key-file",
            f.path().to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(
            c.management_key.as_ref().map(Secret::expose),
            Some("file-secret")
        );
        let debug = format!("{c:?}");
        assert!(!debug.contains("file-secret") && !debug.contains("flag-secret"));
        let e = resolve(&["--management-key-file", "/nonexistent/key"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("management key file"), "{e}");
    }

    #[test]
    fn new_series_hold_defaults_to_a_minute_and_is_validated() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.limits.new_series_hold, Duration::from_secs(60));
        for (text, want) in [("off", 0), ("0", 0), ("2m30s", 150), ("3s", 3)] {
            let c = resolve(&["--new-series-hold", text]).unwrap();
            assert_eq!(
                c.limits.new_series_hold,
                Duration::from_secs(want),
                "{text}"
            );
        }
        let f = file("new-series-hold: 90s\n");
        let c = resolve(&["--config", f.path().to_str().unwrap()]).unwrap();
        assert_eq!(c.limits.new_series_hold, Duration::from_secs(90));
        for bad in ["500ms", "2h", "soon", "-1s"] {
            let e = resolve(&[&format!("--new-series-hold={bad}")])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("new-series hold") && e.contains("--new-series-hold"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn response_limit_and_series_retirement() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.max_response_bytes, 64 << 20);
        assert_eq!(
            c.limits.series_retirement,
            Some(Duration::from_secs(30 * 86_400))
        );
        let c = resolve(&["--max-response-bytes", "512KiB"]).unwrap();
        assert_eq!(c.max_response_bytes, 512 << 10);
        assert_eq!(
            resolve(&["--max-response-bytes", "1048576"])
                .unwrap()
                .max_response_bytes,
            1 << 20
        );
        for bad in ["1KiB", "2GiB", "lots", "1.5MiB", "5 parsecs"] {
            let e = resolve(&["--max-response-bytes", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("maximum response size"), "{bad}: {e}");
        }
        for (text, want) in [
            ("off", None),
            ("0", None),
            ("90d", Some(Duration::from_secs(90 * 86_400))),
        ] {
            let f = file(&format!("series-retirement: {text}\n"));
            let c = resolve(&["--config", f.path().to_str().unwrap()]).unwrap();
            assert_eq!(c.limits.series_retirement, want, "{text}");
        }
        let f = file("series-retirement: 10s\n");
        let e = resolve(&["--config", f.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("series retirement") && e.contains("0/off"),
            "{e}"
        );
    }

    #[test]
    fn label_options_accept_plain_keys_and_hashes() {
        let f = file(
            "labels:\n  drop: [endpoint]\n  api-key-aliases:\n    sk-team-a: team-a\n    sha256:ABCDEF012345: team-b\n",
        );
        let c = resolve(&["--config", f.path().to_str().unwrap()]).unwrap();
        assert_eq!(c.labels.drop, vec!["endpoint"]);
        assert_eq!(
            c.labels
                .api_key_aliases
                .get(&api_key_label("sk-team-a"))
                .unwrap(),
            "team-a"
        );
        assert_eq!(
            c.labels.api_key_aliases.get("sha256:abcdef012345").unwrap(),
            "team-b"
        );
        let f = file("labels:\n  drop: [provider]\n");
        let e = resolve(&["--config", f.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("label to drop") && e.contains("provider"), "{e}");
    }

    #[test]
    fn a_proxy_is_opt_in_means_http_and_never_prints() {
        assert!(resolve(&[]).unwrap().cpa_proxy.is_none());
        let c = resolve(&["--cpa-proxy", "http://user:proxy-pass@10.0.0.1:3128"]).unwrap();
        assert_eq!(c.transport, Transport::Http);
        assert!(!format!("{c:?}").contains("proxy-pass"));
        let e = resolve(&[
            "--cpa-proxy",
            "http://u:proxy-pass@h:1",
            "--transport",
            "resp",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("CPA proxy") && e.contains("RESP"), "{e}");
        let e = resolve(&["--cpa-proxy", "socks5://u:proxy-pass@h:1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CPA proxy") && !e.contains("proxy-pass"), "{e}");
        let c = resolve(&["--web.config.file", "/etc/web.yml"]).unwrap();
        assert_eq!(c.web_config_file, Some(PathBuf::from("/etc/web.yml")));
    }

    #[test]
    fn budgets_accept_a_plaintext_key_a_display_hash_or_an_alias() {
        let f = file(concat!(
            "labels:\n  api-key-aliases:\n    sk-team-a: team-a\n",
            "budgets:\n",
            "  - { api-key: team-a, usd: 25, period: day }\n",
            "  - { api-key: sk-other, usd: 400.5, period: month }\n",
            "  - { api-key: 'sha256:ABCDEF012345', usd: 1, period: day }\n",
        ));
        let c = resolve(&["--config", f.path().to_str().unwrap()]).unwrap();
        let keys: Vec<(&str, f64, Period)> = c
            .budgets
            .iter()
            .map(|b| (b.api_key.as_str(), b.usd, b.period))
            .collect();
        let team_a = api_key_label("sk-team-a");
        let other = api_key_label("sk-other");
        assert_eq!(
            keys,
            [
                (team_a.as_str(), 25.0, Period::Day),
                (other.as_str(), 400.5, Period::Month),
                ("sha256:abcdef012345", 1.0, Period::Day),
            ]
        );
        assert!(
            !format!("{c:?}").contains("sk-other"),
            "the plaintext key is not kept"
        );
    }

    #[test]
    fn a_bad_budget_fails_at_start_naming_it() {
        for (entry, needle) in [
            ("{ api-key: k, usd: 0, period: day }", "positive"),
            ("{ api-key: k, usd: 5, period: week }", "`week`"),
            ("{ api-key: ' ', usd: 5, period: day }", "empty"),
            ("{ api-key: k, usd: 5, period: day, cap: 1 }", "cap"),
            ("{ api-key: k, usd: 5 }", "period"),
        ] {
            let f = file(&format!("budgets:\n  - {entry}\n"));
            let e = resolve(&["--config", f.path().to_str().unwrap()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("budget") && e.contains(needle), "{entry}: {e}");
            assert!(!e.contains(": k,"), "{e}");
        }
        let f = file("budgets:\n  - { api-key: k, usd: 5, period: day }\n  - { api-key: k, usd: 6, period: daily }\n");
        let e = resolve(&["--config", f.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("second day budget"), "{e}");
    }
}
