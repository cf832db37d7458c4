//! `saga_http::client::ApiClient` against the real server over TCP: a start/status/wait/
//! cancel round trip with a token, 401 and 403 as `ClientError::Api` with the server's code,
//! HTTPS with a private CA, and a keyed start that rides out a server that is not there yet
//! (or loses its first answer) and still creates one saga.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use saga_core::{Coordinator, Engine, MemoryStore, Saga, SagaContext, SagaError};
use saga_http::client::{ApiClient, ClientError, WaitOutcome};
use saga_http::{
    ApiTokens, Auth, GeneratedToken, HttpApi, Principal, Scope, ServeConfig, TlsConfig,
};
use serde_json::json;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

struct Echo;

impl Saga for Echo {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "echo";
    async fn run(&self, _saga: &mut SagaContext, text: String) -> Result<String, SagaError> {
        Ok(text)
    }
}

/// Runs until the test opens its gate: a saga that is certainly still running.
struct Hold(Arc<Semaphore>);

impl Saga for Hold {
    type Input = u32;
    type Output = u32;
    const NAME: &'static str = "hold";
    async fn run(&self, _saga: &mut SagaContext, n: u32) -> Result<u32, SagaError> {
        let _permit = self.0.acquire().await;
        Ok(n)
    }
}

/// Tokens: one with every scope, one with `read` only.
struct Tokens {
    config: ApiTokens,
    all: String,
    read: String,
}

fn tokens() -> Tokens {
    let mut lines = Vec::new();
    let mut issue = |name: &str, scopes: BTreeSet<Scope>| {
        let generated = GeneratedToken::new(&Principal::new(name, scopes).unwrap()).unwrap();
        lines.push(generated.config_line);
        generated.token
    };
    let all = issue("loader", Scope::ALL.into_iter().collect());
    let read = issue("reader", BTreeSet::from([Scope::Read]));
    Tokens {
        config: ApiTokens::parse(&lines.join("\n")).unwrap(),
        all,
        read,
    }
}

/// A coordinator and its API on `listener`, stopped by `stop`.
struct Server {
    engine: Engine,
    gate: Arc<Semaphore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    async fn start(listener: TcpListener, tokens: &Tokens, serve: ServeConfig) -> Self {
        let gate = Arc::new(Semaphore::new(0));
        let engine = Engine::builder(MemoryStore::new())
            .register(Echo)
            .register(Hold(Arc::clone(&gate)))
            .build()
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (stop_workers, workers_stopped) = tokio::sync::oneshot::channel::<()>();
        let api = HttpApi::new(engine.clone(), Auth::tokens(tokens.config.clone()));
        let server = tokio::spawn(async move {
            api.serve(listener, serve, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
            let _ = stop_workers.send(());
        });
        let coordinator = Coordinator::new(engine.clone()).poll_interval(Duration::from_millis(20));
        let workers = tokio::spawn(async move {
            coordinator
                .run(async {
                    let _ = workers_stopped.await;
                })
                .await;
        });
        Self {
            engine,
            gate,
            stop: Some(stop),
            tasks: vec![server, workers],
        }
    }

    async fn sagas(&self) -> u64 {
        self.engine
            .store()
            .count_by_status()
            .await
            .unwrap()
            .values()
            .sum()
    }

    async fn stop(mut self) {
        // Let held sagas end so the coordinator's shutdown does not wait on them.
        self.gate.add_permits(1000);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            task.await.unwrap();
        }
    }
}

async fn local() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[tokio::test]
async fn start_status_wait_and_cancel_round_trip() {
    let tokens = tokens();
    let (listener, addr) = local().await;
    let server = Server::start(listener, &tokens, ServeConfig::default()).await;
    let client = ApiClient::new(&format!("http://{addr}"))
        .unwrap()
        .token(&format!("{}\n", tokens.all));
    client.healthz().await.unwrap();
    assert!(!format!("{client:?}").contains(&tokens.all), "{client:?}");

    let started = client
        .start("echo", &json!("hello"), Some("order-1"))
        .await
        .unwrap();
    assert!(started.created);
    let again = client
        .start("echo", &json!("hello"), Some("order-1"))
        .await
        .unwrap();
    assert_eq!((again.id, again.created), (started.id, false));
    match client
        .wait(started.id, Duration::from_secs(30))
        .await
        .unwrap()
    {
        WaitOutcome::Terminal(outcome) => {
            assert_eq!(outcome["status"], "completed", "{outcome}");
            assert_eq!(outcome["output"], "hello", "{outcome}");
        }
        other => panic!("the echo saga did not end: {other:?}"),
    }
    let status = client.status(started.id).await.unwrap();
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["input"], "hello", "{status}");
    // Cancelling a finished saga is the server's 409, with its code.
    let err = client
        .cancel(started.id, Some("too late"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("already_finished"), "{err}");
    assert_eq!(err.status(), Some(409));

    // A held saga: still running when a short wait ends, cancellable, then it ends.
    let held = client.start("hold", &json!(7), None).await.unwrap();
    assert_eq!(
        client
            .wait(held.id, Duration::from_millis(50))
            .await
            .unwrap(),
        WaitOutcome::StillRunning {
            status: "running".to_owned()
        }
    );
    client
        .cancel(held.id, Some("changed my mind"))
        .await
        .unwrap();
    server.gate.add_permits(1);
    match client.wait(held.id, Duration::from_secs(30)).await.unwrap() {
        WaitOutcome::Terminal(outcome) => {
            assert_eq!(outcome["id"], held.id.to_string(), "{outcome}");
        }
        other => panic!("the held saga did not end: {other:?}"),
    }
    let status = client.status(held.id).await.unwrap();
    assert_eq!(status["cancel_requested"], true, "{status}");

    // Errors of the routes come back with the server's code.
    let err = client.start("nope", &json!(1), None).await.unwrap_err();
    assert_eq!(err.code(), Some("unknown_saga_type"), "{err}");
    let err = client
        .start("hold", &json!("not a number"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_input"), "{err}");
    assert!(!err.is_transient());
    assert_eq!(server.sagas().await, 2);
    server.stop().await;
}

#[tokio::test]
async fn missing_token_and_missing_scope_are_api_errors_with_their_codes() {
    let tokens = tokens();
    let (listener, addr) = local().await;
    let server = Server::start(listener, &tokens, ServeConfig::default()).await;
    let url = format!("http://{addr}");

    let anonymous = ApiClient::new(&url).unwrap();
    let err = anonymous
        .start("echo", &json!("x"), Some("k"))
        .await
        .unwrap_err();
    match &err {
        ClientError::Api { status, code, .. } => {
            assert_eq!((*status, code.as_str()), (401, "unauthenticated"), "{err}");
        }
        other => panic!("not an API error: {other}"),
    }
    assert!(!err.is_transient());
    let message = err.to_string();
    assert!(message.contains("--api-token-file"), "{message}");
    assert!(
        message.contains(&format!("POST {url}/sagas/echo")),
        "{message}"
    );

    let reader = ApiClient::new(&url).unwrap().token(&tokens.read);
    let err = reader
        .start("echo", &json!("x"), Some("k"))
        .await
        .unwrap_err();
    match &err {
        ClientError::Api {
            status, code, body, ..
        } => {
            assert_eq!((*status, code.as_str()), (403, "forbidden"), "{err}");
            assert_eq!(body["required_scope"], "start");
        }
        other => panic!("not an API error: {other}"),
    }
    let message = err.to_string();
    assert!(message.contains("`start` scope"), "{message}");
    assert!(message.contains("`reader`"), "{message}");
    assert!(!message.contains(&tokens.read), "{message}");
    // A forged token is 401 too, and is not echoed.
    let forged = ApiClient::new(&url).unwrap().token("saga_forged_secret");
    let err = forged
        .status(saga_core::SagaId::random())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert!(!err.to_string().contains("saga_forged_secret"), "{err}");
    assert_eq!(server.sagas().await, 0);
    server.stop().await;
}

#[tokio::test]
async fn bad_urls_and_ca_files_are_refused_with_what_to_do() {
    for url in [
        "localhost:8080",
        "ftp://host:1",
        "http://user:pw@host:1",
        "http://",
    ] {
        let err = ApiClient::new(url).unwrap_err();
        assert!(matches!(err, ClientError::BadUrl { .. }), "{url}: {err}");
        assert!(!err.to_string().contains("pw@"), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = ApiClient::new("https://127.0.0.1:1")
        .unwrap()
        .ca_file(&empty)
        .unwrap_err();
    assert!(err.to_string().contains("empty.pem"), "{err}");
    // Nothing listens: a connection error, transient, that never reached a server.
    let (listener, addr) = local().await;
    drop(listener);
    let client = ApiClient::new(&format!("http://{addr}"))
        .unwrap()
        .retry_for(Duration::ZERO);
    let err = client
        .status(saga_core::SagaId::random())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert!(err.is_transient() && err.was_not_sent());
}

#[tokio::test]
async fn https_with_a_private_ca() {
    if !saga_redis_testkit::openssl_available("https_with_a_private_ca") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    saga_redis_testkit::generate_certificates(dir.path()).unwrap();
    let (ca, cert, key) = (
        dir.path().join("ca.crt"),
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
    );
    let tokens = tokens();
    let (listener, addr) = local().await;
    let tls = TlsConfig::from_pem_files(&cert, &key).unwrap();
    let server = Server::start(listener, &tokens, ServeConfig::default().tls(tls)).await;
    let url = format!("https://{addr}");
    let client = ApiClient::new(&url)
        .unwrap()
        .ca_file(&ca)
        .unwrap()
        .token(&tokens.all);
    let started = client
        .start("echo", &json!("over tls"), Some("tls-1"))
        .await
        .unwrap();
    match client
        .wait(started.id, Duration::from_secs(30))
        .await
        .unwrap()
    {
        WaitOutcome::Terminal(outcome) => assert_eq!(outcome["output"], "over tls"),
        other => panic!("did not end: {other:?}"),
    }
    // Without the CA the server's certificate is refused, and that is not retried.
    let untrusting = ApiClient::new(&url).unwrap().token(&tokens.all);
    let err = untrusting.status(started.id).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Tls { .. } | ClientError::NoTrustedCa { .. }
        ),
        "{err}"
    );
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("--api-ca-file"), "{err}");
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = ApiClient::new(&format!("http://{addr}"))
        .unwrap()
        .retry_for(Duration::ZERO);
    assert!(plain.status(started.id).await.is_err());
    assert_eq!(server.sagas().await, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_keyed_start_rides_out_a_server_that_is_not_there_yet() {
    let tokens = tokens();
    // A free port, with a stand-in that takes the client's first connection and drops it.
    let (stand_in, addr) = local().await;
    let client = ApiClient::new(&format!("http://{addr}"))
        .unwrap()
        .token(&tokens.all)
        .retry_for(Duration::from_secs(120));
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.start("echo", &json!("late"), Some("late-1")).await }
    });
    // The client has begun once its first connection arrives; that attempt fails.
    let (first, _) = stand_in.accept().await.unwrap();
    drop(first);
    drop(stand_in);
    // Now the server (the client retries meanwhile, meeting refused connections).
    let listener = TcpListener::bind(addr).await.unwrap();
    let server = Server::start(listener, &tokens, ServeConfig::default()).await;
    let started = call.await.unwrap().unwrap();
    assert!(started.created);
    let again = client
        .start("echo", &json!("late"), Some("late-1"))
        .await
        .unwrap();
    assert_eq!((again.id, again.created), (started.id, false));
    assert_eq!(server.sagas().await, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_keyed_start_whose_answer_is_lost_is_retried_into_the_same_saga() {
    let tokens = tokens();
    let (listener, server_addr) = local().await;
    let server = Server::start(listener, &tokens, ServeConfig::default()).await;

    let (proxy_addr, proxy) = lossy_proxy(server_addr).await;
    let client = ApiClient::new(&format!("http://{proxy_addr}"))
        .unwrap()
        .token(&tokens.all);
    let started = client
        .start("echo", &json!("once"), Some("lost-1"))
        .await
        .unwrap();
    // The retry found the saga the lost attempt created.
    assert!(!started.created, "{started:?}");
    assert_eq!(server.sagas().await, 1);
    proxy.abort();

    // Without a key the same loss is not retried: the caller hears that it may have applied.
    let (proxy_addr, proxy) = lossy_proxy(server_addr).await;
    let client = ApiClient::new(&format!("http://{proxy_addr}"))
        .unwrap()
        .token(&tokens.all);
    let err = client
        .start("echo", &json!("maybe"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Transport { .. }), "{err}");
    assert!(err.to_string().contains("may or may not"), "{err}");
    assert_eq!(server.sagas().await, 2);
    proxy.abort();
    server.stop().await;
}

/// A proxy to `server` that forwards the first connection's request and drops the answer
/// (the client never hears it), then forwards every later connection faithfully.
async fn lossy_proxy(server: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (proxy, addr) = local().await;
    let task = tokio::spawn(async move {
        let (mut first, _) = proxy.accept().await.unwrap();
        let request = read_request(&mut first).await;
        let mut upstream = TcpStream::connect(server).await.unwrap();
        upstream.write_all(&request).await.unwrap();
        // The server has begun to answer, so it has acted; the client gets nothing.
        let mut answer = [0u8; 1];
        upstream.read_exact(&mut answer).await.unwrap();
        drop(first);
        loop {
            let (mut client, _) = proxy.accept().await.unwrap();
            let mut upstream = TcpStream::connect(server).await.unwrap();
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, task)
}

/// Reads one HTTP/1.1 request (head and a Content-Length body).
async fn read_request(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the client closed before sending its request");
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length {
                return received;
            }
        }
    }
}
