//! A saga started before journal format 2 still replays, tested with histories recorded by
//! the previous engine (commit f88d62f, journal format 1): the fixtures in
//! `tests/fixtures/journal_v1/` are the raw stored state and raw events that engine wrote on a
//! `MemoryStore` for the workflow below (same names, same steps), dumped as they were:
//!
//! - `suspended.json`: two steps done, a journaled `now` and `uuid`, a durable sleep pending;
//! - `compensating.json`: the last step failed for good, one undo done (`refund`), one left
//!   (`release_hold`); the old engine crashed (its store cut off) before recording the second;
//! - `completed.json`: a completed saga, stored compact.
//!
//! Each is loaded into a fresh `MemoryStore` as it was and driven by the current engine.
//! A state that claims a journal format newer than the engine knows must not be run.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use saga_core::store::NewSaga;
use saga_core::{
    Engine, EventKind, HttpStatus, MemoryStore, SagaContext, SagaError, SagaEvent, SagaId,
    SagaState, SagaStatus, SagaStore, StepContext, saga, saga_step,
};
use saga_tests::kinds;
use saga_tests::{Effects, effects};
use serde_json::Value;

const SUSPENDED: &str = include_str!("../fixtures/journal_v1/suspended.json");
const COMPENSATING: &str = include_str!("../fixtures/journal_v1/compensating.json");
const COMPLETED: &str = include_str!("../fixtures/journal_v1/completed.json");

/// What the steps did, in order, each with its idempotency key.

// The workflow exactly as the old engine ran it when the fixtures were recorded.

#[saga_step(compensate = release_hold, timeout = "none")]
async fn place_hold(ctx: &StepContext, deal: String) -> Result<String, HttpStatus> {
    effects(ctx)?.push(format!("hold {deal} {}", ctx.idempotency_key()));
    Ok(format!("hold-{deal}"))
}

async fn release_hold(ctx: &StepContext, deal: String, hold: String) -> Result<(), HttpStatus> {
    effects(ctx)?.push(format!("release {deal} {hold} {}", ctx.idempotency_key()));
    Ok(())
}

#[saga_step(compensate = refund, timeout = "none")]
async fn charge(ctx: &StepContext, deal: String) -> Result<u64, HttpStatus> {
    effects(ctx)?.push(format!("charge {deal} {}", ctx.idempotency_key()));
    Ok(42)
}

async fn refund(ctx: &StepContext, deal: String, amount: u64) -> Result<(), HttpStatus> {
    effects(ctx)?.push(format!("refund {deal} {amount} {}", ctx.idempotency_key()));
    Ok(())
}

#[saga_step(no_compensation, timeout = "none")]
async fn ship(ctx: &StepContext, input: (String, bool)) -> Result<String, HttpStatus> {
    let (deal, fail) = input;
    if fail {
        effects(ctx)?.push(format!("ship-refused {deal} {}", ctx.idempotency_key()));
        return Err(HttpStatus::new(400));
    }
    effects(ctx)?.push(format!("ship {deal} {}", ctx.idempotency_key()));
    Ok(format!("shipped-{deal}"))
}

/// Holds, journals a time and a uuid, charges, sleeps, ships.
#[saga(name = "v1_order")]
async fn v1_order(saga: &mut SagaContext, input: (String, u64, bool)) -> Result<String, SagaError> {
    let (deal, minutes, fail) = input;
    let hold = saga.run(PlaceHold, deal.clone()).await?;
    let at = saga.now()?;
    let token = saga.uuid()?;
    let charged = saga.run(Charge, deal.clone()).await?;
    saga.sleep(Duration::from_secs(minutes * 60)).await?;
    let shipped = saga.run(Ship, (deal, fail)).await?;
    Ok(format!("{hold}/{charged}/{shipped}/{token}/{}", at.0))
}

fn engine(store: Arc<dyn SagaStore>, effects: &Effects) -> Engine {
    Engine::builder_shared(store)
        .register(V1Order)
        .resource(effects.clone())
        .owner("new-coordinator")
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap()
}

/// One recorded saga: what the old engine stored for it.
struct Fixture {
    id: SagaId,
    saga_type: String,
    idempotency_key: Option<String>,
    state: String,
    events: Vec<String>,
    /// The effects the old run applied (its in-memory ledger, for reading the keys).
    old_effects: Vec<String>,
}

fn fixture(text: &str) -> Fixture {
    let json: Value = serde_json::from_str(text).unwrap();
    let state: Value = serde_json::from_str(json["state"].as_str().unwrap()).unwrap();
    Fixture {
        id: json["id"].as_str().unwrap().parse().unwrap(),
        saga_type: json["saga_type"].as_str().unwrap().to_owned(),
        idempotency_key: state["idempotency_key"].as_str().map(str::to_owned),
        state: json["state"].as_str().unwrap().to_owned(),
        events: json["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect(),
        old_effects: json["effects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect(),
    }
}

/// Loads the fixture into `store` exactly as recorded.
async fn load(store: &MemoryStore, fixture: &Fixture) {
    store
        .create(NewSaga {
            id: fixture.id,
            saga_type: fixture.saga_type.clone(),
            version: 1,
            idempotency_key: fixture.idempotency_key.clone(),
            fingerprint: "recorded-by-journal-format-1".into(),
            state: fixture.state.clone(),
            events: fixture.events.clone(),
            claim: None,
        })
        .await
        .unwrap();
}

fn decode_events(raw: &[String]) -> Vec<SagaEvent> {
    raw.iter()
        .enumerate()
        .map(|(seq, text)| {
            let mut event: SagaEvent = serde_json::from_str(text).unwrap();
            event.seq = seq as u64;
            event
        })
        .collect()
}

/// The journaled value `name` the old run recorded.
fn recorded_value(events: &[SagaEvent], wanted: &str) -> Value {
    events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::ValueRecorded { name, value, .. } if name == wanted => Some(value.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no `{wanted}` in the recorded history"))
}

fn compensated_steps(history: &[SagaEvent]) -> Vec<(u32, String)> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepCompensated { position, step, .. } => Some((*position, step.clone())),
            _ => None,
        })
        .collect()
}

fn started_steps(history: &[SagaEvent]) -> Vec<String> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepStarted { step, .. } => Some(step.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn every_recorded_history_folds_as_journal_format_1() {
    for (name, text, status) in [
        ("suspended", SUSPENDED, SagaStatus::Running),
        ("compensating", COMPENSATING, SagaStatus::Compensating),
        ("completed", COMPLETED, SagaStatus::Completed),
    ] {
        let fixture = fixture(text);
        let events = decode_events(&fixture.events);
        let folded = SagaState::fold(fixture.id, &events)
            .unwrap_or_else(|err| panic!("{name}: the recorded history does not fold: {err}"));
        assert_eq!(folded.journal_format, 1, "{name}");
        assert_eq!(folded.status, status, "{name}");
        // The stored state, written before formats existed, reads as format 1 too.
        let stored: SagaState = serde_json::from_str(&fixture.state).unwrap();
        assert_eq!(stored.journal_format, 1, "{name}");
        assert_eq!(stored.status, status, "{name}");
        if !stored.is_compact() {
            assert_eq!(
                stored.journal.len(),
                folded.journal.len(),
                "{name}: the stored journal and the fold agree on its length"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_suspended_format_1_saga_resumes_and_completes_without_rerunning_its_steps() {
    let fixture = fixture(SUSPENDED);
    let recorded = decode_events(&fixture.events);
    let store = MemoryStore::new();
    load(&store, &fixture).await;
    let effects = Effects::default();
    let engine = engine(Arc::new(store.clone()), &effects);

    let state = engine.state(fixture.id).await.unwrap();
    assert_eq!(state.journal_format, 1);
    assert_eq!(state.status, SagaStatus::Running);

    // The durable sleep (an hour after the recording) runs out on the paused clock.
    let outcome = engine.run_to_end(fixture.id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    let uuid = recorded_value(&recorded, "uuid");
    let now = recorded_value(&recorded, "now");
    assert_eq!(
        outcome.output,
        Some(Value::String(format!(
            "hold-acme/42/shipped-acme/{}/{}",
            uuid.as_str().unwrap(),
            now.as_u64().unwrap()
        ))),
        "the journaled time and uuid replay as recorded"
    );
    // Only the step after the sleep ran; the two done before were replayed.
    let done = effects.all();
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(done[0].starts_with("ship acme "), "{done:?}");
    for old in &fixture.old_effects {
        let key = old.rsplit(' ').next().unwrap();
        assert!(
            !done[0].ends_with(key),
            "ship got the key of an earlier step: {done:?} vs {old}"
        );
    }
    let history = engine.history(fixture.id).await.unwrap();
    assert_eq!(
        started_steps(&history),
        ["place_hold", "charge", "ship"],
        "{:?}",
        kinds(&history)
    );
    // The recorded history is untouched, the new events follow it.
    assert_eq!(&history[..recorded.len()], &recorded[..]);

    let state = engine.state(fixture.id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(state.journal_format, 1, "the saga keeps its format");
    let folded = SagaState::fold(fixture.id, &history).unwrap();
    assert_eq!(folded.journal_format, 1);
    assert_eq!(folded.status, SagaStatus::Completed);
}

#[tokio::test(start_paused = true)]
async fn a_compensating_format_1_saga_finishes_undoing_in_the_old_order() {
    let fixture = fixture(COMPENSATING);
    let recorded = decode_events(&fixture.events);
    assert_eq!(
        compensated_steps(&recorded),
        [(3, "charge".to_owned())],
        "the fixture has one undo recorded"
    );
    let store = MemoryStore::new();
    load(&store, &fixture).await;
    let effects = Effects::default();
    let engine = engine(Arc::new(store.clone()), &effects);

    let outcome = engine.run_to_end(fixture.id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated, "{outcome:?}");
    // The refund was recorded: it is not repeated. The hold is released, with the key the
    // old run used for it (the old run applied it, then crashed before recording it).
    let done = effects.all();
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(
        done[0].starts_with("release globex hold-globex "),
        "{done:?}"
    );
    let old_release = fixture
        .old_effects
        .iter()
        .find(|e| e.starts_with("release "))
        .unwrap();
    assert_eq!(&done[0], old_release, "same undo, same idempotency key");

    let history = engine.history(fixture.id).await.unwrap();
    assert_eq!(&history[..recorded.len()], &recorded[..]);
    assert_eq!(
        compensated_steps(&history),
        [(3, "charge".to_owned()), (0, "place_hold".to_owned())],
        "reverse order of the steps, as the old engine had it: {:?}",
        kinds(&history)
    );
    assert!(
        !started_steps(&history[recorded.len()..])
            .iter()
            .any(|s| s == "ship"),
        "the failed step is not run again"
    );
    let folded = SagaState::fold(fixture.id, &history).unwrap();
    assert_eq!(folded.journal_format, 1);
    assert_eq!(folded.status, SagaStatus::Compensated);
    let state = engine.state(fixture.id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Compensated);
    assert_eq!(state.journal_format, 1);
}

#[tokio::test(start_paused = true)]
async fn a_completed_format_1_saga_reads_back() {
    let fixture = fixture(COMPLETED);
    let store = MemoryStore::new();
    load(&store, &fixture).await;
    let effects = Effects::default();
    let engine = engine(Arc::new(store.clone()), &effects);

    let state = engine.state(fixture.id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(state.journal_format, 1);
    assert_eq!(
        state.journal.len(),
        6,
        "the journal is rebuilt from the history"
    );
    let outcome = engine.outcome(fixture.id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    // Running it again does nothing.
    let again = engine.run_to_end(fixture.id).await.unwrap();
    assert_eq!(again.status, SagaStatus::Completed);
    assert!(effects.all().is_empty(), "{:?}", effects.all());
    let history = engine.history(fixture.id).await.unwrap();
    assert_eq!(history, decode_events(&fixture.events));
}

/// Sets `journal_format: 3` in the stored state and in `SagaStarted`.
fn from_the_future(fixture: &mut Fixture) {
    let mut state: Value = serde_json::from_str(&fixture.state).unwrap();
    state["journal_format"] = Value::from(3);
    fixture.state = state.to_string();
    let mut started: Value = serde_json::from_str(&fixture.events[0]).unwrap();
    started["journal_format"] = Value::from(3);
    fixture.events[0] = started.to_string();
}

#[tokio::test(start_paused = true)]
async fn a_saga_in_a_newer_journal_format_is_not_run() {
    let mut fixture = fixture(SUSPENDED);
    from_the_future(&mut fixture);
    let store = MemoryStore::new();
    load(&store, &fixture).await;
    let effects = Effects::default();
    let engine = engine(Arc::new(store.clone()), &effects);

    // Past the sleep: were it run, it would ship and complete.
    tokio::time::advance(Duration::from_secs(2 * 3600)).await;
    let run = engine.run_once(fixture.id).await;
    let stored = store.load(fixture.id).await.unwrap().unwrap();
    assert!(
        effects.all().is_empty(),
        "a saga written in journal format 3 was run by a format-{} engine: {:?} (run: {run:?})",
        saga_core::JOURNAL_FORMAT,
        effects.all()
    );
    assert_ne!(stored.status, SagaStatus::Completed, "run: {run:?}");
    let Err(saga_core::EngineError::Quarantined { reason, .. }) = &run else {
        panic!("expected the saga to be quarantined, got {run:?}");
    };
    assert!(
        reason.contains("format 3") && reason.contains("newer"),
        "the reason names the format: {reason}"
    );
    let why = stored.quarantined.as_deref().unwrap_or_default();
    assert_eq!(why, reason, "the stored reason is the one returned");
    assert_eq!(stored.status, SagaStatus::Running, "set aside, not failed");
}
