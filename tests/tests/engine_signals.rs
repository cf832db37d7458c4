//! Signals: `SagaContext::wait_for_signal` suspends the saga durably until a signal sent with
//! `Engine::signal` arrives, or its timeout (a value the workflow branches on). A signal sent
//! before the wait is kept; the same key twice is delivered once; a payload that does not
//! decode is set aside and recorded while the wait goes on; a signal to a finished saga is an
//! error; a cancel ends the wait. On memory (paused time) and on a real redis-server.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use saga_core::{
    Engine, EngineError, EventKind, HttpStatus, MemoryStore, Outcome, RunOutcome, Saga,
    SagaContext, SagaError, SagaStatus, SagaStore, SignalSent, SignalSpec, StepContext, saga_step,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers};
use saga_tests::{Effects, effects};
use saga_tests::{count, kinds};
use serde::{Deserialize, Serialize};

#[saga_step(compensate = withdraw_deal, timeout = "none")]
async fn create_deal(ctx: &StepContext, company: String) -> Result<String, HttpStatus> {
    effects(ctx)?.push(format!("create {company}"));
    Ok(format!("deal-{company}"))
}

async fn withdraw_deal(
    ctx: &StepContext,
    _company: String,
    deal: String,
) -> Result<(), HttpStatus> {
    effects(ctx)?.push(format!("withdraw {deal}"));
    Ok(())
}

#[saga_step(no_compensation, timeout = "none")]
async fn record_decision(ctx: &StepContext, decision: String) -> Result<(), HttpStatus> {
    effects(ctx)?.push(format!("decision {decision}"));
    Ok(())
}

/// The committee's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Approval {
    partner: String,
    amount: u64,
}

/// Creates a deal, waits up to `hours` for the committee, records the decision; a timeout
/// compensates (withdraws the deal).
struct CommitteeDeal;

impl Saga for CommitteeDeal {
    type Input = (String, u64);
    type Output = Approval;
    const NAME: &'static str = "committee_deal";

    async fn run(
        &self,
        saga: &mut SagaContext,
        (company, hours): (String, u64),
    ) -> Result<Approval, SagaError> {
        saga.run(CreateDeal, company).await?;
        let wait = Duration::from_secs(hours * 3600);
        match saga
            .wait_for_signal::<Approval>("committee_approval", wait)
            .await?
        {
            Some(approval) => {
                saga.run(
                    RecordDecision,
                    format!("{} {}", approval.partner, approval.amount),
                )
                .await?;
                Ok(approval)
            }
            None => Err(SagaError::Aborted(
                "the committee did not answer in time".into(),
            )),
        }
    }
}

/// The same workflow, declaring its signal: bad payloads are refused when sent.
struct DeclaredDeal;

impl Saga for DeclaredDeal {
    type Input = (String, u64);
    type Output = Approval;
    const NAME: &'static str = "declared_deal";
    const SIGNALS: &'static [SignalSpec] = &[SignalSpec::of::<Approval>("committee_approval")];

    async fn run(
        &self,
        saga: &mut SagaContext,
        input: (String, u64),
    ) -> Result<Approval, SagaError> {
        CommitteeDeal.run(saga, input).await
    }
}

fn engine(store: Arc<dyn SagaStore>, effects: &Effects, owner: &str) -> Engine {
    Engine::builder_shared(store)
        .register(CommitteeDeal)
        .register(DeclaredDeal)
        .resource(effects.clone())
        .owner(owner)
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap()
}

fn approval(partner: &str, amount: u64) -> Approval {
    Approval {
        partner: partner.to_owned(),
        amount,
    }
}

async fn a_signal_during_the_wait_resumes_the_saga(store: Arc<dyn SagaStore>) {
    let effects = Effects::default();
    let first = engine(Arc::clone(&store), &effects, "coordinator-a");
    let handle = first
        .start(CommitteeDeal, ("acme".into(), 48))
        .await
        .unwrap();
    let suspended = first.run_once(handle.id()).await.unwrap();
    assert!(
        matches!(suspended, RunOutcome::Suspended(_)),
        "{suspended:?}"
    );
    let stored = store.load(handle.id()).await.unwrap().unwrap();
    assert!(stored.lease.is_none(), "a waiting saga holds no lease");
    drop(first);

    // Another coordinator (a restart) takes the signal.
    let second = engine(Arc::clone(&store), &effects, "coordinator-b");
    let sent = second
        .signal(
            handle.id(),
            "committee_approval",
            &approval("ann", 5),
            "vote-1",
        )
        .await
        .unwrap();
    assert_eq!(sent, SignalSent::Delivered { sequence: 1 });
    let stored = store.load(handle.id()).await.unwrap().unwrap();
    assert!(
        stored.due_at.is_some_and(|due| due <= stored.updated_at),
        "the signal makes the waiting saga due at once: {stored:?}"
    );
    let handle = second.handle::<CommitteeDeal>(handle.id()).await.unwrap();
    assert_eq!(
        handle.run_to_end().await.unwrap(),
        Outcome::Completed(approval("ann", 5))
    );
    assert_eq!(effects.all(), ["create acme", "decision ann 5"]);
    let history = handle.history().await.unwrap();
    assert_eq!(
        count(&history, "SignalReceived"),
        1,
        "{:?}",
        kinds(&history)
    );
    let timeline = saga_core::timeline::render(&history);
    assert!(
        timeline.contains("waiting for signal `committee_approval` until"),
        "{timeline}"
    );
    assert!(
        timeline.contains("took signal `committee_approval` #1"),
        "{timeline}"
    );

    // The same key again is a duplicate; a finished saga takes no more signals.
    let again = second
        .signal(
            handle.id(),
            "committee_approval",
            &approval("ann", 5),
            "vote-1",
        )
        .await;
    assert!(
        matches!(
            again,
            Err(EngineError::WrongStatus {
                status: SagaStatus::Completed,
                ..
            })
        ),
        "{again:?}"
    );
}

async fn a_signal_before_the_wait_is_kept_and_a_duplicate_dropped(store: Arc<dyn SagaStore>) {
    let effects = Effects::default();
    let engine = engine(store, &effects, "coordinator-a");
    let handle = engine
        .start(CommitteeDeal, ("globex".into(), 48))
        .await
        .unwrap();
    // Sent before the saga ran at all.
    let first = engine
        .signal(
            handle.id(),
            "committee_approval",
            &approval("bo", 7),
            "vote-1",
        )
        .await
        .unwrap();
    let duplicate = engine
        .signal(
            handle.id(),
            "committee_approval",
            &approval("bo", 7),
            "vote-1",
        )
        .await
        .unwrap();
    assert_eq!(
        duplicate,
        SignalSent::Duplicate {
            sequence: first.sequence()
        }
    );
    let conflict = engine
        .signal(
            handle.id(),
            "committee_approval",
            &approval("bo", 8),
            "vote-1",
        )
        .await;
    assert!(
        matches!(conflict, Err(EngineError::SignalConflict { .. })),
        "{conflict:?}"
    );
    // A second, different signal stays in the inbox: one wait takes one signal.
    engine
        .signal(
            handle.id(),
            "committee_approval",
            &approval("cy", 9),
            "vote-2",
        )
        .await
        .unwrap();
    assert_eq!(
        handle.run_to_end().await.unwrap(),
        Outcome::Completed(approval("bo", 7)),
        "the oldest signal is taken, once"
    );
    let history = handle.history().await.unwrap();
    assert_eq!(
        count(&history, "SignalReceived"),
        2,
        "{:?}",
        kinds(&history)
    );
    assert_eq!(effects.all(), ["create globex", "decision bo 7"]);
}

async fn a_payload_that_does_not_decode_is_set_aside(store: Arc<dyn SagaStore>) {
    let effects = Effects::default();
    let engine = engine(store, &effects, "coordinator-a");
    let handle = engine
        .start(CommitteeDeal, ("initech".into(), 48))
        .await
        .unwrap();
    assert!(matches!(
        engine.run_once(handle.id()).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    engine
        .signal(
            handle.id(),
            "committee_approval",
            &serde_json::json!({"partner": 3}),
            "bad",
        )
        .await
        .unwrap();
    // The wait rejects it, records why, and goes on waiting.
    assert!(matches!(
        engine.run_once(handle.id()).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    let history = handle.history().await.unwrap();
    let rejected: Vec<_> = history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::SignalRejected { key, error, .. } => Some((key.clone(), error.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 1, "{:?}", kinds(&history));
    assert_eq!(rejected[0].0, "bad");
    assert!(rejected[0].1.contains("invalid type"), "{}", rejected[0].1);
    engine
        .signal(
            handle.id(),
            "committee_approval",
            &approval("di", 1),
            "good",
        )
        .await
        .unwrap();
    assert_eq!(
        handle.run_to_end().await.unwrap(),
        Outcome::Completed(approval("di", 1))
    );
    let history = handle.history().await.unwrap();
    assert_eq!(
        count(&history, "SignalRejected"),
        1,
        "rejected once: {:?}",
        kinds(&history)
    );
}

async fn declared_signals_are_checked_when_sent(store: Arc<dyn SagaStore>) {
    let effects = Effects::default();
    let engine = engine(store, &effects, "coordinator-a");
    let handle = engine
        .start(DeclaredDeal, ("umbrella".into(), 48))
        .await
        .unwrap();
    let bad = engine
        .signal(
            handle.id(),
            "committee_approval",
            &serde_json::json!({"partner": 3}),
            "k",
        )
        .await;
    let Err(EngineError::InvalidSignal { problem, .. }) = bad else {
        panic!("a payload that does not decode must be refused, got {bad:?}");
    };
    assert!(problem.contains("partner"), "{problem}");
    let unknown = engine
        .signal(handle.id(), "committee_veto", &approval("x", 1), "k")
        .await;
    assert!(
        matches!(unknown, Err(EngineError::InvalidSignal { .. })),
        "{unknown:?}"
    );
    let reserved = engine.signal(handle.id(), "saga.child", &1, "k").await;
    assert!(
        matches!(reserved, Err(EngineError::InvalidSignal { .. })),
        "{reserved:?}"
    );
    let missing = engine
        .signal(
            saga_core::SagaId::random(),
            "committee_approval",
            &approval("x", 1),
            "k",
        )
        .await;
    assert!(
        matches!(missing, Err(EngineError::NotFound(_))),
        "{missing:?}"
    );
    assert!(
        engine
            .events_of(handle.id())
            .await
            .iter()
            .all(|k| *k != "SignalReceived"),
        "nothing refused was delivered"
    );
}

async fn a_timeout_is_a_value_the_workflow_branches_on(store: Arc<dyn SagaStore>) {
    let effects = Effects::default();
    let engine = engine(store, &effects, "coordinator-a");
    let handle = engine
        .start(CommitteeDeal, ("hooli".into(), 1))
        .await
        .unwrap();
    let outcome = handle.run_to_end().await.unwrap();
    assert!(
        matches!(&outcome, Outcome::Compensated { reason } if reason.to_string().contains("did not answer in time")),
        "{outcome:?}"
    );
    assert_eq!(effects.all(), ["create hooli", "withdraw deal-hooli"]);
    let timeline = saga_core::timeline::render(&handle.history().await.unwrap());
    assert!(
        timeline.contains("TIMED OUT waiting for signal `committee_approval`"),
        "{timeline}"
    );
}

async fn a_cancel_ends_the_wait_and_compensates(store: Arc<dyn SagaStore>) {
    let effects = Effects::default();
    let engine = engine(store, &effects, "coordinator-a");
    let handle = engine
        .start(CommitteeDeal, ("pied".into(), 48))
        .await
        .unwrap();
    assert!(matches!(
        engine.run_once(handle.id()).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    handle.cancel("the founder withdrew").await.unwrap();
    let outcome = handle.run_to_end().await.unwrap();
    assert!(
        matches!(outcome, Outcome::Compensated { .. }),
        "{outcome:?}"
    );
    assert_eq!(effects.all(), ["create pied", "withdraw deal-pied"]);
}

trait EventNames {
    async fn events_of(&self, id: saga_core::SagaId) -> Vec<&'static str>;
}

impl EventNames for Engine {
    async fn events_of(&self, id: saga_core::SagaId) -> Vec<&'static str> {
        let history = self.history(id).await.unwrap();
        history.iter().map(|e| e.kind.name()).collect()
    }
}

fn memory() -> Arc<dyn SagaStore> {
    Arc::new(MemoryStore::new())
}

#[tokio::test(start_paused = true)]
async fn memory_a_signal_during_the_wait_resumes_the_saga() {
    a_signal_during_the_wait_resumes_the_saga(memory()).await;
}

#[tokio::test(start_paused = true)]
async fn memory_a_signal_before_the_wait_is_kept_and_a_duplicate_dropped() {
    a_signal_before_the_wait_is_kept_and_a_duplicate_dropped(memory()).await;
}

#[tokio::test(start_paused = true)]
async fn memory_a_payload_that_does_not_decode_is_set_aside() {
    a_payload_that_does_not_decode_is_set_aside(memory()).await;
}

#[tokio::test(start_paused = true)]
async fn memory_declared_signals_are_checked_when_sent() {
    declared_signals_are_checked_when_sent(memory()).await;
}

#[tokio::test(start_paused = true)]
async fn memory_a_timeout_is_a_value_the_workflow_branches_on() {
    a_timeout_is_a_value_the_workflow_branches_on(memory()).await;
}

#[tokio::test(start_paused = true)]
async fn memory_a_cancel_ends_the_wait_and_compensates() {
    a_cancel_ends_the_wait_and_compensates(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_signals() {
    if !can_spawn_servers("redis_signals") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    for scenario in 0..4 {
        let store: Arc<dyn SagaStore> = Arc::new(
            RedisStore::builder()
                .url(server.url())
                .key_prefix(format!("signals-{scenario}"))
                .connect()
                .await
                .expect("connect to the test redis-server"),
        );
        match scenario {
            0 => a_signal_during_the_wait_resumes_the_saga(store).await,
            1 => a_signal_before_the_wait_is_kept_and_a_duplicate_dropped(store).await,
            2 => a_payload_that_does_not_decode_is_set_aside(store).await,
            _ => a_cancel_ends_the_wait_and_compensates(store).await,
        }
    }
}
