//! A crash at every commit boundary inside each workflow primitive: a signal wait (the
//! signal sent before the crash, or after it), a durable sleep, a child saga started and
//! waited for (and a parent that compensates after its child completed), and a parallel
//! block followed by a failing step. For each `k = 1, 2, …` a "doomed" engine runs on a
//! store that dies after `k` commits; then a fresh engine on what was durable brings every
//! saga to its end. The loop stops at the first `k` at which the doomed run no longer
//! crashes.
//!
//! After each resume: every saga is terminal with the expected status; each step applied its
//! effect under exactly one idempotency key (the ledger is idempotent by key, as a real
//! downstream API would be, so a replay with the same key is harmless and one with a new key
//! shows up); a compensated saga has undone every effect it applied (each undo under one
//! key of its own).
//! Paused time; `run_due` rounds play the coordinator.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use saga_core::store::ListQuery;
use saga_core::{
    Branch, Engine, HttpStatus, MemoryStore, Outcome, Saga, SagaContext, SagaError, SagaId,
    SagaStatus, SagaStore, StepContext, saga_step,
};
use saga_tests::CrashingStore;

/// The keys each (phase, step) was applied with.
type Applied = BTreeMap<(String, String), BTreeSet<String>>;

/// Effects applied downstream, by what they are and the idempotency key they came with.
#[derive(Clone, Debug, Default)]
struct Ledger(Arc<Mutex<Applied>>);

impl Ledger {
    fn apply(&self, phase: &str, what: &str, key: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((phase.to_owned(), what.to_owned()))
            .or_default()
            .insert(key.to_owned());
    }

    fn keys(&self, phase: &str, what: &str) -> BTreeSet<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(phase.to_owned(), what.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    fn all(&self) -> Applied {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn ledger(ctx: &StepContext) -> Result<Ledger, HttpStatus> {
    ctx.resource::<Ledger>()
        .cloned()
        .map_err(|_| HttpStatus::new(500))
}

#[saga_step(compensate = unbook, timeout = "none")]
async fn book(ctx: &StepContext, what: String) -> Result<String, HttpStatus> {
    ledger(ctx)?.apply("do", &what, ctx.idempotency_key());
    Ok(format!("booked-{what}"))
}

async fn unbook(ctx: &StepContext, what: String, _booked: String) -> Result<(), HttpStatus> {
    ledger(ctx)?.apply("undo", &what, ctx.idempotency_key());
    Ok(())
}

#[saga_step(no_compensation, timeout = "none")]
async fn refuse(_ctx: &StepContext, _what: String) -> Result<(), HttpStatus> {
    Err(HttpStatus::new(400))
}

/// Books, waits (up to 30 days) for `go`, books again with its payload.
struct SignalSaga;

impl Saga for SignalSaga {
    type Input = ();
    type Output = u32;
    const NAME: &'static str = "crash_signal";

    async fn run(&self, saga: &mut SagaContext, (): ()) -> Result<u32, SagaError> {
        saga.run(Book, "s1".into()).await?;
        let Some(go) = saga
            .wait_for_signal::<u32>("go", Duration::from_secs(30 * 24 * 3600))
            .await?
        else {
            return Err(SagaError::Aborted("no go".into()));
        };
        saga.run(Book, format!("s2-{go}")).await?;
        Ok(go)
    }
}

/// Books, sleeps an hour (a durable timer), books again.
struct SleepSaga;

impl Saga for SleepSaga {
    type Input = ();
    type Output = ();
    const NAME: &'static str = "crash_sleep";

    async fn run(&self, saga: &mut SagaContext, (): ()) -> Result<(), SagaError> {
        saga.run(Book, "z1".into()).await?;
        saga.sleep(Duration::from_secs(3600)).await?;
        saga.run(Book, "z2".into()).await?;
        Ok(())
    }
}

/// The child: two bookings.
struct ChildSaga;

impl Saga for ChildSaga {
    type Input = ();
    type Output = String;
    const NAME: &'static str = "crash_child";

    async fn run(&self, saga: &mut SagaContext, (): ()) -> Result<String, SagaError> {
        saga.run(Book, "c1".into()).await?;
        saga.run(Book, "c2".into()).await
    }
}

/// Books, runs a child, then books again or (`fail`) fails for good and compensates
/// (undoing the completed child too).
struct ParentSaga;

impl Saga for ParentSaga {
    type Input = bool;
    type Output = String;
    const NAME: &'static str = "crash_parent";

    async fn run(&self, saga: &mut SagaContext, fail: bool) -> Result<String, SagaError> {
        saga.run(Book, "p1".into()).await?;
        let Outcome::Completed(child) = saga.child(ChildSaga, ()).await? else {
            return Err(SagaError::Aborted("the child did not complete".into()));
        };
        if fail {
            saga.run(Refuse, "p2".into()).await?;
        }
        saga.run(Book, "p2".into()).await?;
        Ok(child)
    }
}

/// Three bookings at once, then a step that fails for good.
struct ParallelSaga;

impl Saga for ParallelSaga {
    type Input = ();
    type Output = ();
    const NAME: &'static str = "crash_parallel";

    async fn run(&self, saga: &mut SagaContext, (): ()) -> Result<(), SagaError> {
        let branches = ["b0", "b1", "b2"].map(|b| Branch::new(Book, b.to_owned()));
        saga.all(branches).await?;
        saga.run(Refuse, "after".into()).await?;
        Ok(())
    }
}

fn engine(store: Arc<dyn SagaStore>, ledger: &Ledger, owner: &str) -> Engine {
    Engine::builder_shared(store)
        .register(SignalSaga)
        .register(SleepSaga)
        .register(ChildSaga)
        .register(ParentSaga)
        .register(ParallelSaga)
        .resource(ledger.clone())
        .owner(owner)
        .lease_ttl(Duration::from_millis(300))
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap()
}

/// Advanced on the paused clock when nothing is due.
const IDLE_STEP: Duration = Duration::from_secs(600);

/// The doomed coordinator: `run_due` rounds until the store dies, or nothing has been due
/// for a while (a saga waiting for a signal that is not sent yet).
async fn drive_doomed(engine: &Engine, crashing: &CrashingStore<MemoryStore>) {
    let mut idle = 0;
    for _ in 0..500 {
        if crashing.crashed() {
            return;
        }
        match engine.run_due(16).await {
            Err(_) => return,
            Ok(results) if results.is_empty() => {
                idle += 1;
                if idle > 30 {
                    return;
                }
                tokio::time::advance(IDLE_STEP).await;
            }
            Ok(_) => idle = 0,
        }
    }
}

async fn statuses(store: &MemoryStore) -> BTreeMap<SagaId, (String, SagaStatus)> {
    let query = ListQuery {
        limit: 100,
        ..ListQuery::default()
    };
    store
        .list(&query)
        .await
        .unwrap()
        .sagas
        .into_iter()
        .map(|s| (s.id, (s.saga_type, s.status)))
        .collect()
}

/// The fresh coordinator: `run_due` rounds until every saga is terminal.
async fn drive_to_the_end(engine: &Engine, store: &MemoryStore, what: &str) {
    for _ in 0..2000 {
        let all = statuses(store).await;
        if all.values().all(|(_, s)| s.is_terminal()) {
            return;
        }
        match engine.run_due(16).await {
            Ok(results) if results.is_empty() => tokio::time::advance(IDLE_STEP).await,
            Ok(_) => {}
            Err(err) => panic!("{what}: the fresh engine's claim failed: {err}"),
        }
    }
    panic!("{what}: not every saga ended: {:?}", statuses(store).await);
}

/// When the scenario's signal is sent.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Send {
    None,
    BeforeTheCrash,
    AfterTheCrash,
}

/// Runs the scenario once per crash point; `check` looks at what each resume left.
async fn every_crash_point<F, Fut>(
    name: &str,
    send: Send,
    start: F,
    check: impl Fn(&str, &Ledger, &BTreeMap<SagaId, (String, SagaStatus)>),
) where
    F: Fn(Engine) -> Fut,
    Fut: std::future::Future<Output = SagaId>,
{
    for k in 1..300 {
        let what = format!("{name}, crash after {k} commits");
        let memory = MemoryStore::new();
        let ledger = Ledger::default();
        let crashing = Arc::new(CrashingStore::after_commits(memory.clone(), k));
        let doomed = engine(crashing.clone(), &ledger, "doomed");
        let id = start(doomed.clone()).await;
        if send == Send::BeforeTheCrash {
            doomed.signal(id, "go", &7_u32, "go-7").await.unwrap();
        }
        drive_doomed(&doomed, &crashing).await;
        let crashed = crashing.crashed();
        drop(doomed);
        // The doomed engine's leases lapse.
        tokio::time::advance(Duration::from_secs(1)).await;
        let fresh = engine(Arc::new(memory.clone()), &ledger, "fresh");
        if send == Send::AfterTheCrash {
            fresh.signal(id, "go", &7_u32, "go-7").await.unwrap();
        }
        drive_to_the_end(&fresh, &memory, &what).await;
        let all = statuses(&memory).await;
        check(&what, &ledger, &all);
        // Every effect under one key; every undo with the key of its effect.
        for ((phase, step), keys) in ledger.all() {
            assert_eq!(keys.len(), 1, "{what}: {phase} {step} under {keys:?}");
        }
        if !crashed {
            return;
        }
    }
    panic!("{name}: still crashing after 300 commits");
}

fn assert_done(what: &str, ledger: &Ledger, steps: &[&str]) {
    for step in steps {
        assert_eq!(
            ledger.keys("do", step).len(),
            1,
            "{what}: {step} not done once: {:?}",
            ledger.all()
        );
        assert!(
            ledger.keys("undo", step).is_empty(),
            "{what}: {step} undone: {:?}",
            ledger.all()
        );
    }
}

fn assert_undone(what: &str, ledger: &Ledger, steps: &[&str]) {
    for step in steps {
        // An undo has a key of its own (derived from the step's), one per step.
        assert_eq!(
            ledger.keys("do", step).len(),
            1,
            "{what}: {step}: {:?}",
            ledger.all()
        );
        assert_eq!(
            ledger.keys("undo", step).len(),
            1,
            "{what}: {step} not undone once: {:?}",
            ledger.all()
        );
    }
    for ((phase, step), _) in ledger.all() {
        if phase == "do" {
            assert!(steps.contains(&step.as_str()), "{what}: unexpected {step}");
        }
    }
}

fn only(what: &str, all: &BTreeMap<SagaId, (String, SagaStatus)>, expected: &[(&str, SagaStatus)]) {
    let mut got: Vec<(String, SagaStatus)> = all.values().cloned().collect();
    got.sort();
    let mut want: Vec<(String, SagaStatus)> = expected
        .iter()
        .map(|(t, s)| ((*t).to_owned(), *s))
        .collect();
    want.sort();
    assert_eq!(got, want, "{what}");
}

#[tokio::test(start_paused = true)]
async fn a_crash_anywhere_in_a_signal_wait_with_the_signal_sent_first() {
    every_crash_point(
        "signal sent first",
        Send::BeforeTheCrash,
        |e| async move { e.start(SignalSaga, ()).await.unwrap().id() },
        |what, ledger, all| {
            only(what, all, &[("crash_signal", SagaStatus::Completed)]);
            assert_done(what, ledger, &["s1", "s2-7"]);
        },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_anywhere_in_a_signal_wait_with_the_signal_sent_after_the_crash() {
    every_crash_point(
        "signal sent after the crash",
        Send::AfterTheCrash,
        |e| async move { e.start(SignalSaga, ()).await.unwrap().id() },
        |what, ledger, all| {
            only(what, all, &[("crash_signal", SagaStatus::Completed)]);
            assert_done(what, ledger, &["s1", "s2-7"]);
        },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_anywhere_in_a_durable_sleep() {
    every_crash_point(
        "durable sleep",
        Send::None,
        |e| async move { e.start(SleepSaga, ()).await.unwrap().id() },
        |what, ledger, all| {
            only(what, all, &[("crash_sleep", SagaStatus::Completed)]);
            assert_done(what, ledger, &["z1", "z2"]);
        },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_anywhere_in_a_child_start_and_wait() {
    every_crash_point(
        "child",
        Send::None,
        |e| async move { e.start(ParentSaga, false).await.unwrap().id() },
        |what, ledger, all| {
            only(
                what,
                all,
                &[
                    ("crash_parent", SagaStatus::Completed),
                    ("crash_child", SagaStatus::Completed),
                ],
            );
            assert_done(what, ledger, &["p1", "c1", "c2", "p2"]);
        },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_anywhere_in_a_parent_that_compensates_its_completed_child() {
    every_crash_point(
        "compensating parent",
        Send::None,
        |e| async move { e.start(ParentSaga, true).await.unwrap().id() },
        |what, ledger, all| {
            only(
                what,
                all,
                &[
                    ("crash_parent", SagaStatus::Compensated),
                    ("crash_child", SagaStatus::Compensated),
                ],
            );
            assert_undone(what, ledger, &["p1", "c1", "c2"]);
        },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_anywhere_in_a_parallel_block_then_a_failing_step() {
    every_crash_point(
        "parallel then failure",
        Send::None,
        |e| async move { e.start(ParallelSaga, ()).await.unwrap().id() },
        |what, ledger, all| {
            only(what, all, &[("crash_parallel", SagaStatus::Compensated)]);
            assert_undone(what, ledger, &["b0", "b1", "b2"]);
        },
    )
    .await;
}
