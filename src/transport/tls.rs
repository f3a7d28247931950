//! TLS with rustls and the `ring` provider: the server configuration built from PEM files,
//! swapped whole on reload, and the client identity read from a verified certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use super::x509;
use crate::config::{CertIdentity, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {detail}")]
    Pem { path: String, detail: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("invalid TLS configuration: {0}")]
    Rustls(String),
}

fn pem_error(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |error| TlsError::Pem {
        path: path.display().to_string(),
        detail: error.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(pem_error(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(path))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(chain)
}

/// Installs `ring` as the process's crypto provider, so nothing that asks for the default
/// (rustls builders without an explicit provider) can find it ambiguous.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the server configuration: reads the PEM files (blocking).
pub fn server_config(config: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let missing = || TlsError::Rustls("tls.cert_file and tls.key_file are required".into());
    let cert_path: &PathBuf = config.cert_file.as_ref().ok_or_else(missing)?;
    let key_path: &PathBuf = config.key_file.as_ref().ok_or_else(missing)?;
    let chain = certificates(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(pem_error(key_path))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rustls_error = |error: rustls::Error| TlsError::Rustls(error.to_string());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error)?;
    let builder = match &config.client_ca_file {
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca_path)? {
                roots.add(cert).map_err(rustls_error)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|error| TlsError::Rustls(error.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let server = builder.with_single_cert(chain, key).map_err(rustls_error)?;
    Ok(Arc::new(server))
}

/// The configuration new handshakes use; reload swaps it, handshakes under way keep theirs.
pub struct TlsContext {
    config: TlsConfig,
    current: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            config: config.clone(),
            current: RwLock::new(TlsAcceptor::from(server_config(config)?)),
        })
    }

    /// Re-reads the PEM files (blocking); on error the configuration in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = TlsAcceptor::from(server_config(&self.config)?);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = acceptor;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The MQTT username a verified client certificate stands for, per `tls.cert_identity`.
    pub fn identity(&self, peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<String> {
        let leaf = peer_certificates?.first()?;
        match self.config.cert_identity {
            CertIdentity::None => None,
            CertIdentity::Cn => x509::common_name(leaf),
            CertIdentity::San => x509::first_alt_name(leaf),
        }
    }
}
