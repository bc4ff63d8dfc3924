//! TLS for the HTTP endpoints (rustls, ring), with the certificate, key and client CA reloaded
//! when their files change.
//!
//! Each new connection stats the files (a few microseconds); when the modification time, size
//! or inode of any of them changed, the material is read again and used from that connection
//! on. A replacement that does not load (a certificate without its new key yet, a half-written
//! file) keeps the previous material, with one warning, and is tried again when the files change
//! again. Connections already open keep the certificate they were handshaked with.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{version, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::web_config::{ClientAuth, Pem, TlsSettings, TlsVersion};

/// What identifies a version of a file: modification time, size and inode (a rename over the
/// file changes the inode even within one clock tick).
pub(super) type Stamp = Option<(i64, i64, u64, u64)>;

pub(super) fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.len(), m.ino()))
}

struct Current {
    acceptor: TlsAcceptor,
    stamps: Vec<Stamp>,
    /// Stamps of a version that failed to load, so it is tried (and reported) once.
    failed: Option<Vec<Stamp>>,
}

/// The TLS acceptor in force, reloaded when the files change.
pub struct TlsReloader {
    settings: TlsSettings,
    current: Mutex<Current>,
}

impl TlsReloader {
    /// Load the material once; an error here stops the exporter at start.
    pub fn new(settings: TlsSettings) -> Result<TlsReloader, String> {
        let stamps = file_stamps(&settings);
        let config = build(&settings)?;
        Ok(TlsReloader {
            settings,
            current: Mutex::new(Current {
                acceptor: TlsAcceptor::from(Arc::new(config)),
                stamps,
                failed: None,
            }),
        })
    }

    /// The acceptor for a new connection, after reloading changed files.
    pub fn acceptor(&self) -> TlsAcceptor {
        let stamps = file_stamps(&self.settings);
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if stamps != current.stamps && current.failed.as_ref() != Some(&stamps) {
            match build(&self.settings) {
                Ok(config) => {
                    current.acceptor = TlsAcceptor::from(Arc::new(config));
                    current.stamps = stamps;
                    current.failed = None;
                    info!("TLS certificate and key reloaded");
                }
                Err(e) => {
                    warn!("TLS files changed but cannot be loaded, keeping the previous certificate: {e}");
                    current.failed = Some(stamps);
                }
            }
        }
        current.acceptor.clone()
    }
}

fn file_stamps(s: &TlsSettings) -> Vec<Stamp> {
    [Some(&s.cert), Some(&s.key), s.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(Pem::file)
        .map(stamp)
        .collect()
}

fn read(pem: &Pem, what: &str) -> Result<Vec<u8>, String> {
    match pem {
        Pem::File(p) => std::fs::read(p).map_err(|e| {
            format!(
                "tls_server_config.{what}_file: cannot read {}: {e}",
                p.display()
            )
        }),
        Pem::Inline(s) => Ok(s.as_bytes().to_vec()),
    }
}

fn source(pem: &Pem, what: &str) -> String {
    match pem {
        Pem::File(p) => format!("tls_server_config.{what}_file ({})", p.display()),
        Pem::Inline(_) => format!("tls_server_config.{what}"),
    }
}

fn certificates(pem: &Pem, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(pem, what)?;
    // PEM errors are not quoted: they can carry a line of the file.
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("{}: not valid PEM", source(pem, what)))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", source(pem, what)));
    }
    Ok(certs)
}

/// Build a server config from the settings: reads every file.
pub fn build(s: &TlsSettings) -> Result<ServerConfig, String> {
    let provider: Arc<CryptoProvider> = Arc::new(ring::default_provider());
    let chain = certificates(&s.cert, "cert")?;
    let key_bytes = read(&s.key, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| {
        format!(
            "{}: no PKCS#8, PKCS#1 or SEC1 private key in PEM form",
            source(&s.key, "key")
        )
    })?;
    let versions: Vec<&'static SupportedProtocolVersion> = [
        (TlsVersion::Tls12, &version::TLS12),
        (TlsVersion::Tls13, &version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (s.min_version..=s.max_version).contains(v))
    .map(|(_, p)| p)
    .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls_server_config: {e}"))?;
    let builder = match (s.client_auth, &s.client_ca) {
        (ClientAuth::None, _) | (_, None) => builder.with_no_client_auth(),
        (auth, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, "client_ca")? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", source(ca, "client_ca")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if auth == ClientAuth::VerifyIfGiven {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("{}: {e}", source(ca, "client_ca")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{} and {} do not form a usable certificate and key: {e}",
            source(&s.cert, "cert"),
            source(&s.key, "key")
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
