//! Every path that ends a saga records the same metric set: `saga_finished_total` and
//! `saga_duration_seconds`, both labelled with the terminal status.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use saga_core::{Engine, RunOutcome, SagaId, SagaStatus, StartOptions, telemetry};
use saga_tests::{Behavior, Harness, Plan, PlanSaga, fast_policy};

/// Remembers which metrics were recorded (a `counter!`/`histogram!` call registers its key
/// each time), by name and labels; the values do not matter here.
#[derive(Debug, Default, Clone)]
struct Capture(Arc<Mutex<Vec<Recorded>>>);

/// A metric's name and labels.
type Recorded = (String, Vec<(String, String)>);

impl Capture {
    fn note(&self, key: &Key) {
        let labels = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        self.0.lock().unwrap().push((key.name().to_owned(), labels));
    }

    /// Whether a metric named `name` was recorded since the last take.
    fn saw(&self, name: &str) -> bool {
        self.0.lock().unwrap().iter().any(|(n, _)| n == name)
    }

    /// The metrics recorded since the last call that carry a `status` label, as
    /// `(name, status)`.
    fn take_with_status(&self) -> BTreeSet<(String, String)> {
        std::mem::take(&mut *self.0.lock().unwrap())
            .into_iter()
            .filter_map(|(name, labels)| {
                let status = labels.into_iter().find(|(k, _)| k == "status")?.1;
                Some((name, status))
            })
            .collect()
    }
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.note(key);
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.note(key);
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.note(key);
        Histogram::noop()
    }
}

/// Waits a day for `approval`, or for an hour when the input says so (and times out).
struct AwaitsApproval;

impl saga_core::Saga for AwaitsApproval {
    type Input = bool;
    type Output = bool;
    const NAME: &'static str = "awaits_approval";

    async fn run(
        &self,
        saga: &mut saga_core::SagaContext,
        short: bool,
    ) -> Result<bool, saga_core::SagaError> {
        let wait = Duration::from_secs(if short { 3600 } else { 86_400 });
        Ok(saga
            .wait_for_signal::<bool>("approval", wait)
            .await?
            .is_some())
    }
}

/// Starts one child that waits briefly, and returns whether it was approved.
struct Parent;

impl saga_core::Saga for Parent {
    type Input = ();
    type Output = bool;
    const NAME: &'static str = "parent";

    async fn run(
        &self,
        saga: &mut saga_core::SagaContext,
        (): (),
    ) -> Result<bool, saga_core::SagaError> {
        let outcome = saga.child(AwaitsApproval, true).await?;
        Ok(matches!(outcome, saga_core::Outcome::Completed(true)))
    }
}

fn finish_set(status: &str) -> BTreeSet<(String, String)> {
    [telemetry::FINISHED_TOTAL, telemetry::DURATION_SECONDS]
        .into_iter()
        .map(|name| (name.to_owned(), status.to_owned()))
        .collect()
}

fn timer_engine(h: &Harness, plan: Plan) -> Engine {
    h.builder(plan)
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap()
}

/// Starts a saga whose step 1 waits on a durable timer, and runs it until it suspends.
async fn suspended(engine: &Engine) -> SagaId {
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert!(matches!(
        engine.run_once(id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    id
}

// One test in this binary: the recorder is process-wide.
#[tokio::test(start_paused = true)]
async fn every_finish_path_records_the_same_metric_set() {
    let capture = Capture::default();
    metrics::set_global_recorder(capture.clone()).unwrap();

    // Completed.
    let h = Harness::new();
    let outcome = h
        .engine(Plan::linear(2))
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(
        capture.take_with_status(),
        finish_set("completed"),
        "completed"
    );

    // Compensated: a step fails for good.
    let h = Harness::new();
    h.script.forward(1, [Behavior::Permanent]);
    let outcome = h
        .engine(Plan::linear(2))
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(!capture.saw(telemetry::COMPENSATION_FAILED_TOTAL));
    assert_eq!(
        capture.take_with_status(),
        finish_set("compensated"),
        "compensated"
    );

    // Failed: a compensation gives up.
    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    h.script.compensate(0, vec![Behavior::Transient; 5]);
    let plan = Plan::linear(3).with(0, |s| s.compensation_policy = fast_policy(2));
    let outcome = h
        .engine(plan)
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Failed);
    assert!(
        capture.saw(telemetry::COMPENSATION_FAILED_TOTAL),
        "a compensation that gave up is counted for alerting"
    );
    assert_eq!(
        capture.take_with_status(),
        finish_set("failed"),
        "compensation failed"
    );

    // Not finished: a workflow that diverged from its journal is set aside (quarantined),
    // counted as such, and records no finish.
    let h = Harness::new();
    h.script
        .forward(1, [Behavior::RetryAfter(Duration::from_secs(60))]);
    let id = suspended(&timer_engine(&h, Plan::linear(3))).await;
    let err = timer_engine(&h, Plan::of([0, 2, 1]))
        .run_to_end(id)
        .await
        .unwrap_err();
    assert!(
        matches!(err, saga_core::EngineError::Quarantined { .. }),
        "{err:?}"
    );
    assert!(
        capture.saw(telemetry::QUARANTINED_TOTAL),
        "non-deterministic"
    );
    assert!(!capture.saw(telemetry::FINISHED_TOTAL), "non-deterministic");
    capture.take_with_status();

    // The primitives' counters: a signal delivered and taken, a wait timed out by its
    // timer, a child started.
    let primitives = Engine::builder(saga_core::MemoryStore::new())
        .register(AwaitsApproval)
        .register(Parent)
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap();
    let waiting = primitives
        .start_with::<AwaitsApproval>(&false, StartOptions::default())
        .await
        .unwrap()
        .id;
    primitives
        .signal(waiting, "approval", &true, "k1")
        .await
        .unwrap();
    assert_eq!(
        primitives.run_to_end(waiting).await.unwrap().status,
        SagaStatus::Completed
    );
    let parent = primitives
        .start_with::<Parent>(&(), StartOptions::default())
        .await
        .unwrap()
        .id;
    // The parent starts its child and suspends; the child times out; the parent ends.
    assert!(matches!(
        primitives.run_once(parent).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    let child = primitives.state(parent).await.unwrap().children()[0].id;
    assert_eq!(
        primitives.run_to_end(child).await.unwrap().status,
        SagaStatus::Completed
    );
    assert_eq!(
        primitives.run_to_end(parent).await.unwrap().status,
        SagaStatus::Completed
    );
    for name in [
        telemetry::SIGNALS_TOTAL,
        telemetry::TIMERS_FIRED_TOTAL,
        telemetry::CHILDREN_STARTED_TOTAL,
    ] {
        assert!(capture.saw(name), "{name} was not recorded");
    }
    capture.take_with_status();

    // Failed: an operator abandons it.
    let h = Harness::new();
    h.script
        .forward(1, [Behavior::RetryAfter(Duration::from_secs(60))]);
    let engine = timer_engine(&h, Plan::linear(3));
    let id = suspended(&engine).await;
    capture.take_with_status();
    engine.abandon(id, "customer withdrew").await.unwrap();
    assert_eq!(engine.state(id).await.unwrap().status, SagaStatus::Failed);
    assert_eq!(
        capture.take_with_status(),
        finish_set("failed"),
        "abandoned"
    );
}
