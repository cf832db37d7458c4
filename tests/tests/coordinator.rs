//! The coordinator runtime: several coordinators sharing a store, wake-ups, graceful
//! shutdown, durable timers across coordinator replacement, and `Engine::wait`.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use saga_core::{
    Coordinator, CoordinatorReport, Engine, EngineError, EventKind, Phase, SagaId, SagaStatus,
    StartOptions, StepStatus,
};
use saga_tests::{
    Behavior, Gate, Harness, Plan, PlanSaga, StepOutput, count, fast_policy, single_terminal,
    started_attempts, until,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const HOUR: Duration = Duration::from_secs(3600);

/// A coordinator running in a task, stopped through a oneshot.
struct Running {
    engine: Engine,
    stop: oneshot::Sender<()>,
    task: JoinHandle<CoordinatorReport>,
}

impl Running {
    fn spawn(coordinator: Coordinator, engine: Engine) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(coordinator.run(async {
            let _ = stopped.await;
        }));
        Self { engine, stop, task }
    }

    /// Asks it to stop and waits for its report.
    async fn stop(self) -> CoordinatorReport {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// An engine on the harness store with its own owner id.
fn engine_as(h: &Harness, plan: Plan, owner: &str, lease: Duration) -> Engine {
    h.builder(plan)
        .owner(owner)
        .lease_ttl(lease)
        .build()
        .unwrap()
}

async fn start(client: &Engine, seed: u32) -> SagaId {
    client
        .start_with::<PlanSaga>(&seed, StartOptions::default())
        .await
        .unwrap()
        .id
}

// Real time and several threads: this is the one test where two coordinators race for
// the same due sagas for real. Nothing is timed; every wait is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_coordinators_share_200_sagas_and_run_each_effect_once() {
    let h = Harness::new();
    // Every saga's step 1 fails once (10 ms backoff), so each saga holds a worker for a
    // while and neither coordinator can take all the work.
    h.script.forward(1, [Behavior::Transient]);
    let plan = Plan::linear(3);
    let client = h.engine(plan.clone());
    let a = engine_as(&h, plan.clone(), "coordinator-a", Duration::from_secs(30));
    let b = engine_as(&h, plan, "coordinator-b", Duration::from_secs(30));
    let a = Running::spawn(
        Coordinator::new(a.clone())
            .workers(8)
            .poll_interval(Duration::from_millis(20)),
        a,
    );
    let b = Running::spawn(
        Coordinator::new(b.clone())
            .workers(8)
            .poll_interval(Duration::from_millis(20)),
        b,
    );

    let mut ids = Vec::new();
    for seed in 0..200 {
        ids.push(start(&client, seed).await);
    }
    for id in &ids {
        let outcome = client.wait(*id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed, "saga {id}");
        let outputs: Vec<StepOutput> = outcome.output().unwrap().unwrap();
        assert_eq!(outputs.len(), 3);
    }
    let report_a = a.stop().await;
    let report_b = b.stop().await;

    assert!(
        report_a.finished > 0,
        "coordinator a did no work: {report_a:?}"
    );
    assert!(
        report_b.finished > 0,
        "coordinator b did no work: {report_b:?}"
    );
    // Leases (30 s) never lapse here and nothing suspends, so every saga ran exactly once:
    // no re-runs to explain.
    assert_eq!(report_a.finished + report_b.finished, 200);
    assert_eq!(report_a.runs + report_b.runs, 200);
    for report in [&report_a, &report_b] {
        assert_eq!(
            (
                report.suspended,
                report.interrupted,
                report.errors,
                report.released_at_shutdown
            ),
            (0, 0, 0, 0),
            "{report:?}"
        );
    }

    // Every forward effect exactly once; no compensation.
    let effects = h.ledger.effects_in(Phase::Forward);
    assert_eq!(effects.len(), 600);
    let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for effect in &effects {
        *per_key.entry(effect.key.as_str()).or_default() += 1;
    }
    assert_eq!(per_key.len(), 600);
    assert!(per_key.values().all(|n| *n == 1));
    let sagas: HashSet<SagaId> = effects.iter().map(|e| e.saga).collect();
    assert_eq!(sagas.len(), 200);
    assert!(h.ledger.effects_in(Phase::Compensate).is_empty());
    // Each saga was claimed once, by one of the two.
    for id in &ids {
        let history = client.history(*id).await.unwrap();
        assert_eq!(count(&history, "LeaseAcquired"), 1);
        assert_eq!(single_terminal(&history), "SagaCompleted");
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_coordinator_is_woken_by_the_store_not_by_its_poll() {
    let h = Harness::new();
    let plan = Plan::linear(2);
    let client = h.engine(plan.clone());
    let worker = engine_as(&h, plan, "coordinator-a", Duration::from_secs(30));
    let running = Running::spawn(Coordinator::new(worker.clone()).poll_interval(HOUR), worker);
    // Let it look once, find nothing and go idle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!running.task.is_finished());

    let begun = Instant::now();
    let id = start(&client, 1).await;
    let outcome = client.wait(id, 2 * HOUR).await.unwrap();
    let took = begun.elapsed();

    assert_eq!(outcome.status, SagaStatus::Completed);
    assert!(
        took < Duration::from_secs(1),
        "picked up after {took:?} of virtual time: the poll (1 h) found it, not the wake-up"
    );
    let report = running.stop().await;
    assert_eq!((report.runs, report.finished), (1, 1));
}

/// Starts `n` sagas whose step 1 waits at `gate`, on a coordinator owned by `a`, and waits
/// until every one of them is inside that step.
async fn block_in_step_1(
    h: &Harness,
    n: u32,
    gate: &std::sync::Arc<Gate>,
    grace: Duration,
) -> (Engine, Running, Vec<SagaId>) {
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let plan = Plan::linear(3);
    let client = h.engine(plan.clone());
    let a = engine_as(h, plan, "coordinator-a", HOUR);
    let running = Running::spawn(
        Coordinator::new(a.clone()).workers(4).shutdown_grace(grace),
        a,
    );
    let mut ids = Vec::new();
    for seed in 0..n {
        ids.push(start(&client, seed * 10).await);
    }
    let ledger = h.ledger.clone();
    until("every saga is in step 1", 1000, || {
        ledger.calls_of(1, Phase::Forward).len() == n as usize
    })
    .await;
    (client, running, ids)
}

#[tokio::test(start_paused = true)]
async fn shutdown_releases_the_leases_of_blocked_sagas_and_another_coordinator_resumes_at_once() {
    let h = Harness::new();
    let gate = Gate::new();
    let (client, a, ids) = block_in_step_1(&h, 3, &gate, Duration::from_millis(100)).await;

    // The steps never finish within the grace period: A aborts them and releases the leases.
    let report = a.stop().await;
    assert_eq!(report.runs, 3);
    assert_eq!(report.released_at_shutdown, 3, "{report:?}");
    assert_eq!(report.finished, 0);
    for id in &ids {
        let stored = client.store().load(*id).await.unwrap().unwrap();
        assert_eq!(stored.lease, None, "the lease was released");
        assert!(stored.due_at.is_some_and(|due| due <= h.now()));
    }

    // B holds leases for an hour, as A did: it can only start at once because A released.
    let plan = Plan::linear(3);
    let b = engine_as(&h, plan, "coordinator-b", HOUR);
    let b = Running::spawn(Coordinator::new(b.clone()), b);
    let begun = Instant::now();
    for id in &ids {
        let outcome = client.wait(*id, 2 * HOUR).await.unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed);
    }
    let took = begun.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "took {took:?} of virtual time"
    );
    let report = b.stop().await;
    assert_eq!((report.runs, report.finished), (3, 3));

    for id in &ids {
        // Step 1 ran twice (the cut-off attempt and its re-run), same attempt, same key;
        // its effect was applied once, by the re-run.
        let calls: Vec<_> = h
            .ledger
            .calls_of(1, Phase::Forward)
            .into_iter()
            .filter(|c| c.saga == *id)
            .collect();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].key, calls[1].key);
        assert_eq!((calls[0].attempt, calls[1].attempt), (1, 1));
        assert_eq!(
            (calls[0].behavior, calls[1].behavior),
            ("wait_then_ok", "ok")
        );
        let effects: Vec<_> = h
            .ledger
            .effects_of(1, Phase::Forward)
            .into_iter()
            .filter(|e| e.saga == *id)
            .collect();
        assert_eq!(effects.len(), 1);
        let history = client.history(*id).await.unwrap();
        assert_eq!(started_attempts(&history, 1), [1, 1]);
        assert_eq!(count(&history, "SagaResumed"), 1);
        assert_eq!(single_terminal(&history), "SagaCompleted");
        // Steps 0 and 2 ran once each.
        for step in [0, 2] {
            assert_eq!(h.ledger.invocations(*id, step, Phase::Forward), 1);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_step_that_finishes_within_the_grace_is_recorded_and_not_run_again() {
    let h = Harness::new();
    let gate = Gate::new();
    let (client, a, ids) = block_in_step_1(&h, 3, &gate, HOUR).await;

    // Shutdown begins while the steps are in flight; then they finish.
    let engine_a = a.engine.clone();
    let _ = a.stop.send(());
    until("A begins its shutdown", 1000, || {
        engine_a.is_shutting_down()
    })
    .await;
    gate.release.notify_waiters();
    let report = a.task.await.unwrap();
    assert_eq!(report.runs, 3);
    assert_eq!(
        report.interrupted, 3,
        "each stopped at its next boundary: {report:?}"
    );
    assert_eq!((report.finished, report.released_at_shutdown), (0, 0));
    for id in &ids {
        let stored = client.store().load(*id).await.unwrap().unwrap();
        assert_eq!(stored.lease, None, "released at the step boundary");
        assert!(stored.due_at.is_some_and(|due| due <= h.now()));
        let state = client.state(*id).await.unwrap();
        assert_eq!(state.status, SagaStatus::Running);
        assert_eq!(state.journal.len(), 2, "step 2 was not started");
        assert_eq!(state.journal[1].status, StepStatus::Succeeded);
    }

    let b = engine_as(&h, Plan::linear(3), "coordinator-b", HOUR);
    let b = Running::spawn(Coordinator::new(b.clone()), b);
    let begun = Instant::now();
    for id in &ids {
        let outcome = client.wait(*id, 2 * HOUR).await.unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed);
    }
    assert!(begun.elapsed() < Duration::from_secs(1));
    let report = b.stop().await;
    assert_eq!((report.runs, report.finished), (3, 3));

    for id in &ids {
        for step in 0..3 {
            assert_eq!(
                h.ledger.invocations(*id, step, Phase::Forward),
                1,
                "step {step} ran once"
            );
        }
        let history = client.history(*id).await.unwrap();
        assert_eq!(started_attempts(&history, 1), [1]);
        // Step 2 started under B's lease.
        let b_claim = history
            .iter()
            .position(|e| matches!(&e.kind, EventKind::LeaseAcquired { owner, .. } if owner == "coordinator-b"))
            .unwrap();
        let step_2 = history
            .iter()
            .position(|e| matches!(e.kind, EventKind::StepStarted { position: 2, .. }))
            .unwrap();
        assert!(b_claim < step_2);
        assert_eq!(single_terminal(&history), "SagaCompleted");
    }
}

#[tokio::test(start_paused = true)]
async fn a_durable_timer_survives_replacing_every_coordinator() {
    let h = Harness::new();
    let after = Duration::from_secs(3);
    h.script
        .forward(1, [Behavior::RetryAfter(after), Behavior::Ok]);
    let plan = Plan::linear(3).with(1, |s| s.policy = fast_policy(5));
    let build = |owner: &str| {
        h.builder(plan.clone())
            .owner(owner)
            .inline_wait_max(Duration::from_millis(100))
            .build()
            .unwrap()
    };
    let client = build("client");
    let a = build("coordinator-a");
    let a = Running::spawn(Coordinator::new(a.clone()), a);
    let id = start(&client, 0).await;
    let ledger = h.ledger.clone();
    until("attempt 1 of step 1 failed", 1000, || {
        ledger.calls_of(1, Phase::Forward).len() == 1
    })
    .await;
    // Let the failure be committed as a durable timer.
    let mut suspended = false;
    for _ in 0..100 {
        let state = client.state(id).await.unwrap();
        if state
            .journal
            .get(1)
            .is_some_and(|r| r.status == StepStatus::Retrying)
        {
            suspended = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(suspended, "the retry was not committed as a timer");
    let report = a.stop().await;
    assert_eq!((report.runs, report.suspended), (1, 1), "{report:?}");
    assert_eq!(report.released_at_shutdown, 0);

    // Nothing runs the saga for a while.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = build("coordinator-b");
    let poll = Duration::from_millis(250);
    let b = Running::spawn(Coordinator::new(b.clone()).poll_interval(poll), b);
    let outcome = client.wait(id, HOUR).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let report = b.stop().await;
    assert_eq!((report.runs, report.finished), (1, 1), "{report:?}");

    let calls = h.ledger.calls_of(1, Phase::Forward);
    assert_eq!(calls.iter().map(|c| c.attempt).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(calls[0].key, calls[1].key);
    let gap = calls[1].at - calls[0].at;
    assert!(gap >= after, "the retry ran {gap:?} after the failure");
    assert!(
        gap <= after + poll + Duration::from_millis(50),
        "late: {gap:?}"
    );
    let history = client.history(id).await.unwrap();
    assert_eq!(started_attempts(&history, 1), [1, 2]);
    assert_eq!(single_terminal(&history), "SagaCompleted");
}

#[tokio::test(start_paused = true)]
async fn wait_returns_once_a_coordinator_finishes_the_saga() {
    let h = Harness::new();
    let plan = Plan::linear(2);
    let client = h.engine(plan.clone());
    let id = start(&client, 4).await;

    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.wait(id, HOUR).await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiter.is_finished(), "nothing runs the saga yet");

    let worker = engine_as(&h, plan, "coordinator-a", Duration::from_secs(30));
    let running = Running::spawn(Coordinator::new(worker.clone()), worker);
    let begun = Instant::now();
    let outcome = waiter.await.unwrap().unwrap();
    assert!(begun.elapsed() < Duration::from_secs(1));
    assert_eq!(outcome.status, SagaStatus::Completed);
    let outputs: Vec<StepOutput> = outcome.output().unwrap().unwrap();
    assert_eq!(outputs.iter().map(|o| o.input).collect::<Vec<_>>(), [4, 5]);
    // A terminal saga answers at once.
    assert_eq!(client.wait(id, Duration::ZERO).await.unwrap(), outcome);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn wait_times_out_when_nothing_runs_the_saga() {
    let h = Harness::new();
    let client = h.engine(Plan::linear(2));
    let id = start(&client, 0).await;

    let begun = Instant::now();
    let err = client.wait(id, Duration::from_secs(5)).await.unwrap_err();
    assert!(
        matches!(err, EngineError::WaitTimedOut { saga, status: SagaStatus::Running } if saga == id),
        "{err:?}"
    );
    let waited = begun.elapsed();
    assert!(waited >= Duration::from_secs(5), "gave up after {waited:?}");
    assert!(waited < Duration::from_secs(6), "gave up after {waited:?}");
    assert!(h.ledger.calls().is_empty());

    let unknown = SagaId::random();
    assert!(matches!(
        client.wait(unknown, Duration::from_secs(1)).await,
        Err(EngineError::NotFound(missing)) if missing == unknown
    ));
}

#[tokio::test(start_paused = true)]
async fn a_coordinator_on_a_shut_down_engine_runs_nothing_and_returns_at_once() {
    let h = Harness::new();
    let plan = Plan::linear(2);
    let worker = engine_as(&h, plan.clone(), "coordinator-a", Duration::from_secs(30));
    let first = Running::spawn(Coordinator::new(worker.clone()), worker.clone());
    first.stop().await;
    assert!(
        worker.is_shutting_down(),
        "a coordinator's shutdown shuts its engine down"
    );
    let client = h.engine(plan.clone());
    let id = start(&client, 1).await;

    // The stopped coordinator's engine again: returns without claiming, instead of claiming
    // the due saga, stopping it at once and claiming it again for ever.
    let report = Coordinator::new(worker)
        .run(std::future::pending::<()>())
        .await;
    assert_eq!(report.runs, 0, "{report:?}");
    let history = client.history(id).await.unwrap();
    assert_eq!(count(&history, "LeaseAcquired"), 0, "{history:?}");

    // A shutdown begun elsewhere while a coordinator runs ends that coordinator too.
    let engine = engine_as(&h, plan, "coordinator-b", Duration::from_secs(30));
    let running = Running::spawn(Coordinator::new(engine.clone()), engine.clone());
    let outcome = client.wait(id, HOUR).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let second = start(&client, 2).await;
    client.wait(second, HOUR).await.unwrap();
    engine.begin_shutdown();
    let third = start(&client, 3).await;
    let report = running.task.await.unwrap();
    assert!(
        report.runs <= 3,
        "at most the sagas due when it stopped: {report:?}"
    );
    let history = client.history(third).await.unwrap();
    assert!(
        count(&history, "LeaseAcquired") <= 1,
        "the third saga is not claimed over and over: {history:?}"
    );
    drop(running.stop);
}
