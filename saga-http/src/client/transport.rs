//! Connections to the API: the base URL, TLS, and a few idle keep-alive HTTP/1.1 connections
//! reused by concurrent calls (opened again after an error).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::ClientError;

/// Idle connections kept for reuse; more concurrent calls open (and then drop) their own.
const MAX_IDLE: usize = 32;

/// Where the API is.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// `http://host:port` as given, without a trailing `/`, for messages.
    pub(crate) base: String,
    https: bool,
    /// Host without brackets, for connecting and the TLS server name.
    host: String,
    port: u16,
    /// `host:port` for the `Host` header.
    authority: String,
    /// A path prefix (a proxy's), without a trailing `/`.
    prefix: String,
}

impl Endpoint {
    pub(crate) fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |problem: &str| ClientError::BadUrl {
            url: redact(url),
            problem: problem.to_owned(),
        };
        let uri: Uri = url.trim().parse().map_err(|err| bad(&format!("{err}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => return Err(bad(&format!("the scheme `{other}` is not http or https"))),
            None => return Err(bad("it has no scheme")),
        };
        let authority = uri.authority().ok_or_else(|| bad("it has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad(
                "it holds credentials; give the token with --api-token-file instead",
            ));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(bad("it has no host"));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        if uri.query().is_some() {
            return Err(bad("it has a query"));
        }
        Ok(Self {
            base: url.trim().trim_end_matches('/').to_owned(),
            https,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            authority: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    pub(crate) fn is_https(&self) -> bool {
        self.https
    }

    /// `METHOD url` for messages.
    pub(crate) fn describe(&self, method: &Method, path: &str) -> String {
        format!("{method} {}{path}", self.base)
    }
}

/// `url` without its user information (a password, say), for messages.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// The client's TLS settings: system roots, or the roots of a CA file.
pub(crate) fn tls_connector(
    endpoint: &Endpoint,
    ca_file: Option<&Path>,
) -> Result<TlsConnector, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_error = |problem: String| ClientError::CaFile {
                path: path.to_owned(),
                problem,
            };
            let pem = std::fs::read(path).map_err(|err| ca_error(err.to_string()))?;
            for der in CertificateDer::pem_slice_iter(&pem) {
                let der = der.map_err(|err| ca_error(format!("malformed PEM: {err}")))?;
                roots
                    .add(der)
                    .map_err(|err| ca_error(format!("unusable certificate: {err}")))?;
            }
            if roots.is_empty() {
                return Err(ca_error("it holds no PEM certificate".to_owned()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let problem = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_owned(), ToString::to_string);
                return Err(ClientError::NoTrustedCa {
                    url: endpoint.base.clone(),
                    problem,
                });
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| ClientError::BadUrl {
        url: endpoint.base.clone(),
        problem: format!("rustls refused its default protocol versions: {err}"),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A request to send: everything needed to send it again.
pub(crate) struct Call<'a> {
    pub(crate) method: Method,
    /// The route's path and query, e.g. `/sagas/<id>/wait?timeout_ms=100`.
    pub(crate) path: String,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) headers: Vec<(&'static str, &'a str)>,
}

/// An answer: status and whole body.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

/// A new connection closed before the request was written: nothing reached the server.
fn closed_at_once(request: &str) -> ClientError {
    ClientError::Connect {
        request: request.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the server closed the new connection before the request was sent",
        ),
    }
}

/// Opens connections and keeps a few idle ones.
pub(crate) struct Transport {
    pub(crate) endpoint: Endpoint,
    tls: Option<TlsConnector>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Transport {
    pub(crate) fn new(endpoint: Endpoint, tls: Option<TlsConnector>) -> Self {
        Self {
            endpoint,
            tls,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn set_tls(&mut self, tls: TlsConnector) {
        self.tls = Some(tls);
    }

    /// Sends `call` within `timeout` (connection, request and whole answer).
    pub(crate) async fn send(
        &self,
        call: &Call<'_>,
        authorization: Option<&str>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let request = self.endpoint.describe(&call.method, &call.path);
        match tokio::time::timeout(timeout, self.exchange(call, authorization, &request)).await {
            Ok(answer) => answer,
            Err(_) => Err(ClientError::Timeout {
                request,
                after: timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        call: &Call<'_>,
        authorization: Option<&str>,
        request: &str,
    ) -> Result<Answer, ClientError> {
        loop {
            let (mut sender, fresh) = match self.take_idle() {
                Some(sender) => (sender, false),
                None => (self.connect(request).await?, true),
            };
            // An idle connection the server closed meanwhile: try the next one.
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(closed_at_once(request));
                }
                continue;
            }
            let built = self.build(call, authorization, request)?;
            match sender.try_send_request(built).await {
                Ok(response) => {
                    let status = response.status();
                    let body = response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|err| ClientError::Transport {
                            request: request.to_owned(),
                            message: format!("reading the answer failed: {err}"),
                        })?
                        .to_bytes();
                    self.put_idle(sender);
                    return Ok(Answer { status, body });
                }
                Err(mut err) => {
                    // Not written to the connection (it closed first): safe to send again.
                    let unsent = err.take_message().is_some();
                    if unsent && !fresh {
                        continue;
                    }
                    if unsent {
                        return Err(closed_at_once(request));
                    }
                    return Err(ClientError::Transport {
                        request: request.to_owned(),
                        message: err.into_error().to_string(),
                    });
                }
            }
        }
    }

    fn build(
        &self,
        call: &Call<'_>,
        authorization: Option<&str>,
        request: &str,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut builder = Request::builder()
            .method(call.method.clone())
            .uri(format!("{}{}", self.endpoint.prefix, call.path))
            .header(header::HOST, &self.endpoint.authority)
            .header(header::ACCEPT, "application/json");
        if let Some(value) = authorization {
            builder = builder.header(header::AUTHORIZATION, value);
        }
        for (name, value) in &call.headers {
            builder = builder.header(*name, *value);
        }
        let body = match &call.body {
            Some(bytes) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(bytes.clone()))
            }
            None => Full::new(Bytes::new()),
        };
        builder.body(body).map_err(|err| ClientError::BadRequest {
            request: request.to_owned(),
            problem: err.to_string(),
        })
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn connect(&self, request: &str) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let endpoint = &self.endpoint;
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|source| ClientError::Connect {
                request: request.to_owned(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let handshake_failed = |err: hyper::Error| ClientError::Transport {
            request: request.to_owned(),
            message: format!("the HTTP handshake failed: {err}"),
        };
        if !endpoint.https {
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(handshake_failed)?;
            tokio::spawn(connection);
            return Ok(sender);
        }
        let Some(tls) = &self.tls else {
            return Err(ClientError::BadRequest {
                request: request.to_owned(),
                problem: "an https URL without TLS settings".to_owned(),
            });
        };
        let name =
            ServerName::try_from(endpoint.host.clone()).map_err(|err| ClientError::BadUrl {
                url: endpoint.base.clone(),
                problem: format!("the host is not a valid TLS server name: {err}"),
            })?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Tls {
                request: request.to_owned(),
                source,
            })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(handshake_failed)?;
        tokio::spawn(connection);
        Ok(sender)
    }
}
