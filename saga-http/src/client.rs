//! A client of this crate's API, for tools that submit work over HTTP with a bearer token
//! (the `saga api` commands, `deal-flow-load --api-url`).
//!
//! ```no_run
//! # async fn run() -> Result<(), saga_http::client::ClientError> {
//! use std::time::Duration;
//! use saga_http::client::{ApiClient, WaitOutcome};
//!
//! let client = ApiClient::new("https://coordinator:8443")?
//!     .ca_file("/etc/saga/api-ca.pem".as_ref())?
//!     .token(&std::env::var("SAGA_API_TOKEN").unwrap_or_default());
//! let started = client
//!     .start("hello", &serde_json::json!("deal team"), Some("greet-1"))
//!     .await?;
//! match client.wait(started.id, Duration::from_secs(30)).await? {
//!     WaitOutcome::Terminal(outcome) => println!("{}", outcome["status"]),
//!     WaitOutcome::Quarantined { reason } => println!("quarantined: {reason}"),
//!     WaitOutcome::StillRunning { status } => println!("still {status}"),
//!     _ => {}
//! }
//! # Ok(())
//! # }
//! ```
//!
//! **Connections.** `http://` or `https://` (rustls with the ring provider). An `https` URL
//! trusts the system's CA store unless [`ApiClient::ca_file`] names the CA to trust instead
//! (a private CA). Calls share a few keep-alive connections; a broken one is replaced.
//!
//! **Retries.** Transient errors ([`ClientError::is_transient`]: no connection, a broken
//! connection, a timeout, 408, 502, 503, 504) are retried with jittered exponential backoff
//! for up to [`ApiClient::retry_for`] (30 s by default) by calls that are safe to repeat:
//! [`status`](ApiClient::status), [`wait`](ApiClient::wait), a
//! [`start`](ApiClient::start) with an idempotency key (the key makes a repeated start find
//! the first one's saga) and a [`signal`](ApiClient::signal) (its key makes a repeated signal
//! a duplicate). A start without a key and a [`cancel`](ApiClient::cancel) are sent
//! again only when the request certainly did not reach the server (no connection, or a
//! connection refused for being over the server's limit).

mod error;
mod transport;

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use saga_core::{ClientRetry, DEFAULT_CLIENT_RETRY_FOR, RetryPolicy, SagaId};
use serde_json::Value;

pub use error::ClientError;
use transport::{Answer, Call, Endpoint, Transport};

/// How long one request may take by default (a wait gets its own length on top).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the saga HTTP API. Cheap to clone; clones share their connections and may be
/// used from many tasks at once.
#[derive(Clone)]
pub struct ApiClient {
    transport: Arc<Transport>,
    /// `Bearer <token>`, never printed.
    authorization: Option<Arc<str>>,
    /// Why an `https` URL has no TLS settings yet (no system CA), reported at the first call.
    tls_problem: Option<Arc<str>>,
    timeout: Duration,
    retry_for: Duration,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("url", &self.transport.endpoint.base)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("retry_for", &self.retry_for)
            .finish_non_exhaustive()
    }
}

/// The answer to a start.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Started {
    /// The saga's id.
    pub id: SagaId,
    /// `false` when the idempotency key had already started this saga.
    pub created: bool,
    /// Its status when the server answered (`running` for a new saga).
    pub status: String,
}

/// The answer to a signal.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SignalReceipt {
    /// The signal's place in the saga's inbox (of the first delivery, for a duplicate).
    pub sequence: u64,
    /// `true` when the key had been sent before with the same payload: nothing changed.
    pub duplicate: bool,
}

/// How a wait ended.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum WaitOutcome {
    /// The saga ended: the outcome (`id`, `status`, `output`, `compensation_reason`,
    /// `failure`).
    Terminal(Value),
    /// The saga was set aside for bad data; it runs again only when an operator acts.
    Quarantined {
        /// Why.
        reason: String,
    },
    /// The wait ended first.
    StillRunning {
        /// Its status then.
        status: String,
    },
}

impl ApiClient {
    /// A client of the API at `base_url` (`http://host:port` or `https://host:port`, with an
    /// optional path prefix), without a token, with the default timeout and retry bound.
    /// An `https` URL trusts the system's CA store (see [`ca_file`](Self::ca_file)).
    ///
    /// # Errors
    /// [`ClientError::BadUrl`] when the URL is not `http(s)://host[:port][/prefix]`.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        let endpoint = Endpoint::parse(base_url)?;
        let (tls, tls_problem) = if endpoint.is_https() {
            match transport::tls_connector(&endpoint, None) {
                Ok(tls) => (Some(tls), None),
                Err(err) => (None, Some(Arc::from(err.to_string()))),
            }
        } else {
            (None, None)
        };
        Ok(Self {
            transport: Arc::new(Transport::new(endpoint, tls)),
            authorization: None,
            tls_problem,
            timeout: DEFAULT_TIMEOUT,
            retry_for: DEFAULT_CLIENT_RETRY_FOR,
        })
    }

    /// Sends `token` as `Authorization: Bearer <token>` (surrounding whitespace, a token
    /// file's newline say, is dropped). The token never appears in `Debug` or errors.
    #[must_use]
    pub fn token(mut self, token: &str) -> Self {
        let token = token.trim();
        self.authorization = (!token.is_empty()).then(|| Arc::from(format!("Bearer {token}")));
        self
    }

    /// Trusts the CA certificates of the PEM file `path` (instead of the system's) for an
    /// `https` URL.
    ///
    /// # Errors
    /// [`ClientError::CaFile`] when the file cannot be read or holds no certificate.
    pub fn ca_file(mut self, path: &Path) -> Result<Self, ClientError> {
        let tls = transport::tls_connector(&self.transport.endpoint, Some(path))?;
        let mut fresh = Transport::new(self.transport.endpoint.clone(), None);
        fresh.set_tls(tls);
        self.transport = Arc::new(fresh);
        self.tls_problem = None;
        Ok(self)
    }

    /// Bounds each request (connection, request, answer) by `timeout`; a wait gets its own
    /// length on top. Default [`DEFAULT_TIMEOUT`].
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Retries transient errors of calls that are safe to repeat for up to `bound` (`0`:
    /// never). Default 30 s.
    #[must_use]
    pub fn retry_for(mut self, bound: Duration) -> Self {
        self.retry_for = bound;
        self
    }

    /// The base URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.transport.endpoint.base
    }

    /// Starts a saga of `saga_type` with `input` (`POST /sagas/{saga_type}`), with an
    /// idempotency key when given (scoped by the server to the token's principal). Retried
    /// on transient errors only with a key (or when nothing reached the server).
    ///
    /// # Errors
    /// [`ClientError::Api`] for the server's refusals (404 unknown type, 409 key reused with
    /// another input, 422 input not the type's, 401/403), transport errors after the retries.
    pub async fn start(
        &self,
        saga_type: &str,
        input: &Value,
        key: Option<&str>,
    ) -> Result<Started, ClientError> {
        let path = format!("/sagas/{}", encode_segment(saga_type));
        let body = serde_json::to_vec(input).map_err(|err| ClientError::BadRequest {
            request: self.describe(&Method::POST, &path),
            problem: format!("the input cannot be encoded as JSON: {err}"),
        })?;
        let mut headers = Vec::new();
        if let Some(key) = key {
            headers.push((crate::IDEMPOTENCY_KEY, key));
        }
        let call = Call {
            method: Method::POST,
            path,
            body: Some(body),
            headers,
        };
        let transient: fn(&ClientError) -> bool = if key.is_some() {
            ClientError::is_transient
        } else {
            ClientError::was_not_sent
        };
        let answer = self
            .retried("start", transient, self.retry_for, || {
                self.send(&call, Duration::ZERO)
            })
            .await?;
        let request = self.describe(&call.method, &call.path);
        let body = expect(&request, &answer, &[StatusCode::CREATED, StatusCode::OK])?;
        let id = saga_id(&request, &answer, &body)?;
        Ok(Started {
            id,
            created: body["created"]
                .as_bool()
                .unwrap_or(answer.status == StatusCode::CREATED),
            status: body["status"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// The saga's status, output, failure and journal summary (`GET /sagas/{id}`), as the
    /// server's JSON object.
    ///
    /// # Errors
    /// [`ClientError::Api`] (404 unknown saga, 401/403), transport errors after the retries.
    pub async fn status(&self, id: SagaId) -> Result<Value, ClientError> {
        let call = Call {
            method: Method::GET,
            path: format!("/sagas/{id}"),
            body: None,
            headers: Vec::new(),
        };
        let answer = self
            .retried("status", ClientError::is_transient, self.retry_for, || {
                self.send(&call, Duration::ZERO)
            })
            .await?;
        expect(
            &self.describe(&call.method, &call.path),
            &answer,
            &[StatusCode::OK],
        )
    }

    /// Waits up to `timeout` for the saga to end (`GET /sagas/{id}/wait`; the server may
    /// shorten a long wait to its maximum). Transient errors are retried, each retry waiting
    /// for what is left, until the wait's end or [`retry_for`](Self::retry_for), whichever
    /// is later.
    ///
    /// # Errors
    /// [`ClientError::Api`] (404 unknown saga, 401/403), transport errors after the retries.
    pub async fn wait(&self, id: SagaId, timeout: Duration) -> Result<WaitOutcome, ClientError> {
        // `None` for a wait too long to represent: then every attempt asks for all of it.
        let ends = tokio::time::Instant::now().checked_add(timeout);
        let path = format!("/sagas/{id}/wait");
        let answer = self
            .retried(
                "wait",
                ClientError::is_transient,
                timeout.max(self.retry_for),
                || {
                    let left = ends.map_or(timeout, |ends| {
                        ends.saturating_duration_since(tokio::time::Instant::now())
                    });
                    let millis = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                    let call = Call {
                        method: Method::GET,
                        path: format!("{path}?timeout_ms={millis}"),
                        body: None,
                        headers: Vec::new(),
                    };
                    async move { self.send(&call, left).await }
                },
            )
            .await?;
        let request = self.describe(&Method::GET, &path);
        let body = expect(&request, &answer, &[StatusCode::OK, StatusCode::ACCEPTED])?;
        let status = body["status"].as_str().unwrap_or_default().to_owned();
        if answer.status == StatusCode::ACCEPTED {
            return Ok(WaitOutcome::StillRunning { status });
        }
        if status == "quarantined" {
            let reason = body["reason"].as_str().unwrap_or_default().to_owned();
            return Ok(WaitOutcome::Quarantined { reason });
        }
        Ok(WaitOutcome::Terminal(body))
    }

    /// Asks the saga to cancel (`POST /sagas/{id}/cancel`): it compensates what it did at
    /// its next step. Sent again only when nothing reached the server.
    ///
    /// # Errors
    /// [`ClientError::Api`] (409 `already_finished`, 404 unknown saga, 401/403), transport
    /// errors.
    pub async fn cancel(&self, id: SagaId, reason: Option<&str>) -> Result<(), ClientError> {
        let body = reason.map_or_else(Vec::new, |reason| {
            serde_json::json!({ "reason": reason })
                .to_string()
                .into_bytes()
        });
        let call = Call {
            method: Method::POST,
            path: format!("/sagas/{id}/cancel"),
            body: (!body.is_empty()).then_some(body),
            headers: Vec::new(),
        };
        let answer = self
            .retried("cancel", ClientError::was_not_sent, self.retry_for, || {
                self.send(&call, Duration::ZERO)
            })
            .await?;
        expect(
            &self.describe(&call.method, &call.path),
            &answer,
            &[StatusCode::ACCEPTED],
        )?;
        Ok(())
    }

    /// Sends the signal `name` with `payload` to saga `id` (`POST /sagas/{id}/signals/{name}`)
    /// under `key`, for a workflow waiting in `wait_for_signal(name)` (now or later). The key
    /// makes a resent signal a duplicate, so transient errors are retried: a retry after a
    /// lost answer reports [`SignalReceipt::duplicate`] rather than delivering twice.
    ///
    /// # Errors
    /// [`ClientError::Api`] for the server's refusals (404 unknown saga, 409 `saga_finished`
    /// or `signal_conflict`, 422 `invalid_signal`, 400 a malformed name or key, 413
    /// `signal_inbox_full`, 401/403), [`ClientError::BadRequest`] for a payload that does not
    /// encode, transport errors after the retries.
    pub async fn signal<T: serde::Serialize + ?Sized>(
        &self,
        id: SagaId,
        name: &str,
        payload: &T,
        key: &str,
    ) -> Result<SignalReceipt, ClientError> {
        let path = format!("/sagas/{id}/signals/{}", encode_segment(name));
        let body = serde_json::to_vec(payload).map_err(|err| ClientError::BadRequest {
            request: self.describe(&Method::POST, &path),
            problem: format!("the payload of signal `{name}` cannot be encoded as JSON: {err}"),
        })?;
        let call = Call {
            method: Method::POST,
            path,
            body: Some(body),
            headers: vec![(crate::IDEMPOTENCY_KEY, key)],
        };
        let answer = self
            .retried("signal", ClientError::is_transient, self.retry_for, || {
                self.send(&call, Duration::ZERO)
            })
            .await?;
        let request = self.describe(&call.method, &call.path);
        let body = expect(&request, &answer, &[StatusCode::ACCEPTED, StatusCode::OK])?;
        let sequence =
            body["sequence"]
                .as_u64()
                .ok_or_else(|| ClientError::UnexpectedResponse {
                    request: request.clone(),
                    status: answer.status.as_u16(),
                    problem: format!("no signal sequence number in {body}"),
                })?;
        Ok(SignalReceipt {
            sequence,
            duplicate: body["duplicate"]
                .as_bool()
                .unwrap_or(answer.status == StatusCode::OK),
        })
    }

    /// Checks that the server answers (`GET /healthz`, no token needed). Not retried: a
    /// probe reports what it sees.
    ///
    /// # Errors
    /// Any transport error, or an answer other than 200.
    pub async fn healthz(&self) -> Result<(), ClientError> {
        let call = Call {
            method: Method::GET,
            path: "/healthz".to_owned(),
            body: None,
            headers: Vec::new(),
        };
        let answer = self.send(&call, Duration::ZERO).await?;
        if answer.status == StatusCode::OK {
            return Ok(());
        }
        Err(api_error(self.describe(&call.method, &call.path), &answer))
    }

    fn describe(&self, method: &Method, path: &str) -> String {
        self.transport.endpoint.describe(method, path)
    }

    /// One attempt, within the timeout plus `extra`; an error status is an error.
    async fn send(&self, call: &Call<'_>, extra: Duration) -> Result<Answer, ClientError> {
        if let Some(problem) = &self.tls_problem {
            return Err(ClientError::NoTrustedCa {
                url: self.url().to_owned(),
                problem: problem.to_string(),
            });
        }
        let answer = self
            .transport
            .send(
                call,
                self.authorization.as_deref(),
                self.timeout.saturating_add(extra),
            )
            .await?;
        if answer.status.is_client_error() || answer.status.is_server_error() {
            return Err(api_error(self.describe(&call.method, &call.path), &answer));
        }
        Ok(answer)
    }

    async fn retried<Fut>(
        &self,
        operation: &str,
        transient: fn(&ClientError) -> bool,
        bound: Duration,
        op: impl FnMut() -> Fut,
    ) -> Result<Answer, ClientError>
    where
        Fut: Future<Output = Result<Answer, ClientError>>,
    {
        let policy = if bound.is_zero() {
            RetryPolicy::no_retry()
        } else {
            RetryPolicy::client_default().with_max_elapsed(bound)
        };
        ClientRetry::new(policy).run(operation, transient, op).await
    }
}

/// The body of an answer with one of the `expected` statuses, as JSON.
fn expect(request: &str, answer: &Answer, expected: &[StatusCode]) -> Result<Value, ClientError> {
    if !expected.contains(&answer.status) {
        return Err(ClientError::UnexpectedResponse {
            request: request.to_owned(),
            status: answer.status.as_u16(),
            problem: format!("expected {expected:?}"),
        });
    }
    serde_json::from_slice(&answer.body).map_err(|err| ClientError::UnexpectedResponse {
        request: request.to_owned(),
        status: answer.status.as_u16(),
        problem: format!("not JSON: {err}"),
    })
}

fn saga_id(request: &str, answer: &Answer, body: &Value) -> Result<SagaId, ClientError> {
    body["id"]
        .as_str()
        .and_then(|id| id.parse::<SagaId>().ok())
        .ok_or_else(|| ClientError::UnexpectedResponse {
            request: request.to_owned(),
            status: answer.status.as_u16(),
            problem: format!("no saga id in {body}"),
        })
}

/// The server's JSON error (`{"error","code",...}`), or the start of a body that is not one.
fn api_error(request: String, answer: &Answer) -> ClientError {
    let status = answer.status.as_u16();
    match serde_json::from_slice::<Value>(&answer.body) {
        Ok(body) if body["code"].is_string() => ClientError::Api {
            request,
            status,
            code: body["code"].as_str().unwrap_or_default().to_owned(),
            message: body["error"].as_str().unwrap_or_default().to_owned(),
            body,
        },
        _ => {
            let text = String::from_utf8_lossy(&answer.body);
            let mut message: String = text.chars().take(200).collect();
            if message.trim().is_empty() {
                message = answer
                    .status
                    .canonical_reason()
                    .unwrap_or("no body")
                    .to_owned();
            }
            ClientError::Api {
                request,
                status,
                code: format!("http_{status}"),
                message,
                body: Value::Null,
            }
        }
    }
}

/// Percent-encodes a path segment (a saga type name is usually plain already).
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
