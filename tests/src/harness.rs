//! Engines over a shared store, clock, script and ledger, and history helpers.

use std::sync::Arc;
use std::time::Duration;

use saga_core::{
    Clock, Engine, EngineBuilder, EventKind, MemoryStore, RetryPolicy, SagaEvent, SagaId,
    SagaState, SagaStore, Timestamp, TokioClock,
};

use crate::{Ledger, Plan, PlanSaga, Script};

/// The owner id of every engine a [`Harness`] builds. Engines built later with the same id
/// model the same coordinator after a restart: they may reclaim its leases at once.
pub const OWNER: &str = "coordinator-1";

/// A store, a clock, a script and a ledger shared by every engine built from it.
///
/// Create it inside the tokio runtime: the clock follows tokio's (paused) clock, and the
/// store and every engine read that one clock, so timestamps from different engines compare.
#[derive(Clone, Debug)]
pub struct Harness {
    /// The clock of the store and of every engine.
    pub clock: Arc<TokioClock>,
    /// The store (clones share data).
    pub store: MemoryStore,
    /// The script every scripted step follows.
    pub script: Script,
    /// Where scripted steps record what they did.
    pub ledger: Ledger,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A fresh store, script and ledger.
    #[must_use]
    pub fn new() -> Self {
        let clock = Arc::new(TokioClock::new());
        let store = MemoryStore::with_clock(Arc::clone(&clock) as Arc<dyn Clock>);
        Self {
            clock,
            store,
            script: Script::new(),
            ledger: Ledger::new(),
        }
    }

    /// The current time on the shared clock.
    #[must_use]
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// An engine builder on this harness's store, running `plan` as [`PlanSaga`], owner
    /// [`OWNER`], with store retries cut to 2 quick attempts.
    #[must_use]
    pub fn builder(&self, plan: Plan) -> EngineBuilder {
        self.builder_on(Arc::new(self.store.clone()), plan)
    }

    /// As [`Harness::builder`], on another store handle (a [`CrashingStore`](crate::CrashingStore)
    /// around this harness's store, say).
    #[must_use]
    pub fn builder_on(&self, store: Arc<dyn SagaStore>, plan: Plan) -> EngineBuilder {
        Engine::builder_shared(store)
            .register(PlanSaga { plan })
            .resource(self.script.clone())
            .resource(self.ledger.clone())
            .clock(Arc::clone(&self.clock) as Arc<dyn Clock>)
            .owner(OWNER)
            .store_retry(
                RetryPolicy::default()
                    .with_max_attempts(2)
                    .with_initial_delay(Duration::from_millis(1))
                    .with_max_delay(Duration::from_millis(1)),
            )
    }

    /// [`Harness::builder`], built.
    #[must_use]
    pub fn engine(&self, plan: Plan) -> Engine {
        self.builder(plan)
            .build()
            .expect("valid engine configuration")
    }
}

/// The event type names of a history, in order.
#[must_use]
pub fn kinds(history: &[SagaEvent]) -> Vec<&'static str> {
    history.iter().map(|e| e.kind.name()).collect()
}

/// How many events of type `name` a history holds.
#[must_use]
pub fn count(history: &[SagaEvent], name: &str) -> usize {
    history.iter().filter(|e| e.kind.name() == name).count()
}

/// The events of type `name`, in order.
#[must_use]
pub fn events_named<'a>(history: &'a [SagaEvent], name: &str) -> Vec<&'a SagaEvent> {
    history.iter().filter(|e| e.kind.name() == name).collect()
}

/// Asserts that the history holds exactly one terminal event and that it is the last one
/// (nothing is appended to a finished saga, not even a refused cancel request); returns its
/// type name.
///
/// # Panics
/// When it does not.
#[must_use]
pub fn single_terminal(history: &[SagaEvent]) -> &'static str {
    let terminal: Vec<usize> = history
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            matches!(
                e.kind.name(),
                "SagaCompleted" | "SagaCompensated" | "SagaFailed"
            )
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        terminal.len(),
        1,
        "expected exactly one terminal event in {:?}",
        kinds(history)
    );
    assert_eq!(
        terminal[0],
        history.len() - 1,
        "the terminal event must be last: {:?}",
        kinds(history)
    );
    history[terminal[0]].kind.name()
}

/// Asserts that folding the saga's history gives exactly the state the store holds, and
/// returns that state.
///
/// # Panics
/// When the history does not fold or the two differ.
pub async fn assert_fold_matches(engine: &Engine, id: SagaId) -> SagaState {
    let state = engine.state(id).await.expect("state loads");
    let history = engine.history(id).await.expect("history loads");
    let folded = SagaState::fold(id, &history).expect("history folds");
    assert_eq!(
        folded, state,
        "state folded from the history differs from the stored state"
    );
    state
}

/// The positions of `StepCompensated` events, in history order.
#[must_use]
pub fn compensated_positions(history: &[SagaEvent]) -> Vec<u32> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepCompensated { position, .. } => Some(*position),
            _ => None,
        })
        .collect()
}

/// The positions of `CompensationSkipped` events, in history order.
#[must_use]
pub fn skipped_positions(history: &[SagaEvent]) -> Vec<u32> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::CompensationSkipped { position, .. } => Some(*position),
            _ => None,
        })
        .collect()
}

/// The attempt numbers of the `StepStarted` events at `position`, in history order.
#[must_use]
pub fn started_attempts(history: &[SagaEvent], position: u32) -> Vec<u32> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepStarted {
                position: p,
                attempt,
                ..
            } if *p == position => Some(*attempt),
            _ => None,
        })
        .collect()
}

/// Waits (on tokio's clock, in 1 ms steps, at most `limit` of them) until `cond` holds: a
/// bounded wait on a condition, never a sleep standing in for one.
///
/// # Panics
/// When `cond` still does not hold after `limit` steps.
pub async fn until(what: &str, limit: u32, mut cond: impl FnMut() -> bool) {
    for _ in 0..limit {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert!(cond(), "timed out waiting until {what}");
}
