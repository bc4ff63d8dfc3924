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
use crate::pipeline::events::Target as EventLogTarget;
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
/// A clap default shows in `--help` and is used only when the file does not set the value either
/// (the merge asks clap where each value came from).
#[derive(Args, Debug)]
pub struct Flags {
    /// YAML configuration file.
    #[arg(long, env = "CPA_EXPORTER_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// CPA base URL.
    #[arg(long, env = "CPA_URL", global = true, value_name = "URL", default_value = DEFAULT_CPA_URL)]
    pub cpa_url: Option<String>,
    /// CPA management key (prefer --management-key-file: flags are visible in `ps`) [default:
    /// none]
    #[arg(
        long,
        env = "CPA_MANAGEMENT_KEY",
        hide_env_values = true,
        global = true,
        value_name = "KEY"
    )]
    pub management_key: Option<String>,
    /// File holding the CPA management key (wins over --management-key) [default: none]
    #[arg(
        long,
        env = "CPA_MANAGEMENT_KEY_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub management_key_file: Option<String>,
    /// How to take usage: auto (subscribe if CPA speaks RESP, else http), http, resp (pop the
    /// queue over RESP) or subscribe (SUBSCRIBE usage, draining the queue after each
    /// subscription; counts beside other collectors that subscribe).
    #[arg(
        long,
        env = "CPA_TRANSPORT",
        global = true,
        value_name = "auto|http|resp|subscribe",
        default_value = "auto"
    )]
    pub transport: Option<String>,
    /// CPA management API routes: auto (v8, falling back to v0), v0 or v8.
    #[arg(
        long,
        env = "CPA_API_VERSION",
        global = true,
        value_name = "auto|v0|v8",
        default_value = "auto"
    )]
    pub api_version: Option<String>,
    /// Address to serve /metrics on.
    #[arg(long, env = "CPA_EXPORTER_LISTEN", global = true, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: Option<String>,
    /// SQLite state file.
    #[arg(long, env = "CPA_EXPORTER_DB", global = true, value_name = "FILE", default_value = DEFAULT_DB)]
    pub db: Option<String>,
    /// Records popped per request.
    #[arg(
        long,
        env = "CPA_EXPORTER_BATCH_SIZE",
        global = true,
        value_name = "N",
        default_value = "1000"
    )]
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
        value_name = "DURATION",
        default_value = "2m"
    )]
    pub settings_interval: Option<String>,
    /// How often CPA's credentials listing is read (0s turns it off).
    #[arg(
        long,
        env = "CPA_EXPORTER_CREDENTIALS_INTERVAL",
        global = true,
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub credentials_interval: Option<String>,
    /// Price table for cpa_cost_usd_total: this project's YAML format or LiteLLM's JSON
    /// [default: the built-in table]
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
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub http_timeout: Option<String>,
    /// Proxy for requests to CPA (http:// or https:// URL); proxy environment variables
    /// (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY) are ignored for CPA [default: none]
    #[arg(
        long,
        env = "CPA_EXPORTER_CPA_PROXY",
        global = true,
        value_name = "URL"
    )]
    pub cpa_proxy: Option<String>,
    /// Web configuration file (Prometheus exporter-toolkit format): TLS, basic auth, bearer token
    /// [default: none]
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
        value_name = "BYTES",
        default_value = "64MiB"
    )]
    pub max_response_bytes: Option<String>,
    /// How long a new series is shown at zero before its value, so Prometheus' rate() counts its
    /// first increment; more than twice the longest scrape interval (0 = off).
    #[arg(
        long,
        env = "CPA_EXPORTER_NEW_SERIES_HOLD",
        global = true,
        value_name = "DURATION",
        default_value = DEFAULT_NEW_SERIES_HOLD,
    )]
    pub new_series_hold: Option<String>,
    /// How far apart the attempts of one inbound request (same request_id and client key) may
    /// start, and how long a request whose last attempt failed waits for another (1s..1h).
    #[arg(
        long,
        env = "CPA_EXPORTER_FAILOVER_WINDOW",
        global = true,
        value_name = "DURATION",
        default_value = DEFAULT_FAILOVER_WINDOW,
    )]
    pub failover_window: Option<String>,
    /// One JSON line per ingested record, for a log store: off, stdout, or a file path
    /// (rotated by size). Lines carry request ids, never client keys or error bodies.
    #[arg(
        long,
        env = "CPA_EXPORTER_EVENT_LOG",
        global = true,
        value_name = "off|stdout|FILE",
        default_value = "off"
    )]
    pub event_log: Option<String>,
    /// Size at which the event log file is rotated (FILE -> FILE.1 -> ...), e.g. 100MiB.
    #[arg(
        long,
        env = "CPA_EXPORTER_EVENT_LOG_MAX_SIZE",
        global = true,
        value_name = "BYTES",
        default_value = DEFAULT_EVENT_LOG_MAX_SIZE
    )]
    pub event_log_max_size: Option<String>,
    /// Rotated event log files kept beside the current one (1..100).
    #[arg(
        long,
        env = "CPA_EXPORTER_EVENT_LOG_MAX_FILES",
        global = true,
        value_name = "N",
        default_value = DEFAULT_EVENT_LOG_MAX_FILES
    )]
    pub event_log_max_files: Option<String>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(
        long,
        env = "CPA_EXPORTER_LOG_LEVEL",
        global = true,
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(
        long,
        env = "CPA_EXPORTER_LOG_FORMAT",
        global = true,
        value_name = "FORMAT",
        default_value = "text"
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
    /// Where the per-record event log goes; `None`: off.
    pub event_log: Option<EventLogTarget>,
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

/// Default of `new-series-hold`: four scrapes at Prometheus' usual 15 s, two at 30 s.
pub const DEFAULT_NEW_SERIES_HOLD: &str = "1m";
/// Default of `failover-window`: CPA retries at once, so a minute covers a chain's gaps; a
/// successor whose own latency is longer arrives too late (docs/guarantees.md).
pub const DEFAULT_FAILOVER_WINDOW: &str = "60s";
/// Defaults of the event log's rotation: at most 6 x 100 MiB on disk.
pub const DEFAULT_EVENT_LOG_MAX_SIZE: &str = "100MiB";
pub const DEFAULT_EVENT_LOG_MAX_FILES: &str = "5";

/// Settings only the file sets, with their defaults (shown after `--help`'s options).
const SERIES_LIMIT: &str = "10000";
const DEDUP_WINDOW: &str = "100000";
const QUOTA_RETENTION: &str = "24h";
const SERIES_RETIREMENT: &str = "30d";

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

/// One entry of `budgets`: a client API key (plaintext, `sha256:` display hash or alias), an
/// amount and a period.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BudgetFile {
    api_key: String,
    usd: f64,
    period: String,
}

/// The YAML file. Its keys are the flags' names in kebab-case (serde derives them from the same
/// field names as [`Flags`]); scalars are kept as text and validated like flag values.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
struct FileConfig {
    #[serde(skip)]
    path: Option<PathBuf>,
    #[serde(deserialize_with = "scalar")]
    cpa_url: Option<String>,
    #[serde(deserialize_with = "scalar")]
    management_key: Option<String>,
    #[serde(deserialize_with = "scalar")]
    management_key_file: Option<String>,
    #[serde(deserialize_with = "scalar")]
    transport: Option<String>,
    #[serde(deserialize_with = "scalar")]
    api_version: Option<String>,
    #[serde(deserialize_with = "scalar")]
    listen: Option<String>,
    #[serde(deserialize_with = "scalar")]
    db: Option<String>,
    #[serde(deserialize_with = "scalar")]
    batch_size: Option<String>,
    #[serde(deserialize_with = "scalar")]
    poll_interval: Option<String>,
    #[serde(deserialize_with = "scalar")]
    settings_interval: Option<String>,
    #[serde(deserialize_with = "scalar")]
    credentials_interval: Option<String>,
    #[serde(deserialize_with = "scalar")]
    prices_file: Option<String>,
    #[serde(deserialize_with = "scalar")]
    http_timeout: Option<String>,
    #[serde(deserialize_with = "scalar")]
    cpa_proxy: Option<String>,
    #[serde(deserialize_with = "scalar")]
    web_config_file: Option<String>,
    #[serde(deserialize_with = "scalar")]
    max_response_bytes: Option<String>,
    #[serde(deserialize_with = "scalar")]
    new_series_hold: Option<String>,
    #[serde(deserialize_with = "scalar")]
    failover_window: Option<String>,
    #[serde(deserialize_with = "scalar")]
    event_log: Option<String>,
    #[serde(deserialize_with = "scalar")]
    event_log_max_size: Option<String>,
    #[serde(deserialize_with = "scalar")]
    event_log_max_files: Option<String>,
    #[serde(deserialize_with = "scalar")]
    log_level: Option<String>,
    #[serde(deserialize_with = "scalar")]
    log_format: Option<String>,
    // File-only settings.
    #[serde(deserialize_with = "scalar")]
    series_limit: Option<String>,
    #[serde(deserialize_with = "scalar")]
    dedup_window: Option<String>,
    #[serde(deserialize_with = "scalar")]
    quota_retention: Option<String>,
    #[serde(deserialize_with = "scalar")]
    series_retirement: Option<String>,
    // Sections.
    labels: LabelsFile,
    model_aliases: BTreeMap<String, String>,
    budgets: Vec<BudgetFile>,
}

/// A scalar setting as text: YAML may write `batch-size: 500` or `unmask: true` unquoted.
fn scalar<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde_norway::Value;
    match Value::deserialize(d)? {
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        _ => Err(serde::de::Error::custom(NOT_SCALAR)),
    }
}

const NOT_SCALAR: &str = "expected a single value";
/// The file's sections: the keys that hold more than one value.
const SECTIONS: [&str; 3] = ["labels", "model-aliases", "budgets"];

/// serde's message, in the words of the rest of the configuration, naming the setting.
fn explain(e: serde_norway::Error, map: &serde_norway::Mapping) -> String {
    let text = e.to_string();
    if text.starts_with(NOT_SCALAR) {
        // serde does not say which setting: the first non-section key with a nested value.
        let key = map.iter().find_map(|(k, v)| {
            let k = k.as_str()?;
            let nested = !matches!(
                v,
                serde_norway::Value::String(_)
                    | serde_norway::Value::Number(_)
                    | serde_norway::Value::Bool(_)
            );
            (nested && !SECTIONS.contains(&k)).then_some(k)
        });
        if let Some(key) = key {
            return format!("{key}: {NOT_SCALAR}");
        }
    }
    // serde says "field"; the documentation and the other messages say "setting".
    text.replacen("unknown field", "unknown setting", 1)
}

impl FileConfig {
    fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::file(path, e))?;
        let doc: serde_norway::Value =
            serde_norway::from_str(&text).map_err(|e| ConfigError::file(path, e))?;
        let mut file = match doc {
            serde_norway::Value::Null => FileConfig::default(),
            serde_norway::Value::Mapping(map) => serde_norway::from_str(&text)
                .map_err(|e| ConfigError::file(path, explain(e, &map)))?,
            _ => return Err(ConfigError::file(path, "expected a mapping of settings")),
        };
        file.path = Some(path.to_owned());
        Ok(file)
    }
}

/// The command line. Flag defaults are clap's (so `--help` shows them); the file-only settings
/// are listed after the options.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command().after_help(format!(
        "Precedence: flags, then environment variables, then the --config file, then the \
         defaults.\nOnly in the --config file (with their defaults): labels, model-aliases,\n  \
         series-limit: {SERIES_LIMIT}\n  dedup-window: {DEDUP_WINDOW}\n  \
         quota-retention: {QUOTA_RETENTION}\n  series-retirement: {SERIES_RETIREMENT}"
    ))
}

/// One setting's value before validation, and where it came from (for error messages).
struct Raw {
    value: Option<String>,
    origin: String,
}

impl Raw {
    fn fail(&self, what: &'static str, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            what,
            origin: self.origin.clone(),
            problem: problem.into(),
        }
    }

    /// Validate a setting that always has a value (it has a default).
    fn parse<T>(
        &self,
        what: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let v = self
            .value
            .as_deref()
            .ok_or_else(|| self.fail(what, "missing"))?;
        parse(v).map_err(|p| self.fail(what, p))
    }

    /// Validate an optional setting: `None` when nothing sets it.
    fn parse_opt<T>(
        &self,
        what: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match &self.value {
            None => Ok(None),
            Some(v) => parse(v).map(Some).map_err(|p| self.fail(what, p)),
        }
    }
}

/// The one merge step: flag > env > file > default, for every setting alike.
struct Sources<'a> {
    matches: &'a ArgMatches,
    command: clap::Command,
    file: &'a FileConfig,
}

impl Sources<'_> {
    /// `id` is the field name shared by [`Flags`] and [`FileConfig`]; `flag` holds clap's value
    /// (given, from the environment, or clap's default), `file` the file's.
    fn pick(&self, id: &str, flag: &Option<String>, file: &Option<String>) -> Raw {
        // A global flag given after a subcommand lives in the subcommand's matches.
        let source = self.matches.value_source(id).max(
            self.matches
                .subcommand()
                .and_then(|(_, m)| m.value_source(id)),
        );
        match source {
            Some(ValueSource::EnvVariable) => {
                let env = self
                    .command
                    .get_arguments()
                    .find(|a| a.get_id() == id)
                    .and_then(|a| a.get_env())
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default();
                return Raw {
                    value: flag.clone(),
                    origin: format!("from {env}"),
                };
            }
            Some(ValueSource::CommandLine) => {
                return Raw {
                    value: flag.clone(),
                    origin: format!("from --{}", id.replace('_', "-")),
                }
            }
            _ => {}
        }
        match file {
            Some(v) => Raw {
                value: Some(v.clone()),
                origin: self.in_file(id),
            },
            None => Raw {
                value: flag.clone(),
                origin: "default".to_owned(),
            },
        }
    }

    /// A setting only the file sets.
    fn file_only(&self, id: &str, file: &Option<String>, default: &str) -> Raw {
        match file {
            Some(v) => Raw {
                value: Some(v.clone()),
                origin: self.in_file(id),
            },
            None => Raw {
                value: Some(default.to_owned()),
                origin: "default".to_owned(),
            },
        }
    }

    fn in_file(&self, id: &str) -> String {
        let key = id.replace('_', "-");
        match &self.file.path {
            Some(p) => format!("`{key}` in {}", p.display()),
            None => key,
        }
    }
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
        let src = Sources {
            matches,
            command: command(),
            file: &file,
        };
        // The field name is the setting's id, its file key and (in kebab-case) its flag.
        macro_rules! pick {
            ($id:ident) => {
                src.pick(stringify!($id), &flags.$id, &file.$id)
            };
        }
        macro_rules! file_only {
            ($id:ident, $default:expr) => {
                src.file_only(stringify!($id), &file.$id, $default)
            };
        }

        let cpa_url = pick!(cpa_url).parse("CPA URL", parse_url)?;

        let key_file = pick!(management_key_file);
        let management_key =
            match key_file.parse_opt("management key file", |p| read_key_file(Path::new(p)))? {
                Some(key) => Some(key),
                None => pick!(management_key).parse_opt("management key", |k| match k.trim() {
                    "" => Err("is empty".to_owned()),
                    k => Ok(Secret::new(k)),
                })?,
            };

        let api_version =
            pick!(api_version).parse("API version", |v| choice::<ApiVersion>(v, true))?;
        let transport = pick!(transport).parse("transport", |v| choice::<Transport>(v, true))?;
        let listen = pick!(listen).parse("listen address", parse_listen)?;
        let db = pick!(db).parse("state database path", |v| match v.trim() {
            "" => Err("is empty".to_owned()),
            _ => Ok(PathBuf::from(v)),
        })?;
        let batch_size =
            pick!(batch_size).parse("batch size", |v| parse_int(v, 1, 100_000))? as usize;
        let poll_interval = pick!(poll_interval).parse_opt("poll interval", |v| {
            parse_duration(v, Duration::from_millis(100), Duration::from_secs(600))
        })?;
        let settings_interval = pick!(settings_interval).parse("settings interval", |v| {
            parse_duration(v, Duration::from_secs(10), Duration::from_secs(3600))
        })?;
        let credentials_interval =
            pick!(credentials_interval).parse("credentials interval", |v| {
                match humantime::parse_duration(v.trim()) {
                    Ok(d) if d.is_zero() => Ok(None),
                    _ => parse_duration(v, Duration::from_secs(5), Duration::from_secs(3600))
                        .map(Some),
                }
            })?;
        let prices_file = pick!(prices_file).parse_opt("prices file", non_empty_path)?;
        let quota_retention = file_only!(quota_retention, QUOTA_RETENTION)
            .parse("quota retention", |v| {
                parse_duration(v, Duration::from_secs(60), Duration::from_secs(90 * 86_400))
            })?;
        let http_timeout = pick!(http_timeout).parse("HTTP timeout", |v| {
            parse_duration(v, Duration::from_secs(1), Duration::from_secs(300))
        })?;

        let proxy = pick!(cpa_proxy);
        let cpa_proxy = proxy
            .parse_opt("CPA proxy", |v| match v.trim() {
                "" => Ok(None),
                v => parse_proxy(v).map(Some),
            })?
            .flatten();
        // RESP is a raw TCP protocol: it cannot go through an HTTP proxy, and `auto` would probe
        // it directly, bypassing the proxy. With a proxy, CPA is reached over HTTP only.
        let transport = match (transport, &cpa_proxy) {
            (Transport::Resp | Transport::Subscribe, Some(_)) => {
                return Err(proxy.fail(
                    "CPA proxy",
                    "RESP cannot go through an HTTP proxy: use --transport http (or auto)",
                ))
            }
            (Transport::Auto, Some(_)) => Transport::Http,
            (t, _) => t,
        };

        let web_config_file =
            pick!(web_config_file).parse_opt("web config file", non_empty_path)?;
        let log_level = pick!(log_level).parse("log level", |v| {
            v.parse::<tracing::Level>()
                .map_err(|_| format!("`{v}`: expected error, warn, info, debug or trace"))
        })?;
        let log_format =
            pick!(log_format).parse("log format", |v| choice::<LogFormat>(v, false))?;

        let series_per_family = file_only!(series_limit, SERIES_LIMIT)
            .parse("series limit", |v| parse_int(v, 10, 1_000_000))?
            as usize;
        let series_retirement = file_only!(series_retirement, SERIES_RETIREMENT).parse(
            "series retirement",
            |v| match v.trim() {
                "0" | "off" => Ok(None),
                _ => parse_duration(
                    v,
                    Duration::from_secs(60),
                    Duration::from_secs(3650 * 86_400),
                )
                .map(Some)
                .map_err(|p| format!("{p}, or 0/off")),
            },
        )?;
        let max_response_bytes = pick!(max_response_bytes).parse("maximum response size", |v| {
            parse_bytes(v, 64 * 1024, 1 << 30)
        })?;
        let new_series_hold =
            pick!(new_series_hold).parse("new-series hold", |v| match v.trim() {
                "0" | "0s" | "off" => Ok(Duration::ZERO),
                _ => parse_duration(v, Duration::from_secs(1), Duration::from_secs(3600))
                    .map_err(|p| format!("{p}, or 0/off")),
            })?;
        let failover_window = pick!(failover_window).parse("failover window", |v| {
            parse_duration(v, Duration::from_secs(1), Duration::from_secs(3600))
        })?;
        let event_log_max_size = pick!(event_log_max_size)
            .parse("event log rotation size", |v| {
                parse_bytes(v, 1 << 20, 1 << 40)
            })?;
        let event_log_max_files = pick!(event_log_max_files)
            .parse("event log files kept", |v| parse_int(v, 1, 100))?
            as usize;
        let event_log = pick!(event_log).parse("event log", |v| match v.trim() {
            "" => Err("is empty (use off, stdout or a file path)".to_owned()),
            "off" => Ok(None),
            "stdout" | "-" => Ok(Some(EventLogTarget::Stdout)),
            path => Ok(Some(EventLogTarget::File {
                path: PathBuf::from(path),
                max_bytes: event_log_max_size as u64,
                keep: event_log_max_files,
            })),
        })?;
        let dedup_window = file_only!(dedup_window, DEDUP_WINDOW)
            .parse("dedup window", |v| parse_int(v, 0, 10_000_000))?
            as usize;

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
                failover_window,
                open_requests: crate::store::chains::DEFAULT_OPEN_LIMIT,
            },
            budgets,
            event_log,
        })
    }
}

/// A path setting that is set: it must not be blank.
fn non_empty_path(v: &str) -> Result<PathBuf, String> {
    match v.trim() {
        "" => Err("is empty".to_owned()),
        p => Ok(PathBuf::from(p)),
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

/// A size in bytes: a number of bytes, or with a unit, parsed by `parse-size` in its binary
/// system so that `K`, `KB` and `KiB` (and M, G) all mean powers of 1024, as `64M` always has
/// here. Fractions (`1.5MiB`) round to the nearest byte.
fn parse_bytes(v: &str, min: usize, max: usize) -> Result<usize, String> {
    let human = |n: usize| format!("{} MiB", n as f64 / 1048576.0);
    match parse_size::Config::new()
        .with_binary()
        .parse_size(v.trim())
        .ok()
        .and_then(|n| usize::try_from(n).ok())
    {
        Some(n) if (min..=max).contains(&n) => Ok(n),
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
            (
                ["--transport", "XX"],
                "`xx`: expected auto, http, resp or subscribe",
            ),
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
    fn the_event_log_is_off_by_default_and_goes_to_stdout_or_a_rotated_file() {
        assert_eq!(resolve(&[]).unwrap().event_log, None);
        let c = resolve(&["--event-log", "stdout"]).unwrap();
        assert_eq!(c.event_log, Some(EventLogTarget::Stdout));
        let f = file("event-log: /var/log/cpa/events.log\nevent-log-max-size: 10MiB\nevent-log-max-files: 2\n");
        let c = resolve(&["--config", f.path().to_str().unwrap()]).unwrap();
        assert_eq!(
            c.event_log,
            Some(EventLogTarget::File {
                path: PathBuf::from("/var/log/cpa/events.log"),
                max_bytes: 10 << 20,
                keep: 2,
            })
        );
        for (flag, bad, what) in [
            ("--event-log", "", "--event-log"),
            ("--event-log-max-size", "100KiB", "--event-log-max-size"),
            ("--event-log-max-files", "0", "--event-log-max-files"),
        ] {
            let e = resolve(&[&format!("{flag}={bad}")])
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{flag}={bad}: {e}");
        }
    }

    #[test]
    fn failover_window_defaults_to_a_minute_and_is_validated() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.limits.failover_window, Duration::from_secs(60));
        let c = resolve(&["--failover-window", "2m"]).unwrap();
        assert_eq!(c.limits.failover_window, Duration::from_secs(120));
        let f = file("failover-window: 90s\n");
        let c = resolve(&["--config", f.path().to_str().unwrap()]).unwrap();
        assert_eq!(c.limits.failover_window, Duration::from_secs(90));
        for bad in ["500ms", "2h", "soon", "0"] {
            let e = resolve(&[&format!("--failover-window={bad}")])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("failover window") && e.contains("--failover-window"),
                "{bad}: {e}"
            );
        }
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
        // K, KB and KiB alike are powers of 1024, as a bare `64M` always was.
        for (text, want) in [
            ("64M", 64 << 20),
            ("64 MiB", 64 << 20),
            ("64mb", 64 << 20),
            ("1g", 1 << 30),
            ("1.5MiB", 3 << 19),
            ("65536B", 64 << 10),
        ] {
            let c = resolve(&["--max-response-bytes", text]).unwrap();
            assert_eq!(c.max_response_bytes, want, "{text}");
        }
        for bad in ["1KiB", "2GiB", "1TiB", "lots", "-64MiB", "5 parsecs"] {
            let e = resolve(&[&format!("--max-response-bytes={bad}")])
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
