//! What can go wrong calling the API: the request never got an answer (transport), or the
//! server answered with a JSON error.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// A call to the saga HTTP API failed.
///
/// Every message names the request (method and URL) and says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The base URL cannot be used.
    #[error(
        "`{url}` is not a usable saga API URL: {problem}; give `http://host:port` or `https://host:port`"
    )]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The CA file cannot be read or holds no certificate.
    #[error(
        "cannot use the CA file {path}: {problem}; give a PEM file with the CA certificate that signed the API's certificate"
    )]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// An `https` URL without a CA file, and the system trust store is empty or unreadable.
    #[error(
        "no trusted CA for {url}: the system trust store holds no certificate ({problem}); give the API's CA with --api-ca-file"
    )]
    NoTrustedCa {
        /// The base URL.
        url: String,
        /// What the trust store said.
        problem: String,
    },
    /// A request could not be built (a saga type or key that cannot go in a request).
    #[error("cannot send {request}: {problem}")]
    BadRequest {
        /// Method and URL.
        request: String,
        /// What is wrong.
        problem: String,
    },
    /// No connection could be opened: nothing reached the server.
    #[error(
        "cannot connect to the saga API for {request}: {source}; check that the coordinator serves the API at this address"
    )]
    Connect {
        /// Method and URL.
        request: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed: nothing reached the server.
    #[error(
        "TLS handshake with the saga API failed for {request}: {source}; check --api-ca-file and that the URL's host is in the certificate"
    )]
    Tls {
        /// Method and URL.
        request: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed while the request was sent or the answer read: the server may
    /// have acted on it.
    #[error(
        "the connection to the saga API broke during {request}: {message}; the request may or may not have been applied"
    )]
    Transport {
        /// Method and URL.
        request: String,
        /// Why.
        message: String,
    },
    /// No answer within the client's timeout: the server may have acted on the request.
    #[error(
        "no answer from the saga API within {after:?} for {request}; the request may or may not have been applied (raise the timeout or check the coordinator)"
    )]
    Timeout {
        /// Method and URL.
        request: String,
        /// The timeout.
        after: Duration,
    },
    /// The server answered with an error.
    #[error("{request} answered {status} ({code}): {message}{hint}", hint = api_hint(*.status, .body))]
    Api {
        /// Method and URL.
        request: String,
        /// The HTTP status.
        status: u16,
        /// The machine-readable `code` of the body (`http_<status>` when the body is not the
        /// API's JSON error, from a proxy say).
        code: String,
        /// The body's `error` message (or the start of the body).
        message: String,
        /// The whole JSON body (`Null` when it was not JSON).
        body: Value,
    },
    /// The server answered something this client does not understand.
    #[error("{request} answered {status} with a body this client cannot read: {problem}")]
    UnexpectedResponse {
        /// Method and URL.
        request: String,
        /// The HTTP status.
        status: u16,
        /// What is wrong.
        problem: String,
    },
}

/// What to do about a 401 or 403.
fn api_hint(status: u16, body: &Value) -> String {
    match status {
        401 => "; give a token with --api-token-file (or SAGA_API_TOKEN)".to_owned(),
        403 => {
            let scope = body["required_scope"].as_str().unwrap_or("needed");
            format!(
                "; use a token whose principal has the `{scope}` scope (saga token new NAME --scopes {scope})"
            )
        }
        _ => String::new(),
    }
}

impl ClientError {
    /// `true` when trying the same call again may succeed: a connection, TLS or transport
    /// failure, a timeout, 408, 502, 503 (store unavailable, too many connections) or 504.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Transport { .. } | Self::Timeout { .. } => true,
            // A certificate the client refuses stays refused; a handshake cut short is a blip.
            Self::Tls { source, .. } => !is_rustls_refusal(source),
            Self::Api { status, code, .. } => {
                matches!(status, 408 | 502 | 503 | 504) || code == "too_many_connections"
            }
            _ => false,
        }
    }

    /// `true` when the request certainly did not reach the server's handlers (no
    /// connection, a failed handshake, or a connection refused for being over the limit), so
    /// sending it again cannot apply it twice.
    #[must_use]
    pub fn was_not_sent(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Tls { source, .. } => !is_rustls_refusal(source),
            Self::Api { code, .. } => code == "too_many_connections",
            _ => false,
        }
    }

    /// The HTTP status of an [`Api`](Self::Api) error.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The `code` of an [`Api`](Self::Api) error, e.g. `forbidden`.
    #[must_use]
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Whether a handshake error is rustls refusing the peer (a certificate it does not trust).
fn is_rustls_refusal(err: &std::io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}
