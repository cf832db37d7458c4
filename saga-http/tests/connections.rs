//! Bounded connections against the real server over TCP (issue 8, item 2): clients that drip
//! their headers or body, or say nothing, are disconnected; connections beyond the limit are
//! refused at once while `/healthz` keeps answering; HTTPS serves the same API.
//!
//! Nothing here measures time: each test asserts that the server closed a connection (the
//! client reads end-of-file), or counts answers. The bounds are short so the tests are quick;
//! the client-side read timeouts are only a safety net against a hung test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use saga_core::{Engine, MemoryStore, Saga, SagaContext, SagaError};
use saga_http::{Auth, HttpApi, ServeConfig, TlsConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

struct Echo;

impl Saga for Echo {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "echo";
    async fn run(&self, _saga: &mut SagaContext, text: String) -> Result<String, SagaError> {
        Ok(text)
    }
}

/// A server on a loopback port, stopped when dropped.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    async fn start(config: ServeConfig) -> Self {
        Self::start_api(config, |api| api).await
    }

    async fn start_api(config: ServeConfig, shape: impl FnOnce(HttpApi) -> HttpApi) -> Self {
        let engine = Engine::builder(MemoryStore::new())
            .register(Echo)
            .build()
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let api = shape(HttpApi::new(engine, Auth::Disabled));
        let task = tokio::spawn(async move {
            api.serve(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// The safety net for reads: far longer than any bound under test.
const HANG: Duration = Duration::from_secs(30);

/// Reads until the server closes the connection; returns what it sent. Panics (the test
/// fails) if the server keeps it open past the safety net.
async fn read_to_close<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(HANG, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&received).into_owned()
}

/// Sends `request` and reads one response (up to the end of its body, by Content-Length).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &str,
) -> Option<String> {
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(HANG, async {
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            received.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&received);
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
                    return Some(text.into_owned());
                }
            }
        }
    })
    .await
    .expect("the server neither answered nor closed")
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
}

fn status(response: &str) -> u16 {
    response.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_client_dripping_its_headers_is_disconnected() {
    let server =
        Server::start(ServeConfig::default().header_read_timeout(Duration::from_millis(300))).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // One header byte every 50 ms, for up to 60 s: the server must cut it off long before.
    let mut closed = false;
    for _ in 0..1200 {
        if stream.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => panic!("the server answered a request whose head never ended"),
            Err(_) => {}
        }
    }
    assert!(
        closed,
        "a dripped header kept the connection open for a minute"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_silent_connection_and_an_idle_keep_alive_connection_are_closed() {
    let config = ServeConfig::default()
        .header_read_timeout(Duration::from_millis(300))
        .idle_timeout(Duration::from_millis(500));
    let server = Server::start(config).await;
    // Connects and says nothing.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");
    // One request, then idle on a kept-alive connection.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let response = exchange(&mut idle, &get("/healthz")).await.unwrap();
    assert_eq!(status(&response), 200, "{response}");
    assert_eq!(read_to_close(&mut idle).await, "");
    server.stop().await;
}

#[tokio::test]
async fn a_client_dripping_its_body_gets_408_and_is_disconnected() {
    let server = Server::start_api(ServeConfig::default(), |api| {
        api.request_timeout(Duration::from_millis(300))
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"POST /sagas/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n\"")
        .await
        .unwrap();
    let mut received = String::new();
    for _ in 0..1200 {
        if stream.write_all(b"a").await.is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => received.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
    }
    received.push_str(&read_to_close(&mut stream).await);
    assert_eq!(status(&received), 408, "{received}");
    assert!(received.contains("request_timeout"), "{received}");
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_and_health_still_answers() {
    let config = ServeConfig::default()
        .max_connections(4)
        .overflow_connections(2)
        .header_read_timeout(Duration::from_secs(60))
        .idle_timeout(Duration::from_secs(60));
    let server = Server::start(config).await;
    // Fill the regular slots with connections that answered once and stay open (kept alive).
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let response = exchange(&mut stream, &get("/healthz")).await.unwrap();
        assert_eq!(status(&response), 200);
        held.push(stream);
    }
    // Full: a new connection gets an overflow slot that answers health routes only, once.
    let mut health = TcpStream::connect(server.addr).await.unwrap();
    let response = exchange(&mut health, &get("/healthz")).await.unwrap();
    assert_eq!(status(&response), 200, "{response}");
    read_to_close(&mut health).await;
    let mut ready = TcpStream::connect(server.addr).await.unwrap();
    let response = exchange(&mut ready, &get("/readyz")).await.unwrap();
    assert_eq!(status(&response), 200, "{response}");
    let mut work = TcpStream::connect(server.addr).await.unwrap();
    let response = exchange(
        &mut work,
        &get("/sagas/00000000-0000-0000-0000-000000000000"),
    )
    .await
    .unwrap();
    assert_eq!(status(&response), 503, "{response}");
    assert!(response.contains("too_many_connections"), "{response}");
    read_to_close(&mut work).await;

    // Take both overflow slots with connections that say nothing (the bounds are long), so
    // no slot frees during the flood: every one of 300 more connections is closed without
    // an answer. The server holds 4 + 2 connections however many come.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let mut answered = 0;
    for stream in &mut flood {
        if exchange(stream, &get("/healthz")).await.is_some() {
            answered += 1;
        }
    }
    assert_eq!(
        answered, 0,
        "flood connections were served beyond the limit"
    );
    drop(flood);
    // The silent ones were kept (an overflow slot still answers health once).
    let response = exchange(&mut silent[0], &get("/healthz")).await.unwrap();
    assert_eq!(status(&response), 200);
    drop(silent);
    // The held connections still work, and once they close new ones are regular again.
    let response = exchange(&mut held[0], &get("/healthz")).await.unwrap();
    assert_eq!(status(&response), 200);
    drop(held);
    let mut served = false;
    for _ in 0..100 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let response = exchange(
            &mut stream,
            &get("/sagas/00000000-0000-0000-0000-000000000000"),
        )
        .await;
        if response.as_deref().map(status) == Some(404) {
            served = true;
            break;
        }
        // The server may not have noticed the closed connections yet: yield and retry.
        tokio::task::yield_now().await;
    }
    assert!(
        served,
        "slots freed by closed connections were never reused"
    );
    server.stop().await;
}

#[tokio::test]
async fn https_serves_the_api_and_plain_http_gets_nothing() {
    if !saga_redis_testkit::openssl_available("https_serves_the_api_and_plain_http_gets_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    saga_redis_testkit::generate_certificates(dir.path()).unwrap();
    let (ca, cert, key) = (
        dir.path().join("ca.crt"),
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
    );
    let tls = TlsConfig::from_pem_files(&cert, &key).unwrap();
    let server = Server::start(
        ServeConfig::default()
            .tls(tls)
            .header_read_timeout(Duration::from_millis(500)),
    )
    .await;

    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&ca).unwrap();
    for der in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(der.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls_stream = connector.connect(name, tcp).await.unwrap();
    let response = exchange(&mut tls_stream, &get("/healthz")).await.unwrap();
    assert_eq!(status(&response), 200, "{response}");
    let response = exchange(&mut tls_stream, &get("/sagas/not-an-id"))
        .await
        .unwrap();
    assert_eq!(status(&response), 400, "{response}");

    // Plain HTTP on the HTTPS port is not answered as HTTP.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain.write_all(get("/healthz").as_bytes()).await.unwrap();
    let reply = read_to_close(&mut plain).await;
    assert!(!reply.starts_with("HTTP/1.1 200"), "{reply}");
    server.stop().await;
}

#[test]
fn unusable_certificates_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").unwrap();
    let err = TlsConfig::from_pem_files(&empty, &empty)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.pem") && err.contains("certificate"),
        "{err}"
    );
    let missing = dir.path().join("missing.pem");
    let err = TlsConfig::from_pem_files(&missing, &empty)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pem"), "{err}");
}
