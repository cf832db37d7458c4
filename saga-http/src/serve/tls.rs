//! HTTPS: a certificate chain and private key from PEM files, served with rustls.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The server's TLS certificate and key, ready to accept connections.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: TlsAcceptor,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A file cannot be read.
    #[error("cannot read the TLS {what} file {path}: {source}")]
    Read {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate, or a malformed one.
    #[error(
        "{origin}: no usable PEM certificate ({problem}); give the server's certificate chain, leaf first"
    )]
    Certificate {
        /// The file (or `certificate PEM`).
        origin: String,
        /// What is wrong.
        problem: String,
    },
    /// The key file holds no PEM private key, or a malformed one.
    #[error(
        "{origin}: no usable PEM private key ({problem}); give the key of the certificate (PKCS#8, PKCS#1 or SEC1)"
    )]
    Key {
        /// The file (or `key PEM`).
        origin: String,
        /// What is wrong.
        problem: String,
    },
    /// rustls refused the pair (a key that does not match the certificate, say).
    #[error("the TLS certificate and key cannot be used together: {0}")]
    Rejected(String),
}

impl TlsConfig {
    /// Reads the certificate chain (leaf first) and private key from PEM files.
    ///
    /// # Errors
    /// A file cannot be read, holds no certificate or key, or the pair is refused.
    pub fn from_pem_files(certificate: &Path, key: &Path) -> Result<Self, TlsConfigError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| TlsConfigError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let certificate_pem = read("certificate", certificate)?;
        let key_pem = read("private key", key)?;
        Self::build(
            &certificate_pem,
            &certificate.display().to_string(),
            &key_pem,
            &key.display().to_string(),
        )
    }

    /// As [`from_pem_files`](Self::from_pem_files), from PEM text in memory.
    ///
    /// # Errors
    /// No certificate or key in the text, or the pair is refused.
    pub fn from_pem(certificate: &[u8], key: &[u8]) -> Result<Self, TlsConfigError> {
        Self::build(certificate, "certificate PEM", key, "key PEM")
    }

    fn build(
        certificate: &[u8],
        certificate_origin: &str,
        key: &[u8],
        key_origin: &str,
    ) -> Result<Self, TlsConfigError> {
        let chain = CertificateDer::pem_slice_iter(certificate)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| TlsConfigError::Certificate {
                origin: certificate_origin.to_owned(),
                problem: err.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsConfigError::Certificate {
                origin: certificate_origin.to_owned(),
                problem: "no CERTIFICATE block".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|err| TlsConfigError::Key {
            origin: key_origin.to_owned(),
            problem: err.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsConfigError::Rejected(err.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|err| TlsConfigError::Rejected(err.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub(super) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}
