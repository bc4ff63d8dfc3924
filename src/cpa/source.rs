//! Transport selection: pop CPA's queue over HTTP, over RESP, or (`auto`) over RESP when CPA's
//! API port speaks it.
//!
//! `auto` decides once, on the first poll that reaches CPA, and keeps the choice for the life of
//! the process:
//! - `+OK` to AUTH: RESP (one AUTH per connection, pops cost CPA no bcrypt check);
//! - the port answers like HTTP, closes without a word, or does not know AUTH (a CPA without
//!   RESP, such as v7.1.17): HTTP, with one info line saying why, and the same poll goes on
//!   over HTTP at once (none of these answers costs a failed login);
//! - AUTH refused: RESP is kept and HTTP is **not** tried, which would be a second failed login
//!   toward CPA's ban; the drain loop's ban-safe backoff applies as for an HTTP 401;
//! - CPA unreachable or timing out: nothing is decided, the loop backs off as usual and the next
//!   poll probes again (an exporter that starts before CPA still ends up on RESP).

use std::future::Future;
use std::time::Duration;

use tracing::{info, warn};

use super::resp::{RespClient, RespError, RespOptions, SetupError};
use super::{ClientOptions, HttpClient, PopError, Popped};
use crate::cpa::split::Sink;
use crate::cpa::{ApiVersion, Transport};
use crate::secret::Secret;

/// Anything that pops the usage queue (HTTP, RESP, scripted sources in tests).
pub trait Source {
    /// Pop up to `count` elements, handing each to `sink` as it arrives. Elements handed over
    /// before an error are popped records all the same.
    fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> impl Future<Output = Result<Popped, PopError>> + Send;

    /// The idle wait this source wants instead of `DrainOptions::poll_interval`, when it is
    /// only known at run time (the `auto` transport picks RESP or HTTP on its first poll).
    fn idle_interval(&self) -> Option<Duration> {
        None
    }
}

impl Source for HttpClient {
    fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> impl Future<Output = Result<Popped, PopError>> + Send {
        HttpClient::pop(self, count, sink)
    }
}

pub struct SourceOptions {
    pub base_url: String,
    pub key: Secret,
    pub transport: Transport,
    pub api_version: ApiVersion,
    pub timeout: Duration,
    pub max_body_bytes: usize,
    /// Idle wait between polls over HTTP and over RESP (see `Config::idle_interval`).
    pub http_idle: Duration,
    pub resp_idle: Duration,
    /// Proxy for HTTP requests to CPA (`--cpa-proxy`); the configuration forbids RESP with one.
    pub proxy: Option<Secret>,
}

/// The CPA client cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot build the HTTP client for CPA: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Resp(#[from] SetupError),
}

enum Mode {
    Http(HttpClient),
    Resp(RespClient),
    Auto {
        resp: RespClient,
        http: HttpClient,
        chosen: Option<Transport>,
    },
}

/// Pops the usage queue over the configured (or, for `auto`, detected) transport.
pub struct AnySource {
    mode: Mode,
    http_idle: Duration,
    resp_idle: Duration,
}

impl AnySource {
    pub fn new(opts: SourceOptions) -> Result<AnySource, BuildError> {
        let http = || {
            HttpClient::new(ClientOptions {
                base_url: opts.base_url.clone(),
                key: opts.key.clone(),
                api_version: opts.api_version,
                timeout: opts.timeout,
                max_body_bytes: opts.max_body_bytes,
                proxy: opts.proxy.clone(),
            })
        };
        let resp = || {
            RespClient::new(RespOptions {
                base_url: opts.base_url.clone(),
                key: opts.key.clone(),
                timeout: opts.timeout,
                max_reply_bytes: opts.max_body_bytes,
            })
        };
        let mode = match opts.transport {
            Transport::Http => Mode::Http(http()?),
            Transport::Resp => Mode::Resp(resp()?),
            Transport::Auto => Mode::Auto {
                resp: resp()?,
                http: http()?,
                chosen: None,
            },
        };
        Ok(AnySource {
            mode,
            http_idle: opts.http_idle,
            resp_idle: opts.resp_idle,
        })
    }

    /// The transport in use: `Auto` until `auto` has decided.
    pub fn transport(&self) -> Transport {
        match &self.mode {
            Mode::Http(_) => Transport::Http,
            Mode::Resp(_) => Transport::Resp,
            Mode::Auto { chosen, .. } => chosen.unwrap_or(Transport::Auto),
        }
    }

    /// Idle wait for the transport in use; HTTP's (the cheaper for CPA) while undecided.
    pub fn idle_interval(&self) -> Duration {
        match self.transport() {
            Transport::Resp => self.resp_idle,
            Transport::Http | Transport::Auto => self.http_idle,
        }
    }

    pub async fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> Result<Popped, PopError> {
        let (resp_idle, http_idle) = (self.resp_idle, self.http_idle);
        match &mut self.mode {
            Mode::Http(http) => http.pop(count, sink).await,
            Mode::Resp(resp) => resp.pop(count, sink).await,
            Mode::Auto {
                http,
                chosen: Some(Transport::Http),
                ..
            } => http.pop(count, sink).await,
            Mode::Auto {
                resp,
                chosen: Some(_),
                ..
            } => resp.pop(count, sink).await,
            Mode::Auto { resp, http, chosen } => {
                let probe = resp.try_pop(count, sink).await;
                match decide(&probe) {
                    Some(Transport::Http) => {
                        let reason = probe.err().map(|e| e.to_string()).unwrap_or_default();
                        info!(
                            transport = "http",
                            poll_interval = %humantime::format_duration(http_idle),
                            reason,
                            "CPA does not speak RESP on its API port: using HTTP for the life of the process"
                        );
                        *chosen = Some(Transport::Http);
                        return http.pop(count, sink).await;
                    }
                    Some(transport) => {
                        if probe.is_ok() {
                            info!(
                                transport = "resp",
                                poll_interval = %humantime::format_duration(resp_idle),
                                "CPA speaks RESP: popping the queue over one persistent connection (one AUTH per connection)"
                            );
                        } else {
                            warn!(
                                transport = "resp",
                                "CPA refused AUTH over RESP; staying on RESP and not trying HTTP, which would be a second failed login"
                            );
                        }
                        *chosen = Some(transport);
                    }
                    None => {}
                }
                probe.map_err(PopError::from)
            }
        }
    }
}

/// What a first RESP attempt says about the transport; `None`: nothing yet (CPA unreachable).
fn decide(probe: &Result<Popped, RespError>) -> Option<Transport> {
    match probe {
        Ok(_) => Some(Transport::Resp),
        // No RESP on this port; none of these answers cost a failed login.
        Err(
            RespError::NotResp | RespError::Unsupported | RespError::Closed { during_auth: true },
        ) => Some(Transport::Http),
        // The port speaks RESP: CPA refused the key, runs in home mode, or refused the pop.
        Err(RespError::Auth(_) | RespError::HomeMode | RespError::Refused(_)) => {
            Some(Transport::Resp)
        }
        Err(
            RespError::Io(_)
            | RespError::Timeout
            | RespError::Closed { during_auth: false }
            | RespError::Protocol(_),
        ) => None,
    }
}

impl Source for AnySource {
    fn pop<K: Sink + Send>(
        &mut self,
        count: usize,
        sink: &mut K,
    ) -> impl std::future::Future<Output = Result<Popped, PopError>> + Send {
        AnySource::pop(self, count, sink)
    }

    fn idle_interval(&self) -> Option<Duration> {
        Some(AnySource::idle_interval(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpa::resp::ProtocolError;
    use crate::cpa::{AuthCause, Via};

    fn ok() -> Result<Popped, RespError> {
        Ok(Popped {
            bytes: 0,
            via: Via::Resp,
            cpa_version: None,
            cpa_commit: None,
        })
    }

    #[test]
    fn auto_decides_once_and_never_retries_a_refused_key_over_http() {
        let d = |r: Result<Popped, RespError>| decide(&r);
        assert_eq!(d(ok()), Some(Transport::Resp));
        assert_eq!(d(Err(RespError::NotResp)), Some(Transport::Http));
        assert_eq!(d(Err(RespError::Unsupported)), Some(Transport::Http));
        assert_eq!(
            d(Err(RespError::Closed { during_auth: true })),
            Some(Transport::Http)
        );
        assert_eq!(
            d(Err(RespError::Auth(AuthCause::WrongKey))),
            Some(Transport::Resp)
        );
        assert_eq!(d(Err(RespError::Io("refused".into()))), None);
        assert_eq!(d(Err(RespError::Timeout)), None);
        assert_eq!(d(Err(RespError::Protocol(ProtocolError::BadLineEnd))), None);
    }
}
