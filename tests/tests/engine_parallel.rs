//! Parallel branches: `SagaContext::all` / `map` / `join` run steps at once; each branch has
//! the journal position of its index; a branch that fails for good stops the others and every
//! completed step is compensated in reverse order of completion; a crash mid-block resumes
//! without running the done branches again. Paused time orders completions deterministically.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use saga_core::{
    Branch, Engine, HttpStatus, MemoryStore, Outcome, Parallel, Saga, SagaContext, SagaError,
    SagaStore, StepContext, saga_step,
};
use saga_tests::CrashingStore;
use saga_tests::{Effects, effects};

/// Pulls one source for a company; takes `millis` of (paused) time; a negative `millis`
/// fails for good after that long.
#[saga_step(compensate = drop_pull, timeout = "none")]
async fn pull(ctx: &StepContext, source: (String, i64)) -> Result<String, HttpStatus> {
    let (name, millis) = source;
    tokio::time::sleep(Duration::from_millis(millis.unsigned_abs())).await;
    if millis < 0 {
        return Err(HttpStatus::new(400));
    }
    effects(ctx)?.push(format!("pull {name}"));
    Ok(format!("data-{name}"))
}

async fn drop_pull(
    ctx: &StepContext,
    _source: (String, i64),
    data: String,
) -> Result<(), HttpStatus> {
    effects(ctx)?.push(format!("drop {data}"));
    Ok(())
}

#[saga_step(no_compensation, timeout = "none")]
async fn score(ctx: &StepContext, data: Vec<String>) -> Result<usize, HttpStatus> {
    if data.iter().any(|d| d.contains("reject")) {
        return Err(HttpStatus::new(422));
    }
    effects(ctx)?.push(format!("score {}", data.join(",")));
    Ok(data.len())
}

/// Pulls every source at once (at most `limit` at a time), then scores them.
struct Sourcing;

impl Saga for Sourcing {
    type Input = (Vec<(String, i64)>, usize);
    type Output = Vec<String>;
    const NAME: &'static str = "sourcing";

    async fn run(
        &self,
        saga: &mut SagaContext,
        (sources, limit): Self::Input,
    ) -> Result<Vec<String>, SagaError> {
        let data = saga.map(limit, sources, |s| Branch::new(Pull, s)).await?;
        saga.run(Score, data.clone()).await?;
        Ok(data)
    }
}

fn engine(store: Arc<dyn SagaStore>, effects: &Effects) -> Engine {
    Engine::builder_shared(store)
        .register(Sourcing)
        .resource(effects.clone())
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap()
}

fn sources(list: &[(&str, i64)]) -> Vec<(String, i64)> {
    list.iter().map(|(n, ms)| ((*n).to_owned(), *ms)).collect()
}

#[tokio::test(start_paused = true)]
async fn branches_run_at_once_and_return_in_branch_order() {
    let effects = Effects::default();
    let engine = engine(Arc::new(MemoryStore::new()), &effects);
    let input = (sources(&[("a", 30), ("b", 10), ("c", 20)]), 8);
    let outcome = engine
        .start(Sourcing, input)
        .await
        .unwrap()
        .run_to_end()
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Completed(vec!["data-a".into(), "data-b".into(), "data-c".into()])
    );
    assert_eq!(
        effects.all(),
        ["pull b", "pull c", "pull a", "score data-a,data-b,data-c"],
        "completion order follows the durations; the outputs follow the branch order"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_step_after_the_block_undoes_branches_in_reverse_completion_order() {
    let effects = Effects::default();
    let engine = engine(Arc::new(MemoryStore::new()), &effects);
    let input = (sources(&[("a", 30), ("reject", 10), ("c", 20)]), 8);
    let handle = engine.start(Sourcing, input).await.unwrap();
    let outcome = handle.run_to_end().await.unwrap();
    assert!(
        matches!(outcome, Outcome::Compensated { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        effects.all(),
        [
            "pull reject",
            "pull c",
            "pull a",
            "drop data-a",
            "drop data-c",
            "drop data-reject"
        ]
    );
    let timeline = saga_core::timeline::render(&handle.history().await.unwrap());
    assert!(
        timeline.contains("parallel block: 3 branches at #1..#3"),
        "{timeline}"
    );
    assert!(timeline.contains("[branch 2/3] #2 pull"), "{timeline}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_branch_stops_the_others_and_compensates_the_completed_ones() {
    let effects = Effects::default();
    let engine = engine(Arc::new(MemoryStore::new()), &effects);
    // Two at a time: a (10 ms) and the failing b (-20 ms) start; c starts when a is done;
    // b fails while c runs (c finishes, then compensation); d never starts.
    let input = (sources(&[("a", 10), ("b", -20), ("c", 30), ("d", 5)]), 2);
    let handle = engine.start(Sourcing, input).await.unwrap();
    let outcome = handle.run_to_end().await.unwrap();
    assert!(
        matches!(outcome, Outcome::Compensated { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        effects.all(),
        ["pull a", "pull c", "drop data-c", "drop data-a"],
        "d never started; the completed a and c are undone newest first"
    );
}

#[tokio::test(start_paused = true)]
async fn let_others_finish_runs_every_branch_before_compensating() {
    struct Patient;
    impl Saga for Patient {
        type Input = Vec<(String, i64)>;
        type Output = Vec<String>;
        const NAME: &'static str = "patient";
        async fn run(
            &self,
            saga: &mut SagaContext,
            sources: Self::Input,
        ) -> Result<Vec<String>, SagaError> {
            let branches = sources.into_iter().map(|s| Branch::new(Pull, s));
            saga.all_with(Parallel::new().limit(1).let_others_finish(), branches)
                .await
        }
    }
    let effects = Effects::default();
    let engine = Engine::builder_shared(Arc::new(MemoryStore::new()))
        .register(Patient)
        .resource(effects.clone())
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap();
    let input = sources(&[("a", 10), ("b", -20), ("c", 30)]);
    let outcome = engine
        .start(Patient, input)
        .await
        .unwrap()
        .run_to_end()
        .await
        .unwrap();
    assert!(
        matches!(outcome, Outcome::Compensated { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        effects.all(),
        ["pull a", "pull c", "drop data-c", "drop data-a"]
    );
}

#[tokio::test(start_paused = true)]
async fn join_runs_different_steps_together() {
    #[saga_step(no_compensation, timeout = "none")]
    async fn count(_ctx: &StepContext, n: u32) -> Result<u32, HttpStatus> {
        Ok(n * 2)
    }
    struct Joined;
    impl Saga for Joined {
        type Input = ();
        type Output = (String, u32);
        const NAME: &'static str = "joined";
        async fn run(&self, saga: &mut SagaContext, (): ()) -> Result<(String, u32), SagaError> {
            saga.join((
                Branch::new(Pull, ("x".to_owned(), 5)),
                Branch::new(Count, 21),
            ))
            .await
        }
    }
    let effects = Effects::default();
    let engine = Engine::builder_shared(Arc::new(MemoryStore::new()))
        .register(Joined)
        .resource(effects.clone())
        .build()
        .unwrap();
    let outcome = engine
        .start(Joined, ())
        .await
        .unwrap()
        .run_to_end()
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Completed(("data-x".to_owned(), 42)));
}

/// A crash after every number of commits in turn: the resumed saga completes, and no
/// branch that was recorded done runs again.
#[tokio::test(start_paused = true)]
async fn a_crash_at_every_commit_resumes_without_rerunning_done_branches() {
    for allowed in 1..12 {
        let memory = MemoryStore::new();
        let effects = Effects::default();
        let crashing: Arc<dyn SagaStore> =
            Arc::new(CrashingStore::after_commits(memory.clone(), allowed));
        let doomed = Engine::builder_shared(crashing)
            .register(Sourcing)
            .resource(effects.clone())
            .owner("doomed")
            .lease_ttl(Duration::from_millis(300))
            .inline_wait_max(Duration::from_millis(50))
            .build()
            .unwrap();
        let input = (sources(&[("a", 30), ("b", 10), ("c", 20), ("d", 5)]), 2);
        let handle = doomed.start(Sourcing, input).await.unwrap();
        // The run either crashes mid-way or (when more commits are allowed than it makes)
        // completes; either way a fresh engine brings the saga to its end.
        let _ = doomed.run_once(handle.id()).await;
        // The crashed run's lease lapses: paused time is advanced, not waited for.
        tokio::time::advance(Duration::from_millis(400)).await;
        let resumed = engine(Arc::new(memory), &effects);
        let outcome = resumed.run_to_end(handle.id()).await.unwrap();
        assert_eq!(
            outcome.status,
            saga_core::SagaStatus::Completed,
            "crash after {allowed} commits"
        );
        let all = effects.all();
        for source in ["a", "b", "c", "d"] {
            let pulls = all
                .iter()
                .filter(|e| **e == format!("pull {source}"))
                .count();
            assert!(
                (1..=2).contains(&pulls),
                "crash after {allowed}: {source} pulled {pulls} times: {all:?}"
            );
        }
        // A branch whose success was committed before the crash never runs again.
        let history = resumed.history(handle.id()).await.unwrap();
        let succeeded: Vec<u32> = history
            .iter()
            .filter_map(|e| match &e.kind {
                saga_core::EventKind::StepSucceeded { position, .. } => Some(*position),
                _ => None,
            })
            .collect();
        let mut unique = succeeded.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            succeeded.len(),
            unique.len(),
            "crash after {allowed}: a success recorded twice"
        );
    }
}

/// Fails transiently on its first attempt, then succeeds; the retry waits a minute.
#[saga_step(
    compensate = drop_flaky,
    timeout = "none",
    retry(max_attempts = 3, initial = "60s", max = "60s", jitter = "none")
)]
async fn flaky_pull(ctx: &StepContext, name: String) -> Result<String, HttpStatus> {
    if ctx.attempt() == 1 {
        return Err(HttpStatus::new(503));
    }
    effects(ctx)?.push(format!("pull {name}"));
    Ok(format!("data-{name}"))
}

async fn drop_flaky(ctx: &StepContext, _name: String, data: String) -> Result<(), HttpStatus> {
    effects(ctx)?.push(format!("drop {data}"));
    Ok(())
}

/// A branch's long backoff is a durable timer: the run ends suspended (no lease, no worker
/// held), and the saga completes when it is due.
#[tokio::test(start_paused = true)]
async fn a_long_branch_backoff_is_a_durable_timer() {
    struct Backoff;
    impl Saga for Backoff {
        type Input = ();
        type Output = Vec<String>;
        const NAME: &'static str = "backoff";
        async fn run(&self, saga: &mut SagaContext, (): ()) -> Result<Vec<String>, SagaError> {
            let names = ["a".to_owned(), "b".to_owned()];
            saga.map(2, names, |n| Branch::new(FlakyPull, n)).await
        }
    }
    let store = Arc::new(MemoryStore::new());
    let effects = Effects::default();
    let engine = Engine::builder_shared(Arc::clone(&store) as Arc<dyn SagaStore>)
        .register(Backoff)
        .resource(effects.clone())
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap();
    let handle = engine.start(Backoff, ()).await.unwrap();
    let first = engine.run_once(handle.id()).await.unwrap();
    assert!(
        matches!(first, saga_core::RunOutcome::Suspended(_)),
        "both branches wait a minute: the run suspends, got {first:?}"
    );
    assert!(
        store
            .load(handle.id())
            .await
            .unwrap()
            .unwrap()
            .lease
            .is_none()
    );
    let outcome = handle.run_to_end().await.unwrap();
    assert_eq!(
        outcome,
        Outcome::Completed(vec!["data-a".into(), "data-b".into()])
    );
    assert_eq!(effects.all(), ["pull a", "pull b"]);
}

/// A crash right after one branch failed for good, while another was still running: on
/// resume the one cut off is resolved (run again with its key) before the compensation, so
/// its effect is undone rather than left behind.
#[tokio::test(start_paused = true)]
async fn a_branch_cut_off_while_the_block_wound_down_is_resolved_then_undone() {
    let memory = MemoryStore::new();
    let effects = Effects::default();
    // Commit 1 starts a and b; commit 2 records b's failure; a's success (commit 3) is lost.
    let crashing: Arc<dyn SagaStore> = Arc::new(CrashingStore::after_commits(memory.clone(), 2));
    let doomed = Engine::builder_shared(crashing)
        .register(Sourcing)
        .resource(effects.clone())
        .lease_ttl(Duration::from_millis(300))
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap();
    let input = (sources(&[("a", 30), ("b", -10)]), 2);
    let handle = doomed.start(Sourcing, input).await.unwrap();
    assert!(
        doomed.run_once(handle.id()).await.is_err(),
        "the run crashes"
    );
    tokio::time::advance(Duration::from_millis(400)).await;
    let resumed = engine(Arc::new(memory), &effects);
    let outcome = resumed.run_to_end(handle.id()).await.unwrap();
    assert_eq!(outcome.status, saga_core::SagaStatus::Compensated);
    assert_eq!(
        effects.all(),
        ["pull a", "pull a", "drop data-a"],
        "a ran again with its key (its effect is idempotent by key), then was undone"
    );
}

/// Past the pivot, a branch that fails for good ends the saga `Failed`, compensating nothing.
#[tokio::test(start_paused = true)]
async fn a_branch_failing_past_the_pivot_fails_the_saga_without_compensating() {
    #[saga_step(pivot, timeout = "none")]
    async fn sign_term_sheet(ctx: &StepContext, company: String) -> Result<String, HttpStatus> {
        effects(ctx)?.push(format!("sign {company}"));
        Ok(company)
    }
    struct Signed;
    impl Saga for Signed {
        type Input = Vec<(String, i64)>;
        type Output = Vec<String>;
        const NAME: &'static str = "signed";
        async fn run(
            &self,
            saga: &mut SagaContext,
            sources: Self::Input,
        ) -> Result<Vec<String>, SagaError> {
            saga.run(SignTermSheet, "acme".to_owned()).await?;
            saga.all(sources.into_iter().map(|s| Branch::new(Pull, s)))
                .await
        }
    }
    let effects = Effects::default();
    let engine = Engine::builder_shared(Arc::new(MemoryStore::new()))
        .register(Signed)
        .resource(effects.clone())
        .build()
        .unwrap();
    let input = sources(&[("a", 5), ("b", -10)]);
    let outcome = engine
        .start(Signed, input)
        .await
        .unwrap()
        .run_to_end()
        .await
        .unwrap();
    assert!(
        matches!(
            &outcome,
            Outcome::Failed {
                kind: saga_core::FailureKind::AfterPivot,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(
        effects.all(),
        ["sign acme", "pull a"],
        "nothing undone past the pivot"
    );
}

/// On a real redis-server (AOF always): a block whose next step fails is undone in reverse
/// order of completion, as the history records them, whatever the real timings were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_branches_compensate_in_reverse_completion_order() {
    use saga_redis::RedisStore;
    use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers};
    if !can_spawn_servers("redis_branches_compensate_in_reverse_completion_order") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    let store: Arc<dyn SagaStore> = Arc::new(
        RedisStore::builder()
            .url(server.url())
            .key_prefix("parallel")
            .connect()
            .await
            .expect("connect to the test redis-server"),
    );
    let effects = Effects::default();
    let engine = engine(store, &effects);
    let input = (sources(&[("a", 3), ("reject", 1), ("c", 2), ("d", 0)]), 3);
    let handle = engine.start(Sourcing, input).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), handle.run_to_end())
        .await
        .expect("the saga ends")
        .unwrap();
    assert!(
        matches!(outcome, Outcome::Compensated { .. }),
        "{outcome:?}"
    );
    let history = handle.history().await.unwrap();
    let order = |wanted: &str| -> Vec<u32> {
        history
            .iter()
            .filter(|e| e.kind.name() == wanted)
            .filter_map(|e| match &e.kind {
                saga_core::EventKind::StepSucceeded { position, .. }
                | saga_core::EventKind::StepCompensated { position, .. } => Some(*position),
                _ => None,
            })
            .filter(|position| (1..=4).contains(position))
            .collect()
    };
    let mut undone = order("StepCompensated");
    undone.reverse();
    assert_eq!(
        order("StepSucceeded"),
        undone,
        "undone newest completion first"
    );
    assert_eq!(undone.len(), 4, "every branch was undone");
}
