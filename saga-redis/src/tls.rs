//! TLS material for `rediss://` connections: the CA to trust and the client certificate for
//! mutual TLS, from PEM bytes or PEM files, checked before any connection is made so that an
//! unreadable file or a bad PEM is reported by name instead of as a failed handshake.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ConnectError;

/// Where one PEM document comes from.
#[derive(Clone)]
pub(crate) enum Pem {
    /// Given as bytes to a builder method.
    Bytes(Vec<u8>),
    /// Read from this file at connect time.
    File(PathBuf),
}

impl Pem {
    /// Where it comes from, for messages: the file's path, or the builder method.
    fn origin(&self, method: &str) -> String {
        match self {
            Pem::Bytes(_) => format!("(PEM given to RedisStoreBuilder::{method})"),
            Pem::File(path) => path.display().to_string(),
        }
    }

    fn read(&self, what: &str, method: &str) -> Result<Vec<u8>, ConnectError> {
        match self {
            Pem::Bytes(bytes) => Ok(bytes.clone()),
            Pem::File(path) => std::fs::read(path).map_err(|err| ConnectError::Tls {
                what: what.to_owned(),
                origin: self.origin(method),
                problem: format!("cannot read the file: {err}"),
            }),
        }
    }
}

/// The TLS settings of a store: none of them means the system's roots and no client
/// certificate (plain `rediss://`).
#[derive(Clone, Default)]
pub(crate) struct TlsSettings {
    /// The CA certificates to trust instead of the system's roots.
    pub(crate) root: Option<Pem>,
    /// The client certificate chain and its private key, for servers that ask for one.
    pub(crate) client: Option<(Pem, Pem)>,
}

impl fmt::Debug for TlsSettings {
    // Paths are shown, PEM contents never (the key is a secret, and certificates are noise).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |pem: &Pem| match pem {
            Pem::Bytes(_) => "<PEM bytes>".to_owned(),
            Pem::File(path) => path.display().to_string(),
        };
        f.debug_struct("TlsSettings")
            .field("root", &self.root.as_ref().map(show))
            .field(
                "client",
                &self
                    .client
                    .as_ref()
                    .map(|(cert, key)| (show(cert), show(key))),
            )
            .finish()
    }
}

impl TlsSettings {
    /// `true` when anything is configured.
    pub(crate) fn is_set(&self) -> bool {
        self.root.is_some() || self.client.is_some()
    }

    /// Reads and checks the material: the CA file holds at least one certificate, the client
    /// certificate file at least one, the key file one private key that belongs to that
    /// certificate. `None` when nothing is configured.
    pub(crate) fn certificates(&self) -> Result<Option<redis::TlsCertificates>, ConnectError> {
        if !self.is_set() {
            return Ok(None);
        }
        let root_cert = match &self.root {
            Some(pem) => {
                let bytes = pem.read("CA certificate", "tls_root_certificate")?;
                certificates(
                    &bytes,
                    "CA certificate",
                    &pem.origin("tls_root_certificate"),
                )?;
                Some(bytes)
            }
            None => None,
        };
        let client_tls = match &self.client {
            Some((cert, key)) => {
                let cert_bytes = cert.read("client certificate", "tls_client_certificate")?;
                let key_bytes = key.read("client key", "tls_client_certificate")?;
                let cert_origin = cert.origin("tls_client_certificate");
                let key_origin = key.origin("tls_client_certificate");
                let chain = certificates(&cert_bytes, "client certificate", &cert_origin)?;
                let private_key =
                    PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|err| ConnectError::Tls {
                        what: "client key".to_owned(),
                        origin: key_origin.clone(),
                        problem: format!(
                            "no usable private key ({err}); give the PEM private key (PKCS#8, PKCS#1 or SEC1) of the client certificate"
                        ),
                    })?;
                check_key_matches(chain, private_key, &cert_origin, &key_origin)?;
                Some(redis::ClientTlsConfig {
                    client_cert: cert_bytes,
                    client_key: key_bytes,
                })
            }
            None => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

/// The certificates in `bytes`; at least one, all well-formed.
fn certificates(
    bytes: &[u8],
    what: &str,
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, ConnectError> {
    let bad = |problem: String| ConnectError::Tls {
        what: what.to_owned(),
        origin: origin.to_owned(),
        problem,
    };
    let chain = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad(format!("not a PEM certificate: {err}")))?;
    if chain.is_empty() {
        return Err(bad(
            "holds no certificate; give a PEM file with `-----BEGIN CERTIFICATE-----` blocks"
                .to_owned(),
        ));
    }
    Ok(chain)
}

/// Builds a throwaway rustls client configuration with the pair, so that a key that does not
/// belong to the certificate is reported here, naming both files, rather than as a failed
/// handshake.
fn check_key_matches(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_origin: &str,
    key_origin: &str,
) -> Result<(), ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|builder| {
            builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(chain, key)
        })
        .map_err(|err| err.to_string())
        .and_then(|built| built.map(drop).map_err(|err| err.to_string()))
        .map_err(|problem| ConnectError::Tls {
            what: "client certificate and key".to_owned(),
            origin: format!("{cert_origin} and {key_origin}"),
            problem: format!(
                "do not make a usable pair ({problem}); give the key of that certificate"
            ),
        })
}
