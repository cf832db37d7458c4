//! The engine through a redis-server restart (AOF with `appendfsync always`): sagas in flight
//! when the server dies reconnect, retry their commits (the commit id makes a retried commit
//! apply once) and all complete, with histories that fold to their stored state.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use saga_core::{
    Compensation, Engine, EventKind, HttpStatus, RetryPolicy, Saga, SagaContext, SagaError, SagaId,
    SagaState, SagaStatus, StartOptions, Step, StepContext, StepStatus,
};
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers};

const STEPS: u32 = 6;
const SAGAS: usize = 24;

/// Set once the server has been restarted: the fourth step of every saga waits for it, so
/// every saga is in flight (with three steps committed) while the server is away.
static RESTARTED: AtomicBool = AtomicBool::new(false);

struct Work;

impl Step for Work {
    type Input = u64;
    type Output = u64;
    type Error = HttpStatus;
    const NAME: &'static str = "work";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, input: u64) -> Result<u64, HttpStatus> {
        if ctx.position() == 3 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !RESTARTED.load(Ordering::SeqCst) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the restart never happened"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(input + 1)
    }
}

struct Chain;

impl Saga for Chain {
    type Input = u64;
    type Output = u64;
    const NAME: &'static str = "chain";

    async fn run(&self, saga: &mut SagaContext, mut value: u64) -> Result<u64, SagaError> {
        for _ in 0..STEPS {
            value = saga.run(Work, value).await?;
        }
        Ok(value)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_in_flight_complete_across_a_server_restart() {
    if !can_spawn_servers("sagas_in_flight_complete_across_a_server_restart") {
        return;
    }
    let mut server = RedisServer::start(ServerConfig::new().durable());
    let store = support::store(&server.url(), "engine_restart").await;
    let engine = Engine::builder(store)
        .register(Chain)
        // Enough patience for a restart: up to ~30 s of commit retries.
        .store_retry(
            RetryPolicy::default()
                .with_max_attempts(60)
                .with_initial_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_millis(500)),
        )
        .build()
        .unwrap_or_else(|err| panic!("{err}"));
    let ids: Vec<SagaId> = (0..SAGAS)
        .map(|n| SagaId::from_idempotency_key(Chain::NAME, &format!("restart-{n}")))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..SAGAS {
        let engine = engine.clone();
        tasks.spawn(async move {
            engine
                .execute::<Chain>(&(n as u64 * 100), StartOptions::key(format!("restart-{n}")))
                .await
        });
    }
    // Wait (bounded) until every saga is blocked in its fourth step, then restart the server.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for id in &ids {
        loop {
            let progress = engine
                .state(*id)
                .await
                .map(|s| s.journal.len())
                .unwrap_or(0);
            if progress >= 4 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sagas made no progress within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Restarting blocks until the server answers again; then the sagas go on.
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap_or_else(|err| panic!("restart: {err}"));
    RESTARTED.store(true, Ordering::SeqCst);

    while let Some(joined) = tasks.join_next().await {
        let outcome = joined
            .unwrap_or_else(|err| panic!("task: {err}"))
            .unwrap_or_else(|err| panic!("saga failed across the restart: {err}"));
        assert_eq!(outcome.status, SagaStatus::Completed);
    }
    for (n, id) in ids.iter().enumerate() {
        let state = engine
            .state(*id)
            .await
            .unwrap_or_else(|err| panic!("state: {err}"));
        assert_eq!(
            state.output,
            Some(serde_json::json!(n as u64 * 100 + u64::from(STEPS)))
        );
        assert_eq!(state.journal.len(), STEPS as usize);
        assert!(
            state
                .journal
                .iter()
                .all(|r| r.status == StepStatus::Succeeded)
        );
        let history = engine
            .history(*id)
            .await
            .unwrap_or_else(|err| panic!("history: {err}"));
        let folded = SagaState::fold(*id, &history).unwrap_or_else(|err| panic!("fold: {err}"));
        assert_eq!(
            folded, state,
            "saga {id}: the history folds to the stored state"
        );
        let succeeded = history
            .iter()
            .filter(|e| matches!(e.kind, EventKind::StepSucceeded { .. }))
            .count();
        assert_eq!(
            succeeded, STEPS as usize,
            "saga {id}: no transition lost or doubled"
        );
    }
    drop(server);
}
