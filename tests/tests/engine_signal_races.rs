//! Signals racing timeouts, on memory with paused time.
//!
//! The engine's rule (see `SagaContext::wait_for_signal`): a wait takes the oldest signal of
//! its name in the inbox that no earlier wait took **and that was sent by the wait's
//! deadline**. The signal and the timeout race only until one of them is recorded, and what
//! counts for the signal is when it was sent, not when the saga looked: a signal sent before
//! the deadline wins even when the saga runs only after the deadline (it resumed late); a
//! signal sent after the deadline is left in the inbox for the next wait of that name. Waits
//! of the same name take signals in delivery order; a wait of another name takes none.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use saga_core::{
    Engine, EventKind, MemoryStore, Outcome, RunOutcome, Saga, SagaContext, SagaError, SagaId,
    SagaStore,
};
use saga_tests::kinds;

const HOUR: Duration = Duration::from_secs(3600);

/// Waits twice: for `first` then for `go`, each up to an hour.
struct TwoWaits;

impl Saga for TwoWaits {
    /// The name of the first wait.
    type Input = String;
    type Output = (Option<u32>, Option<u32>);
    const NAME: &'static str = "two_waits";

    async fn run(
        &self,
        saga: &mut SagaContext,
        first: String,
    ) -> Result<(Option<u32>, Option<u32>), SagaError> {
        let a = saga.wait_for_signal::<u32>(&first, HOUR).await?;
        let b = saga.wait_for_signal::<u32>("go", HOUR).await?;
        Ok((a, b))
    }
}

fn engine(store: Arc<dyn SagaStore>) -> Engine {
    Engine::builder_shared(store)
        .register(TwoWaits)
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap()
}

async fn started(engine: &Engine, first: &str) -> SagaId {
    let id = engine.start(TwoWaits, first.to_owned()).await.unwrap().id();
    let run = engine.run_once(id).await.unwrap();
    assert!(matches!(run, RunOutcome::Suspended(_)), "{run:?}");
    id
}

async fn send(engine: &Engine, id: SagaId, name: &str, value: u32) {
    engine
        .signal(id, name, &value, &format!("{name}-{value}"))
        .await
        .unwrap();
}

async fn end(engine: &Engine, id: SagaId) -> Outcome<(Option<u32>, Option<u32>)> {
    engine
        .handle::<TwoWaits>(id)
        .await
        .unwrap()
        .run_to_end()
        .await
        .unwrap()
}

/// The sequence numbers the waits took, in journal order (`None` for a timeout).
async fn taken(engine: &Engine, id: SagaId) -> Vec<Option<u64>> {
    engine
        .history(id)
        .await
        .unwrap()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ValueRecorded { name, value, .. } if name.starts_with("signal:") => {
                Some(value.get("sequence").and_then(serde_json::Value::as_u64))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_signal_sent_after_the_timeout_was_recorded_goes_to_the_next_wait() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let id = started(&engine, "go").await;
    // The first wait times out (recorded), the second starts waiting.
    tokio::time::advance(HOUR + Duration::from_secs(1)).await;
    let run = engine.run_once(id).await.unwrap();
    assert!(matches!(run, RunOutcome::Suspended(_)), "{run:?}");
    send(&engine, id, "go", 7).await;
    assert_eq!(end(&engine, id).await, Outcome::Completed((None, Some(7))));
    assert_eq!(taken(&engine, id).await, [None, Some(1)]);
}

#[tokio::test(start_paused = true)]
async fn a_signal_sent_after_the_deadline_but_before_the_saga_looked_goes_to_the_next_wait() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let id = started(&engine, "go").await;
    tokio::time::advance(HOUR + Duration::from_secs(1)).await;
    // Sent past the first deadline, before the saga ran again: too late for the first wait.
    send(&engine, id, "go", 7).await;
    assert_eq!(end(&engine, id).await, Outcome::Completed((None, Some(7))));
    let history = engine.history(id).await.unwrap();
    assert_eq!(
        taken(&engine, id).await,
        [None, Some(1)],
        "{:?}",
        kinds(&history)
    );
}

#[tokio::test(start_paused = true)]
async fn a_signal_sent_before_the_deadline_and_seen_after_it_wins_over_the_timeout() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let id = started(&engine, "go").await;
    send(&engine, id, "go", 7).await;
    // The saga resumes late: its deadline has passed by the time it looks.
    tokio::time::advance(2 * HOUR).await;
    let outcome = end(&engine, id).await;
    // The second wait (deadline an hour after the late resume) times out.
    assert_eq!(outcome, Outcome::Completed((Some(7), None)));
    assert_eq!(taken(&engine, id).await, [Some(1), None]);
}

#[tokio::test(start_paused = true)]
async fn two_waits_of_one_name_take_two_signals_in_delivery_order() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let id = engine.start(TwoWaits, "go".to_owned()).await.unwrap().id();
    send(&engine, id, "go", 2).await;
    send(&engine, id, "go", 1).await;
    assert_eq!(
        end(&engine, id).await,
        Outcome::Completed((Some(2), Some(1)))
    );
    assert_eq!(taken(&engine, id).await, [Some(1), Some(2)]);
}

#[tokio::test(start_paused = true)]
async fn a_wait_of_another_name_does_not_take_the_signal() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let id = engine
        .start(TwoWaits, "other".to_owned())
        .await
        .unwrap()
        .id();
    send(&engine, id, "go", 5).await;
    // The `other` wait ignores the `go` signal and waits.
    let run = engine.run_once(id).await.unwrap();
    assert!(matches!(run, RunOutcome::Suspended(_)), "{run:?}");
    tokio::time::advance(HOUR + Duration::from_secs(1)).await;
    assert_eq!(end(&engine, id).await, Outcome::Completed((None, Some(5))));
    assert_eq!(taken(&engine, id).await, [None, Some(1)]);
}
