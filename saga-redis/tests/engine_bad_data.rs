//! Bad data through the whole stack (engine + Redis): malformed JSON in one saga's state, a
//! saga key of the wrong type, an unknown saga type and an oversized step output each get a
//! clear reason, and the saga is quarantined (visible to operators), while every other saga
//! completes.

mod support;

use std::time::Duration;

use saga_core::{
    Compensation, Engine, HttpStatus, Saga, SagaContext, SagaError, SagaId, SagaStatus, SagaStore,
    StartOptions, Step, StepContext,
};
use saga_redis::RedisStore;
use saga_redis_testkit::shared_server;

struct Echo;

impl Step for Echo {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "echo";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, _ctx: &StepContext, input: String) -> Result<String, HttpStatus> {
        // "big:<n>" returns n bytes, to produce an output over the store's payload limit.
        match input
            .strip_prefix("big:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(size) => Ok("x".repeat(size)),
            None => Ok(input),
        }
    }
}

struct Twice;

impl Saga for Twice {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "twice";

    async fn run(&self, saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
        let once = saga.run(Echo, input).await?;
        saga.run(Echo, once).await
    }
}

/// The same workflow under a name that the running coordinator does not know.
struct Ghost;

impl Saga for Ghost {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "ghost";

    async fn run(&self, saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
        saga.run(Echo, input).await
    }
}

async fn quarantine_reason(store: &RedisStore, url: &str, id: SagaId) -> String {
    let p = store.keys().partition_of(id);
    let mut conn = support::raw(url).await;
    let reason: Option<String> = redis::cmd("HGET")
        .arg(store.keys().quarantine(p))
        .arg(id.to_string())
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|err| panic!("HGET: {err}"));
    reason.unwrap_or_else(|| panic!("saga {id} is not quarantined"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sagas_are_quarantined_and_the_others_complete() {
    let url = shared_server().url();
    let store = support::builder(&url, "engine_bad_data")
        .max_payload(64 * 1024)
        .connect()
        .await
        .unwrap_or_else(|err| panic!("connect: {err}"));
    let engine = Engine::builder(store.clone())
        .register(Twice)
        .owner("coordinator-a")
        .lease_ttl(Duration::from_secs(30))
        .build()
        .unwrap_or_else(|err| panic!("{err}"));
    // Only this engine knows `ghost`; it starts one, then is gone.
    let starter = Engine::builder(store.clone())
        .register(Ghost)
        .build()
        .unwrap_or_else(|err| panic!("{err}"));

    let mut good = Vec::new();
    for n in 0..6 {
        let started = engine
            .start_with::<Twice>(&format!("deal-{n}"), StartOptions::default())
            .await
            .unwrap_or_else(|err| panic!("start: {err}"));
        good.push(started.id);
    }
    let malformed = engine
        .start_with::<Twice>(&"malformed".into(), StartOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let wrong_type = engine
        .start_with::<Twice>(&"wrong-type".into(), StartOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let oversized = engine
        .start_with::<Twice>(&"big:100000".into(), StartOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;
    let unknown = starter
        .start_with::<Ghost>(&"boo".into(), StartOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .id;

    // Damage two sagas behind the store's back.
    let mut conn = support::raw(&url).await;
    let () = redis::cmd("HSET")
        .arg(store.keys().saga(malformed))
        .arg("state")
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|err| panic!("HSET: {err}"));
    let () = redis::cmd("DEL")
        .arg(store.keys().saga(wrong_type))
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|err| panic!("DEL: {err}"));
    let () = redis::cmd("SET")
        .arg(store.keys().saga(wrong_type))
        .arg("I am not a hash")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|err| panic!("SET: {err}"));

    // Run everything that is due until nothing is left (bounded).
    let mut rounds = 0;
    loop {
        let ran = engine
            .run_due(100)
            .await
            .unwrap_or_else(|err| panic!("run_due: {err}"));
        if ran.is_empty() {
            break;
        }
        rounds += 1;
        assert!(rounds < 20, "sagas kept coming due: {ran:?}");
    }

    for id in &good {
        let outcome = engine
            .outcome(*id)
            .await
            .unwrap_or_else(|err| panic!("outcome: {err}"));
        assert_eq!(outcome.status, SagaStatus::Completed, "good saga {id}");
    }
    let reason = quarantine_reason(&store, &url, malformed).await;
    assert!(reason.contains("does not decode"), "malformed: {reason}");
    let reason = quarantine_reason(&store, &url, wrong_type).await;
    assert!(
        reason.to_lowercase().contains("type"),
        "wrong type: {reason}"
    );
    let reason = quarantine_reason(&store, &url, unknown).await;
    assert!(
        reason.contains("unknown saga type `ghost`"),
        "unknown type: {reason}"
    );
    let reason = quarantine_reason(&store, &url, oversized).await;
    assert!(
        reason.contains("over the store's limit"),
        "oversized: {reason}"
    );

    // Operators see the reasons, and nothing bad is due any more.
    let stored = store
        .load(unknown)
        .await
        .unwrap_or_else(|err| panic!("load: {err}"));
    let stored = stored.unwrap_or_else(|| panic!("ghost saga vanished"));
    assert!(stored.quarantined.is_some_and(|r| r.contains("ghost")));
    let again = engine
        .run_due(100)
        .await
        .unwrap_or_else(|err| panic!("run_due: {err}"));
    assert!(
        again.is_empty(),
        "quarantined sagas must not be claimed again: {again:?}"
    );
}
