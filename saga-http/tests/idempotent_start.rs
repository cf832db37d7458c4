//! Idempotent start over HTTP (issue 11, item 19), through a real TCP server with bearer
//! tokens: 16 concurrent `POST`s with one `Idempotency-Key` make one saga, every answer names
//! it and all but one say it already existed; the same key after the saga finished answers
//! that saga with its final status and runs nothing again; the same key with another body is
//! a conflict. (`api.rs` covers the sequential repeat and conflict while the saga runs.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::{
    Compensation, Coordinator, Engine, HttpStatus, MemoryStore, Saga, SagaContext, SagaError,
    SagaStatus, Step, StepContext,
};
use saga_http::{ApiTokens, Auth, GeneratedToken, HttpApi, Principal, Scope};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Effects applied, per idempotency key.
#[derive(Clone, Debug, Default)]
struct Charges(Arc<Mutex<BTreeMap<String, usize>>>);

impl Charges {
    fn all(&self) -> BTreeMap<String, usize> {
        self.0.lock().unwrap().clone()
    }
}

struct Charge;

impl Step for Charge {
    type Input = u64;
    type Output = u64;
    type Error = HttpStatus;
    const NAME: &'static str = "charge";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, cents: u64) -> Result<u64, HttpStatus> {
        let charges = ctx
            .resource::<Charges>()
            .map_err(|_| HttpStatus::new(500))?;
        *charges
            .0
            .lock()
            .unwrap()
            .entry(ctx.idempotency_key().to_owned())
            .or_default() += 1;
        Ok(cents)
    }
}

struct Payment;

impl Saga for Payment {
    type Input = u64;
    type Output = u64;
    const NAME: &'static str = "payment";

    async fn run(&self, saga: &mut SagaContext, cents: u64) -> Result<u64, SagaError> {
        saga.run(Charge, cents).await
    }
}

/// One HTTP/1.1 exchange over a fresh connection, sent once `ready` lets every caller go;
/// returns the status code and the JSON body.
async fn exchange(
    addr: std::net::SocketAddr,
    request: String,
    ready: Option<Arc<tokio::sync::Barrier>>,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    if let Some(ready) = ready {
        ready.wait().await;
    }
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let body = serde_json::from_str(body).unwrap_or_else(|err| panic!("not JSON ({err}): {body}"));
    (status, body)
}

fn post(addr: std::net::SocketAddr, token: &str, key: &str, body: &str) -> String {
    format!(
        "POST /sagas/payment HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

fn get(addr: std::net::SocketAddr, token: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    )
}

const CALLERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_makes_one_saga_concurrently_after_it_finished_and_refuses_another_body() {
    let principal = Principal::new("shop", BTreeSet::from([Scope::Start, Scope::Read])).unwrap();
    let generated = GeneratedToken::new(&principal).unwrap();
    let tokens = ApiTokens::parse(&generated.config_line).unwrap();
    let token = generated.token;

    let charges = Charges::default();
    let store = MemoryStore::new();
    let engine = Engine::builder(store.clone())
        .register(Payment)
        .resource(charges.clone())
        .build()
        .unwrap();
    let (stop_workers, workers_stopped) = tokio::sync::oneshot::channel::<()>();
    let workers = tokio::spawn(
        Coordinator::new(engine.clone())
            .poll_interval(Duration::from_millis(20))
            .run(async {
                let _ = workers_stopped.await;
            }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(saga_http::serve_listener(
        HttpApi::new(engine.clone(), Auth::tokens(tokens)).router(),
        listener,
        async move {
            let _ = server_stopped.await;
        },
    ));

    // 16 callers, each on its own connection, send the same start at once.
    let ready = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let request = post(addr, &token, "pay-42", "4200");
        calls.spawn(exchange(addr, request, Some(Arc::clone(&ready))));
    }
    let mut answers = Vec::new();
    while let Some(answer) = calls.join_next().await {
        answers.push(answer.unwrap());
    }
    let ids: BTreeSet<String> = answers
        .iter()
        .map(|(_, body)| body["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "every answer names one saga: {answers:?}");
    let id = ids.into_iter().next().unwrap();
    let created: Vec<_> = answers
        .iter()
        .filter(|(_, body)| body["created"] == true)
        .collect();
    assert_eq!(created.len(), 1, "one caller created it: {answers:?}");
    assert_eq!(created[0].0, 201, "{answers:?}");
    for (status, body) in &answers {
        if body["created"] == false {
            assert_eq!(*status, 200, "a duplicate is answered 200: {body}");
        } else {
            assert_eq!(body["created"], true, "{body}");
        }
    }

    // The saga runs once.
    let (status, outcome) = exchange(
        addr,
        get(addr, &token, &format!("/sagas/{id}/wait?timeout_ms=30000")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(outcome["output"], 4200);

    // The same key after the saga finished: that saga, with its final status; nothing runs.
    let (status, again) = exchange(addr, post(addr, &token, "pay-42", "4200"), None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["created"], false);
    assert_eq!(again["status"], "completed", "{again}");

    // The same key with another body: a conflict that names the saga.
    let (status, conflict) = exchange(addr, post(addr, &token, "pay-42", "9900"), None).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["code"], "idempotency_conflict", "{conflict}");
    assert_eq!(conflict["saga_id"], id.as_str());
    // The key is named as stored: scoped to the caller's principal (`shop/pay-42`).
    let named = conflict["idempotency_key"].as_str().unwrap();
    assert!(named.ends_with("pay-42"), "{conflict}");

    // One start and one end in the history; a second run would also show as a second charge.
    let (_, history) = exchange(
        addr,
        get(addr, &token, &format!("/sagas/{id}/history")),
        None,
    )
    .await;
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types.iter().filter(|t| **t == "SagaStarted").count(),
        1,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| **t == "SagaCompleted").count(),
        1,
        "{types:?}"
    );
    let _ = stop_workers.send(());
    workers.await.unwrap();
    let _ = stop_server.send(());
    server.await.unwrap().unwrap();

    let charges = charges.all();
    assert_eq!(charges.len(), 1, "one charge key: {charges:?}");
    assert!(
        charges.values().all(|n| *n == 1),
        "charged once: {charges:?}"
    );
    let counts = saga_core::SagaStore::count_by_status(&store).await.unwrap();
    assert_eq!(
        counts.values().sum::<u64>(),
        1,
        "one saga in the store: {counts:?}"
    );
    assert_eq!(counts.get(&SagaStatus::Completed), Some(&1), "{counts:?}");
}
