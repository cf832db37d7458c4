//! Properties of parallel blocks over random inputs: branch durations (a permutation, so a
//! random completion order), a concurrency limit of 1 to 4, and a failing branch (or none).
//!
//! - the outputs come back in branch order;
//! - branch `i` is journaled at `first + i` (its `StepStarted` and `StepSucceeded`), where
//!   `first` follows the block's `parallel` value;
//! - when a branch fails, the undos (`StepCompensated`) run in exactly the reverse order of
//!   the successes (`StepSucceeded`) in the history;
//! - a crash at a random commit and a resume by a fresh engine end like an uninterrupted run
//!   of the same input: same status and output, and every branch output recorded in both
//!   runs is the same (with no failure, every branch is recorded in both); a resumed
//!   compensation undoes every step that succeeded.
//!
//! Each case runs on its own current-thread runtime with paused time.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use saga_core::{
    Branch, Engine, EventKind, HttpStatus, MemoryStore, Parallel, Saga, SagaContext, SagaError,
    SagaEvent, SagaId, SagaOutcome, SagaState, SagaStatus, SagaStore, StepContext, saga_step,
};
use saga_tests::{CrashingStore, kinds};
use serde_json::Value;

/// One branch: its index, how long it takes (paused time), whether it fails for good.
#[saga_step(compensate = undo_work, timeout = "none")]
async fn work(_ctx: &StepContext, input: (usize, u64, bool)) -> Result<String, HttpStatus> {
    let (index, millis, fail) = input;
    tokio::time::sleep(Duration::from_millis(millis)).await;
    if fail {
        return Err(HttpStatus::new(400));
    }
    Ok(format!("out-{index}"))
}

async fn undo_work(
    _ctx: &StepContext,
    _input: (usize, u64, bool),
    _output: String,
) -> Result<(), HttpStatus> {
    Ok(())
}

/// One parallel block of `Work` branches.
struct Block;

impl Saga for Block {
    /// (branches as (millis, fail), limit)
    type Input = (Vec<(u64, bool)>, usize);
    type Output = Vec<String>;
    const NAME: &'static str = "property_block";

    async fn run(
        &self,
        saga: &mut SagaContext,
        (branches, limit): Self::Input,
    ) -> Result<Vec<String>, SagaError> {
        let branches = branches
            .into_iter()
            .enumerate()
            .map(|(i, (millis, fail))| Branch::new(Work, (i, millis, fail)));
        saga.all_with(Parallel::new().limit(limit), branches).await
    }
}

fn engine(store: Arc<dyn SagaStore>, owner: &str) -> Engine {
    Engine::builder_shared(store)
        .register(Block)
        .owner(owner)
        .lease_ttl(Duration::from_millis(300))
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// What one run left: its outcome, history, commits made and folded state.
struct Run {
    outcome: SagaOutcome,
    history: Vec<SagaEvent>,
    commits: usize,
    state: SagaState,
}

async fn uninterrupted(input: &(Vec<(u64, bool)>, usize)) -> Run {
    let memory = MemoryStore::new();
    let counting = Arc::new(CrashingStore::healthy(memory.clone()));
    let engine = engine(counting.clone(), "steady");
    let id = engine.start(Block, input.clone()).await.unwrap().id();
    let outcome = engine.run_to_end(id).await.unwrap();
    finish(&engine, id, outcome, counting.commits()).await
}

async fn finish(engine: &Engine, id: SagaId, outcome: SagaOutcome, commits: usize) -> Run {
    let history = engine.history(id).await.unwrap();
    let state = SagaState::fold(id, &history).unwrap();
    Run {
        outcome,
        history,
        commits,
        state,
    }
}

async fn crashed_then_resumed(input: &(Vec<(u64, bool)>, usize), allowed: usize) -> Run {
    let memory = MemoryStore::new();
    let crashing: Arc<dyn SagaStore> =
        Arc::new(CrashingStore::after_commits(memory.clone(), allowed));
    let doomed = engine(crashing, "doomed");
    let id = doomed.start(Block, input.clone()).await.unwrap().id();
    let _ = doomed.run_once(id).await;
    drop(doomed);
    // The crashed run's lease lapses on the paused clock.
    tokio::time::advance(Duration::from_secs(1)).await;
    let fresh = engine(Arc::new(memory), "fresh");
    let outcome = fresh.run_to_end(id).await.unwrap();
    finish(&fresh, id, outcome, 0).await
}

/// The journal position of the block's first branch.
fn first_branch(history: &[SagaEvent]) -> u32 {
    history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::ValueRecorded { name, position, .. } if name == "parallel" => {
                Some(position + 1)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no parallel block: {:?}", kinds(history)))
}

fn positions(history: &[SagaEvent], event: &str) -> Vec<u32> {
    history
        .iter()
        .filter(|e| e.kind.name() == event)
        .filter_map(|e| match &e.kind {
            EventKind::StepStarted { position, .. }
            | EventKind::StepSucceeded { position, .. }
            | EventKind::StepCompensated { position, .. } => Some(*position),
            _ => None,
        })
        .collect()
}

/// The branch index a `StepStarted` ran (its input's first element).
fn started_index(event: &SagaEvent) -> Option<(u32, usize)> {
    match &event.kind {
        EventKind::StepStarted {
            position, input, ..
        } => Some((*position, input.as_ref()?.get(0)?.as_u64()? as usize)),
        _ => None,
    }
}

/// The recorded output of each branch (`None` when it has none).
fn branch_outputs(run: &Run, count: usize) -> Vec<Option<Value>> {
    let first = first_branch(&run.history);
    (0..count)
        .map(|i| {
            let position = first + u32::try_from(i).unwrap();
            run.state.record(position).and_then(|r| r.output.clone())
        })
        .collect()
}

fn check_uninterrupted(input: &(Vec<(u64, bool)>, usize), run: &Run) {
    let (branches, _) = input;
    let history = &run.history;
    let first = first_branch(history);
    let failing = branches.iter().any(|(_, fail)| *fail);
    // Each branch at its index's position.
    assert_eq!(
        history.iter().filter_map(started_index).count(),
        positions(history, "StepStarted").len(),
        "every start names its branch"
    );
    assert!(!positions(history, "StepStarted").is_empty());
    for event in history {
        if let Some((position, index)) = started_index(event) {
            assert_eq!(
                position,
                first + u32::try_from(index).unwrap(),
                "branch {index} started at {position}: {:?}",
                kinds(history)
            );
        }
    }
    for position in positions(history, "StepSucceeded") {
        let index = (position - first) as usize;
        assert!(
            index < branches.len(),
            "success at {position} outside the block"
        );
        assert!(!branches[index].1, "the failing branch {index} succeeded");
    }
    if failing {
        assert_eq!(
            run.outcome.status,
            SagaStatus::Compensated,
            "{:?}",
            run.outcome
        );
        let mut succeeded = positions(history, "StepSucceeded");
        succeeded.reverse();
        assert_eq!(
            positions(history, "StepCompensated"),
            succeeded,
            "undos in reverse order of the successes: {:?}",
            kinds(history)
        );
    } else {
        assert_eq!(
            run.outcome.status,
            SagaStatus::Completed,
            "{:?}",
            run.outcome
        );
        let expected: Vec<Value> = (0..branches.len())
            .map(|i| Value::String(format!("out-{i}")))
            .collect();
        assert_eq!(
            run.outcome.output,
            Some(Value::Array(expected)),
            "branch order"
        );
        let mut succeeded = positions(history, "StepSucceeded");
        succeeded.sort_unstable();
        let all: Vec<u32> = (0..branches.len())
            .map(|i| first + u32::try_from(i).unwrap())
            .collect();
        assert_eq!(
            succeeded, all,
            "every branch succeeded once at its position"
        );
    }
}

fn check_resumed(input: &(Vec<(u64, bool)>, usize), steady: &Run, resumed: &Run, allowed: usize) {
    let count = input.0.len();
    assert_eq!(
        resumed.outcome.status,
        steady.outcome.status,
        "crash after {allowed} commits: {:?}",
        kinds(&resumed.history)
    );
    assert_eq!(
        resumed.outcome.output, steady.outcome.output,
        "crash after {allowed}"
    );
    let a = branch_outputs(steady, count);
    let b = branch_outputs(resumed, count);
    for i in 0..count {
        match (&a[i], &b[i]) {
            (Some(x), Some(y)) => assert_eq!(x, y, "branch {i}, crash after {allowed}"),
            (None, None) => {}
            (x, y) => assert!(
                steady.outcome.status == SagaStatus::Compensated,
                "branch {i} recorded {x:?} uninterrupted but {y:?} after a crash at {allowed}"
            ),
        }
    }
    if resumed.outcome.status == SagaStatus::Compensated {
        let mut succeeded: Vec<u32> = positions(&resumed.history, "StepSucceeded");
        succeeded.sort_unstable();
        succeeded.dedup();
        let mut undone = positions(&resumed.history, "StepCompensated");
        undone.sort_unstable();
        undone.dedup();
        assert_eq!(
            undone,
            succeeded,
            "every success undone after a crash at {allowed}: {:?}",
            kinds(&resumed.history)
        );
    }
}

fn case() -> impl Strategy<Value = ((Vec<(u64, bool)>, usize), f64)> {
    (2usize..=6)
        .prop_flat_map(|n| {
            (
                Just((1..=n as u64).collect::<Vec<u64>>()).prop_shuffle(),
                1usize..=4,
                proptest::option::of(0..n),
                0.0f64..1.0,
            )
        })
        .prop_map(|(durations, limit, failing, crash)| {
            let branches = durations
                .into_iter()
                .enumerate()
                .map(|(i, d)| (d * 10, failing == Some(i)))
                .collect();
            ((branches, limit), crash)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn parallel_blocks_keep_order_positions_and_replay((input, crash) in case()) {
        runtime().block_on(async {
            let steady = uninterrupted(&input).await;
            check_uninterrupted(&input, &steady);
            // A crash after 1 .. commits-1 commits (the last one would not crash).
            let span = steady.commits.saturating_sub(1).max(1);
            let allowed = 1 + ((crash * span as f64) as usize).min(span - 1);
            let resumed = crashed_then_resumed(&input, allowed).await;
            check_resumed(&input, &steady, &resumed, allowed);
        });
    }
}
