//! The web configuration file (`--web.config.file`), in the format of the Prometheus
//! exporter-toolkit (<https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md>),
//! plus one extension of ours, `bearer_token_file`.
//!
//! Supported: `tls_server_config` (`cert_file`/`cert`, `key_file`/`key`, `client_auth_type`,
//! `client_ca_file`/`client_ca`, `min_version`, `max_version`; `prefer_server_cipher_suites` is
//! accepted and ignored, as Go itself does), `http_server_config` (`headers`; `http2` is accepted,
//! this server speaks HTTP/1.1 only), `basic_auth_users` (bcrypt hashes) and `bearer_token_file`.
//! Keys the toolkit knows but rustls cannot honour the same way (`cipher_suites`,
//! `curve_preferences`, `client_allowed_sans`, `rate_limit`, the unverified client-certificate
//! modes) and unknown keys stop the exporter at start, naming the key: a security setting is
//! never silently dropped.
//!
//! Relative file names are resolved against the directory of the web configuration file, as
//! the toolkit does.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;

/// The web configuration file cannot be used. Names the file and the key at fault; never
/// quotes a secret (a key, a hash, a token) from it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct WebConfigError {
    pub path: PathBuf,
    pub problem: String,
}

/// PEM material: a file (reloaded when it changes) or inline text from the web config.
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    File(PathBuf),
    Inline(String),
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::File(p) => write!(f, "File({})", p.display()),
            // May be a private key.
            Pem::Inline(_) => f.write_str("Inline(<redacted>)"),
        }
    }
}

impl Pem {
    pub fn file(&self) -> Option<&Path> {
        match self {
            Pem::File(p) => Some(p),
            Pem::Inline(_) => None,
        }
    }
}

/// `client_auth_type`, reduced to what rustls verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `NoClientCert` (the default).
    None,
    /// `VerifyClientCertIfGiven`: a certificate is optional, but verified against the CA if sent.
    VerifyIfGiven,
    /// `RequireAndVerifyClientCert`.
    Require,
}

/// TLS protocol versions, as the toolkit spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: Pem,
    pub key: Pem,
    pub client_auth: ClientAuth,
    pub client_ca: Option<Pem>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
}

/// The validated web configuration.
#[derive(Clone)]
pub struct WebConfig {
    pub path: PathBuf,
    pub tls: Option<TlsSettings>,
    /// User name -> bcrypt hash.
    pub basic_auth_users: BTreeMap<String, String>,
    pub bearer_token_file: Option<PathBuf>,
    /// Headers added to every response (`http_server_config.headers`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebConfig")
            .field("path", &self.path)
            .field("tls", &self.tls)
            .field(
                "basic_auth_users",
                &self.basic_auth_users.keys().collect::<Vec<_>>(),
            )
            .field("bearer_token_file", &self.bearer_token_file)
            .field("headers", &self.headers)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tls_server_config: Option<RawTls>,
    http_server_config: Option<RawHttp>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    /// Our extension: a file holding a bearer token accepted instead of basic auth.
    bearer_token_file: Option<PathBuf>,
    rate_limit: Option<serde_norway::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    cert: Option<String>,
    key: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    client_ca: Option<String>,
    client_allowed_sans: Option<serde_norway::Value>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<serde_norway::Value>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<serde_norway::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

/// The response headers the toolkit allows in `http_server_config.headers`.
const ALLOWED_HEADERS: [&str; 5] = [
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
];

impl WebConfig {
    /// Read and validate the file. TLS material and the bearer token are not read here (see
    /// [`super::Protection::load`]), only named.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let err = |problem: String| WebConfigError {
            path: path.to_owned(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        WebConfig::parse(path, &text).map_err(err)
    }

    /// Validate `text`, the content of the file at `path` (relative names resolve against its
    /// directory). The error names the key at fault.
    pub fn parse(path: &Path, text: &str) -> Result<WebConfig, String> {
        let raw: RawFile = if text.trim().is_empty() {
            RawFile::default()
        } else {
            // serde names an unknown key and where it is ("unknown field `x`, expected one
            // of ... at line 3 column 3"); a value error names the key too, never the value.
            serde_norway::from_str::<Option<RawFile>>(text)
                .map_err(|e| e.to_string())?
                .unwrap_or_default()
        };
        let dir = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        let resolve = |p: &Path| {
            if p.is_relative() {
                dir.join(p)
            } else {
                p.to_owned()
            }
        };

        if raw.rate_limit.is_some() {
            return Err(unsupported(
                "rate_limit",
                "this exporter has no rate limiter; it bounds connections and timeouts instead",
            ));
        }
        let tls = match raw.tls_server_config {
            None => None,
            Some(t) => tls_settings(t, &resolve)?,
        };
        let mut basic_auth_users = BTreeMap::new();
        for (user, hash) in raw.basic_auth_users.unwrap_or_default() {
            if user.is_empty() || user.contains(':') {
                return Err(format!(
                    "basic_auth_users: `{user}` is not a valid user name (empty or with a colon)"
                ));
            }
            if hash.trim().parse::<bcrypt::HashParts>().is_err() {
                return Err(format!(
                    "basic_auth_users.{user}: not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
                ));
            }
            basic_auth_users.insert(user, hash.trim().to_owned());
        }
        let bearer_token_file = raw.bearer_token_file.as_deref().map(resolve);
        let mut headers = Vec::new();
        if let Some(http) = raw.http_server_config {
            // `http2` is accepted for compatibility: this server speaks HTTP/1.1 only.
            let _ = http.http2;
            for (name, value) in http.headers.unwrap_or_default() {
                let Some(allowed) = ALLOWED_HEADERS
                    .iter()
                    .find(|h| h.eq_ignore_ascii_case(&name))
                else {
                    return Err(format!(
                        "http_server_config.headers: `{name}` is not allowed (allowed: {})",
                        ALLOWED_HEADERS.join(", ")
                    ));
                };
                let value = value.trim();
                if value.is_empty() {
                    // "Unset if blank."
                    continue;
                }
                let ok = match *allowed {
                    "X-Frame-Options" => {
                        value.eq_ignore_ascii_case("deny")
                            || value.eq_ignore_ascii_case("sameorigin")
                    }
                    "X-Content-Type-Options" => value.eq_ignore_ascii_case("nosniff"),
                    _ => true,
                };
                let header_value = HeaderValue::from_str(value).ok().filter(|_| ok);
                let Some(header_value) = header_value else {
                    return Err(format!(
                        "http_server_config.headers.{allowed}: `{value}` is not a valid value"
                    ));
                };
                headers.push((HeaderName::from_static(lower(allowed)), header_value));
            }
        }
        Ok(WebConfig {
            path: path.to_owned(),
            tls,
            basic_auth_users,
            bearer_token_file,
            headers,
        })
    }

    /// Whether requests need credentials (basic auth or a bearer token).
    pub fn requires_auth(&self) -> bool {
        !self.basic_auth_users.is_empty() || self.bearer_token_file.is_some()
    }
}

fn lower(allowed: &'static str) -> &'static str {
    match allowed {
        "Content-Security-Policy" => "content-security-policy",
        "X-Frame-Options" => "x-frame-options",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "strict-transport-security",
    }
}

fn unsupported(key: &str, why: &str) -> String {
    format!("`{key}` is not supported: {why}; remove it")
}

fn tls_settings(
    t: RawTls,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<TlsSettings>, String> {
    const KEY: &str = "tls_server_config";
    if t.cipher_suites.is_some() {
        return Err(unsupported(
            "tls_server_config.cipher_suites",
            "rustls offers only modern AEAD suites and has no per-suite switch here",
        ));
    }
    if t.curve_preferences.is_some() {
        return Err(unsupported(
            "tls_server_config.curve_preferences",
            "rustls picks among its own safe key-exchange groups",
        ));
    }
    if t.client_allowed_sans.is_some() {
        return Err(unsupported(
            "tls_server_config.client_allowed_sans",
            "use a client CA that issues only to allowed clients",
        ));
    }
    // Go ignores it since 1.18 as well.
    let _ = t.prefer_server_cipher_suites;
    let pem = |file: Option<PathBuf>, inline: Option<String>, name: &str| match (file, inline) {
        (Some(_), Some(_)) => Err(format!(
            "{KEY}: give either `{name}_file` or `{name}`, not both"
        )),
        (Some(f), None) => Ok(Some(Pem::File(resolve(&f)))),
        (None, Some(s)) => Ok(Some(Pem::Inline(s))),
        (None, None) => Ok(None),
    };
    let cert = pem(t.cert_file, t.cert, "cert")?;
    let key = pem(t.key_file, t.key, "key")?;
    let client_ca = pem(t.client_ca_file, t.client_ca, "client_ca")?;
    let client_auth = match t.client_auth_type.as_deref().map(str::trim) {
        None | Some("") | Some("NoClientCert") => ClientAuth::None,
        Some("VerifyClientCertIfGiven") => ClientAuth::VerifyIfGiven,
        Some("RequireAndVerifyClientCert") => ClientAuth::Require,
        Some(other @ ("RequestClientCert" | "RequireAnyClientCert")) => {
            return Err(format!(
                "{KEY}.client_auth_type: `{other}` accepts unverified certificates and is not supported; use RequireAndVerifyClientCert (or VerifyClientCertIfGiven)"
            ))
        }
        Some(other) => {
            return Err(format!(
                "{KEY}.client_auth_type: `{other}`: expected NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
            ))
        }
    };
    let version =
        |v: Option<String>, name: &str, default: TlsVersion| match v.as_deref().map(str::trim) {
            None | Some("") => Ok(default),
            Some("TLS12") => Ok(TlsVersion::Tls12),
            Some("TLS13") => Ok(TlsVersion::Tls13),
            Some(old @ ("TLS10" | "TLS11")) => Err(format!(
                "{KEY}.{name}: `{old}` is not supported (rustls speaks TLS 1.2 and 1.3 only)"
            )),
            Some(other) => Err(format!("{KEY}.{name}: `{other}`: expected TLS12 or TLS13")),
        };
    let min_version = version(t.min_version, "min_version", TlsVersion::Tls12)?;
    let max_version = version(t.max_version, "max_version", TlsVersion::Tls13)?;
    if min_version > max_version {
        return Err(format!("{KEY}: min_version is above max_version"));
    }
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        // An empty section: no TLS, as with the toolkit.
        (None, None) if client_ca.is_none() && client_auth == ClientAuth::None => return Ok(None),
        (None, _) => return Err(format!("{KEY}: `cert_file` (or `cert`) is missing")),
        (_, None) => return Err(format!("{KEY}: `key_file` (or `key`) is missing")),
    };
    match (client_auth, &client_ca) {
        (ClientAuth::None, Some(_)) => {
            return Err(format!(
                "{KEY}: `client_ca_file` is set but client_auth_type is NoClientCert; set client_auth_type: RequireAndVerifyClientCert"
            ))
        }
        (ClientAuth::VerifyIfGiven | ClientAuth::Require, None) => {
            return Err(format!(
                "{KEY}: client_auth_type verifies client certificates, so `client_ca_file` (or `client_ca`) is required"
            ))
        }
        _ => {}
    }
    Ok(Some(TlsSettings {
        cert,
        key,
        client_auth,
        client_ca,
        min_version,
        max_version,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebConfig, String> {
        WebConfig::parse(Path::new("/etc/exporter/web.yml"), text)
    }

    #[test]
    fn the_toolkit_format_is_read_with_relative_paths_resolved() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let c = parse(&format!(
            "tls_server_config:\n  cert_file: tls/cert.pem\n  key_file: /abs/key.pem\n  min_version: TLS13\n\
             http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n    Content-Security-Policy: ''\n\
             basic_auth_users:\n  prometheus: '{hash}'\nbearer_token_file: token\n"
        ))
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert, Pem::File("/etc/exporter/tls/cert.pem".into()));
        assert_eq!(tls.key, Pem::File("/abs/key.pem".into()));
        assert_eq!(tls.min_version, TlsVersion::Tls13);
        assert_eq!(tls.client_auth, ClientAuth::None);
        assert_eq!(c.basic_auth_users["prometheus"], hash);
        assert_eq!(
            c.bearer_token_file.as_deref(),
            Some(Path::new("/etc/exporter/token"))
        );
        assert_eq!(c.headers.len(), 1);
        assert!(parse("").unwrap().tls.is_none());
        assert!(!parse("{}").unwrap().requires_auth());
    }

    #[test]
    fn unknown_and_unsupported_keys_are_named() {
        let e = parse("basic_auth_user:\n  a: b\n").unwrap_err();
        assert!(e.contains("basic_auth_user"), "{e}");
        let e = parse("tls_server_config:\n  certfile: x\n").unwrap_err();
        assert!(e.contains("certfile"), "{e}");
        let e = parse("tls_server_config:\n  cert_file: c\n  key_file: k\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n").unwrap_err();
        assert!(e.contains("cipher_suites"), "{e}");
        let e = parse("rate_limit:\n  interval: 1s\n  burst: 5\n").unwrap_err();
        assert!(e.contains("rate_limit"), "{e}");
        let e = parse("http_server_config:\n  headers:\n    Server: x\n").unwrap_err();
        assert!(e.contains("Server"), "{e}");
        let e = parse("tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS10\n")
            .unwrap_err();
        assert!(e.contains("min_version"), "{e}");
        let e = parse("tls_server_config:\n  cert_file: c\n").unwrap_err();
        assert!(e.contains("key_file"), "{e}");
        let e = parse("tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequireAndVerifyClientCert\n").unwrap_err();
        assert!(e.contains("client_ca_file"), "{e}");
        let e = parse("tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequestClientCert\n").unwrap_err();
        assert!(e.contains("RequestClientCert"), "{e}");
    }

    #[test]
    fn a_bad_hash_is_named_by_user_and_never_quoted() {
        let e = parse("basic_auth_users:\n  alice: plaintext-password\n").unwrap_err();
        assert!(e.contains("basic_auth_users.alice"), "{e}");
        assert!(!e.contains("plaintext-password"), "{e}");
        let inline = parse("tls_server_config:\n  cert: CERT\n  key: SECRETKEY\n").unwrap();
        assert!(!format!("{inline:?}").contains("SECRETKEY"));
    }
}
