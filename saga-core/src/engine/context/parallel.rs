//! Parallel branches: several steps at once, joined.
//!
//! A parallel block takes `1 + n` journal positions: a journaled value `parallel` recording
//! how many branches it has, then one position per branch, **by branch index** (branch `i` is
//! at `P + 1 + i` whatever order the branches finish in), so a replay finds every branch where
//! it was, and each branch's idempotency key never changes. Branches start in index order
//! (at most `limit` at a time); one commit records the starts of all branches that start
//! together, and one commit follows each branch's outcome (which also extends the lease).
//!
//! When a branch fails for good, the block stops starting branches and retrying them (or,
//! with [`Parallel::let_others_finish`], lets every other branch run its course), waits for
//! the attempts in flight, then records the compensation: every completed step of every
//! branch is undone in reverse order of completion (each step records its place in the
//! completion order). A crash with some branches done resumes without running them again;
//! the ones that were in flight run again with the same keys (after their reconciliation
//! check), exactly like a single step cut off mid-attempt.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{AttemptLog, Halt, Interruption, Mode, Registered, SagaContext, Slot};
use crate::engine::SagaError;
use crate::engine::definition::{ErasedStep, TypedStep};
use crate::engine::guarded::{Guarded, run_guarded};
use crate::engine::lease_keeper::LeaseKeeper;
use crate::store::Schedule;
use crate::{
    Compensation, CompensationReason, EventKind, GiveUpReason, Phase, Reconciled, RetryDecision,
    Step, StepError, Timestamp, step_idempotency_key,
};

/// The journaled-value name that opens a parallel block.
pub(crate) const PARALLEL: &str = "parallel";

/// One branch of a parallel block: a step and its input.
pub struct Branch<S: Step> {
    step: S,
    input: S::Input,
}

impl<S: Step> Branch<S> {
    /// The branch that runs `step` with `input`.
    pub fn new(step: S, input: S::Input) -> Self {
        Self { step, input }
    }
}

impl<S: Step> std::fmt::Debug for Branch<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Branch")
            .field("step", &S::NAME)
            .finish_non_exhaustive()
    }
}

/// What a parallel block does when one branch fails for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnBranchFailure {
    /// Start no more branches and retry none: the attempts in flight finish, then the saga
    /// compensates (the default).
    #[default]
    StopOthers,
    /// Let every other branch run its course (retries included), then compensate.
    LetOthersFinish,
}

/// How a parallel block runs: how many branches at once, and what a failure does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parallel {
    limit: usize,
    on_failure: OnBranchFailure,
}

impl Default for Parallel {
    fn default() -> Self {
        Self::new()
    }
}

impl Parallel {
    /// Every branch at once; a failure stops the others.
    #[must_use]
    pub fn new() -> Self {
        Self {
            limit: usize::MAX,
            on_failure: OnBranchFailure::StopOthers,
        }
    }

    /// At most `limit` branches at once (at least 1): a bounded fan-out, for a rate-limited
    /// API or a long list.
    #[must_use]
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit.max(1);
        self
    }

    /// When a branch fails for good, let the others run their course before compensating.
    #[must_use]
    pub fn let_others_finish(mut self) -> Self {
        self.on_failure = OnBranchFailure::LetOthersFinish;
        self
    }
}

mod sealed {
    /// A branch with its types erased. Public only inside a private module, so that
    /// [`Join`](super::Join) can name it without making it part of the API.
    pub struct ErasedBranch {
        pub(crate) name: &'static str,
        pub(crate) step: std::sync::Arc<dyn crate::engine::definition::ErasedStep>,
        pub(crate) input: Result<serde_json::Value, String>,
        pub(crate) pivot: bool,
    }

    /// The tuples [`Join`](super::Join) is implemented for.
    pub trait Branches {
        type Output;
        fn erase(self) -> Vec<ErasedBranch>;
        fn outputs(outputs: Vec<serde_json::Value>) -> Result<Self::Output, String>;
    }
}

use sealed::ErasedBranch;

/// A fixed set of branches of different steps, for [`SagaContext::join`]: a tuple of two to
/// four [`Branch`]es. The output is the tuple of their outputs.
pub trait Join: sealed::Branches {}

impl<T: sealed::Branches> Join for T {}

fn erase<S: Step>(branch: Branch<S>) -> ErasedBranch {
    let input = serde_json::to_value(&branch.input)
        .map_err(|err| format!("input of step `{}` does not encode: {err}", S::NAME));
    ErasedBranch {
        name: S::NAME,
        step: Arc::new(TypedStep(Arc::new(branch.step))),
        input,
        pivot: S::COMPENSATION == Compensation::Pivot,
    }
}

fn output<S: Step>(value: Value) -> Result<S::Output, String> {
    serde_json::from_value(value).map_err(|err| {
        format!(
            "the recorded output of step `{}` does not decode as its Output type: {err}",
            S::NAME
        )
    })
}

macro_rules! join_tuple {
    ($($step:ident $value:ident),+) => {
        impl<$($step: Step),+> sealed::Branches for ($(Branch<$step>,)+) {
            type Output = ($($step::Output,)+);

            #[allow(non_snake_case)]
            fn erase(self) -> Vec<ErasedBranch> {
                let ($($step,)+) = self;
                vec![$(erase($step)),+]
            }

            fn outputs(outputs: Vec<Value>) -> Result<Self::Output, String> {
                let mut outputs = outputs.into_iter();
                $(
                    let $value = output::<$step>(
                        outputs.next().ok_or_else(|| "a branch output is missing".to_owned())?,
                    )?;
                )+
                Ok(($($value,)+))
            }
        }
    };
}

join_tuple!(A a, B b);
join_tuple!(A a, B b, C c);
join_tuple!(A a, B b, C c, D d);

/// Where one branch stands in this run.
enum Progress {
    /// Not started in this run; `attempt` is the next attempt's number and `fresh` whether
    /// nothing is recorded for it; `ambiguous` when its last attempt was cut off mid-way.
    Ready {
        attempt: u32,
        fresh: bool,
        ambiguous: bool,
    },
    /// Waiting for its retry time.
    Waiting,
    /// An attempt is running.
    Running,
    /// Done, with its output.
    Done(Value),
    /// Failed for good, or stopped (the block is winding down).
    Stopped,
}

/// What a task of the block reports.
enum Event {
    Attempted {
        index: usize,
        attempt: u32,
        result: Result<Value, StepError>,
        seconds: f64,
    },
    RetryDue {
        index: usize,
    },
}

impl SagaContext {
    /// Runs every branch at once and returns their outputs in branch order (whatever order
    /// they finished in). See [`SagaContext::all_with`] for a concurrency limit and what a
    /// failure does.
    ///
    /// # Errors
    /// As [`SagaContext::run`]: a branch that fails for good returns
    /// [`SagaError::StepFailed`] once the others have stopped, and the saga compensates every
    /// completed step of every branch, newest completion first.
    pub async fn all<S: Step>(
        &mut self,
        branches: impl IntoIterator<Item = Branch<S>>,
    ) -> Result<Vec<S::Output>, SagaError> {
        self.all_with(Parallel::new(), branches).await
    }

    /// A bounded fan-out: one branch per item (`branch` makes it), at most `limit` at once,
    /// outputs in item order.
    ///
    /// # Errors
    /// As [`SagaContext::all`].
    pub async fn map<T, S: Step>(
        &mut self,
        limit: usize,
        items: impl IntoIterator<Item = T>,
        branch: impl FnMut(T) -> Branch<S>,
    ) -> Result<Vec<S::Output>, SagaError> {
        let branches: Vec<Branch<S>> = items.into_iter().map(branch).collect();
        self.all_with(Parallel::new().limit(limit), branches).await
    }

    /// Runs `branches` as `options` say (how many at once, what a failure does).
    ///
    /// # Errors
    /// As [`SagaContext::all`].
    pub async fn all_with<S: Step>(
        &mut self,
        options: Parallel,
        branches: impl IntoIterator<Item = Branch<S>>,
    ) -> Result<Vec<S::Output>, SagaError> {
        let erased: Vec<ErasedBranch> = branches.into_iter().map(erase).collect();
        let outputs = self.parallel(options, erased).await?;
        outputs
            .into_iter()
            .map(output::<S>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| {
                self.stop(Halt::NonDeterministic {
                    position: self.position,
                    message,
                })
            })
    }

    /// Runs a fixed set of branches of different steps at once:
    /// `let (profile, rounds) = saga.join((Branch::new(Crunchbase, id), Branch::new(PitchBook, id))).await?;`
    ///
    /// # Errors
    /// As [`SagaContext::all`].
    pub async fn join<J: Join>(&mut self, branches: J) -> Result<J::Output, SagaError> {
        self.join_with(Parallel::new(), branches).await
    }

    /// [`SagaContext::join`] with options.
    ///
    /// # Errors
    /// As [`SagaContext::all`].
    pub async fn join_with<J: Join>(
        &mut self,
        options: Parallel,
        branches: J,
    ) -> Result<J::Output, SagaError> {
        let outputs = self.parallel(options, branches.erase()).await?;
        J::outputs(outputs).map_err(|message| {
            self.stop(Halt::NonDeterministic {
                position: self.position,
                message,
            })
        })
    }

    /// The block: journals its size, then runs (or replays) its branches.
    async fn parallel(
        &mut self,
        options: Parallel,
        branches: Vec<ErasedBranch>,
    ) -> Result<Vec<Value>, SagaError> {
        if let Some(halt) = &self.halt {
            return Err(halt.to_error());
        }
        if let Some(pivot) = branches.iter().find(|b| b.pivot) {
            return Err(self.stop(Halt::BadData(format!(
                "step `{}` is a pivot and cannot run in a parallel branch: a point of no return must be one step the saga passes at a known place; run it on its own",
                pivot.name
            ))));
        }
        let count = branches.len();
        let size = self.journaled_value(PARALLEL, |_| serde_json::json!({ "branches": count }))?;
        let first = self.position;
        if size.get("branches").and_then(Value::as_u64) != Some(count as u64) {
            return Err(self.stop(Halt::NonDeterministic {
                position: first - 1,
                message: format!(
                    "the journal records a parallel block of {size} here but the workflow now runs {count} branches"
                ),
            }));
        }
        // Positions are reserved for every branch up front, so what follows the block has
        // the same position however the block went.
        self.position += u32::try_from(count).unwrap_or(u32::MAX);
        match self.run_branches(first, options, branches).await {
            Ok(outputs) => Ok(outputs),
            Err(halt) => Err(self.stop(halt)),
        }
    }

    async fn run_branches(
        &mut self,
        first: u32,
        options: Parallel,
        branches: Vec<ErasedBranch>,
    ) -> Result<Vec<Value>, Halt> {
        let mut progress = Vec::with_capacity(branches.len());
        let mut inputs = Vec::with_capacity(branches.len());
        for (index, branch) in branches.iter().enumerate() {
            let position = branch_position(first, index);
            let input = branch.input.clone().map_err(Halt::BadData)?;
            let slot = self.slot(position, branch.name, false, &input)?;
            progress.push(match slot {
                Slot::Replay { output } => {
                    self.register(position, &branch.step);
                    Progress::Done(output)
                }
                Slot::Fresh => Progress::Ready {
                    attempt: 1,
                    fresh: true,
                    ambiguous: false,
                },
                Slot::InFlight {
                    attempts,
                    ambiguous,
                    next_retry_at,
                    interruptions,
                } => {
                    self.register(position, &branch.step);
                    let limit = self.shared.config.max_interruptions;
                    if ambiguous && interruptions >= limit {
                        // An attempt that keeps taking its coordinator down (a crash, an OOM
                        // kill, a panic) would otherwise run again forever.
                        self.record(EventKind::StepFailed {
                            position,
                            step: branch.name.to_owned(),
                            attempt: attempts,
                            error: StepError {
                                message: format!(
                                    "attempt {attempts} was interrupted {} times (its coordinator stopped mid-attempt); giving up after max_interruptions = {limit}",
                                    interruptions + 1
                                ),
                                class: crate::ErrorClass::Permanent,
                                timeout: false,
                            },
                            reason: GiveUpReason::InterruptedTooOften,
                        })?;
                        Progress::Stopped
                    } else if ambiguous {
                        Progress::Ready {
                            attempt: attempts.max(1),
                            fresh: false,
                            ambiguous: true,
                        }
                    } else if next_retry_at.is_some_and(|at| at > self.shared.clock.now()) {
                        Progress::Waiting
                    } else {
                        Progress::Ready {
                            attempt: attempts + 1,
                            fresh: false,
                            ambiguous: false,
                        }
                    }
                }
                Slot::Failed => {
                    self.register(position, &branch.step);
                    Progress::Stopped
                }
            });
            inputs.push(input);
        }
        if self.mode == Mode::Collect {
            return match all_done(&progress) {
                Some(outputs) => Ok(outputs),
                None => Err(Halt::Collected),
            };
        }
        // A branch recorded as failed: a run stopped while the block was winding down.
        let failed = progress
            .iter()
            .position(|p| matches!(p, Progress::Stopped))
            .map(|index| (index, self.give_up_reason(branch_position(first, index))));
        let mut block = Block {
            first,
            limit: options.limit,
            on_failure: options.on_failure,
            branches: &branches,
            inputs: &inputs,
            progress,
            tasks: JoinSet::new(),
            timers: Vec::new(),
            failed,
            stopping: false,
        };
        // Resumed after a branch failed for good: wind down again (the attempts that were
        // cut off are resolved first), unless the others are to run their course.
        if failed.is_some() && options.on_failure == OnBranchFailure::StopOthers {
            block.stop();
        }
        // Retries recorded before this run: their timers.
        for index in 0..block.progress.len() {
            if matches!(block.progress[index], Progress::Waiting) {
                let position = branch_position(first, index);
                let at = self
                    .state
                    .record(position)
                    .and_then(|r| r.next_retry_at)
                    .unwrap_or_else(|| self.shared.clock.now());
                block.retry_at(index, at, at.since(self.shared.clock.now()));
            }
        }
        let result = self.drive_block(&mut block).await;
        block.tasks.abort_all();
        result
    }

    fn register(&mut self, position: u32, step: &Arc<dyn ErasedStep>) {
        if !self.steps.iter().any(|r| r.position == position) {
            self.steps.push(Registered {
                position,
                step: Arc::clone(step),
            });
        }
    }

    async fn drive_block(&mut self, block: &mut Block<'_>) -> Result<Vec<Value>, Halt> {
        let mut shutting_down = false;
        let ttl = self.shared.config.lease_ttl;
        // One renewal task for the whole block: branch attempts run in tasks of their own and
        // events may follow each other without a commit in between.
        let mut keeper =
            LeaseKeeper::spawn(Arc::clone(&self.shared.store), self.lease.clone(), ttl);
        let mut local_cancels = self.shared.cancels.subscribe();
        let id = self.state.id;
        loop {
            if self.state.cancel_pending() && !block.stopping {
                block.stop();
            }
            // A shutdown lets the attempts in flight finish (as a single step's would), then
            // hands the saga over; the branches not started run on the next coordinator.
            if !shutting_down
                && self
                    .shared
                    .shutting_down
                    .load(std::sync::atomic::Ordering::SeqCst)
            {
                shutting_down = true;
                block.stop();
            }
            self.start_ready(block).await?;
            if block.tasks.is_empty() {
                break;
            }
            // Only retry timers left, the nearest beyond the in-process wait: a durable timer,
            // so that a long backoff holds neither the lease nor a worker.
            if block.running() == 0
                && let Some(at) = block.earliest_retry()
                && at.since(self.shared.clock.now()) > self.shared.config.inline_wait_max
            {
                block.stop_timers();
                let delay = at.since(self.shared.clock.now());
                self.commit(Vec::new(), Schedule::WakeAfter(delay)).await?;
                return Err(Halt::Suspended(at));
            }
            let event = tokio::select! {
                news = keeper.changed() => {
                    if let Some(cause) = news.lost {
                        return Err(Halt::Interrupted(cause));
                    }
                    if news.cancel_requested && self.state.past_pivot.is_none() {
                        self.state.cancel_requested = true;
                    }
                    continue;
                }
                heard = local_cancels.recv() => {
                    if heard.is_ok_and(|cancelled| cancelled == id) && self.state.past_pivot.is_none() {
                        self.state.cancel_requested = true;
                    }
                    continue;
                }
                joined = block.tasks.join_next() => joined,
            };
            let event = match event {
                Some(Ok(event)) => event,
                // A retry timer aborted as the block wound down.
                Some(Err(joined)) if joined.is_cancelled() => continue,
                // As a panic in a single step would: the run stops, the attempt counts as cut
                // off, and the saga resumes (and gives up after `max_interruptions`).
                Some(Err(joined)) => {
                    tracing::error!(error = %joined, "a parallel branch's attempt panicked");
                    return Err(Halt::Interrupted(Interruption::Panicked {
                        what: format!("a parallel branch's attempt ({joined})"),
                    }));
                }
                None => break,
            };
            self.settle(block, event).await?;
        }
        drop(keeper);
        if let Some((index, reason)) = block.failed {
            return Err(self
                .fail_block(block.first, block.branches, index, reason)
                .await);
        }
        if shutting_down {
            return Err(self.release_for_shutdown().await);
        }
        if self.state.cancel_pending() {
            return Err(Halt::Cancelled);
        }
        all_done(&block.progress).ok_or_else(|| {
            Halt::BadData("a parallel block ended with a branch neither done nor failed".into())
        })
    }

    /// Starts the ready branches that fit under the limit, in index order, with one commit
    /// for all their `StepStarted` events.
    async fn start_ready(&mut self, block: &mut Block<'_>) -> Result<(), Halt> {
        let mut starting = Vec::new();
        let mut events = Vec::new();
        for index in 0..block.progress.len() {
            if block.running() + starting.len() >= block.limit {
                break;
            }
            let Progress::Ready {
                attempt,
                fresh,
                ambiguous,
            } = block.progress[index]
            else {
                continue;
            };
            // Winding down, only an attempt cut off mid-way still runs (after its check):
            // whether it had its effect decides what the compensation must undo.
            if block.stopping && !ambiguous {
                continue;
            }
            let position = branch_position(block.first, index);
            let branch = &block.branches[index];
            if ambiguous && self.reconciled(block, index).await? {
                continue;
            }
            let key = step_idempotency_key(self.state.id, position, branch.name, Phase::Forward);
            events.push(EventKind::StepStarted {
                position,
                step: branch.name.to_owned(),
                attempt,
                idempotency_key: key,
                input: fresh.then(|| block.inputs[index].clone()),
            });
            starting.push((index, attempt));
        }
        if starting.is_empty() {
            return Ok(());
        }
        let ttl = self.shared.config.lease_ttl;
        self.commit(events, Schedule::Continue { ttl }).await?;
        for (index, attempt) in starting {
            let position = branch_position(block.first, index);
            let branch = &block.branches[index];
            self.register(position, &branch.step);
            block.progress[index] = Progress::Running;
            let key = step_idempotency_key(self.state.id, position, branch.name, Phase::Forward);
            let span = tracing::info_span!(
                "step",
                step = branch.name,
                position,
                attempt,
                branch = index,
                idempotency_key = %key
            );
            let mut step_ctx = self.step_context_with_key(
                branch.name,
                position,
                attempt,
                Phase::Forward,
                span.clone(),
                key,
            );
            step_ctx.key_lifetime =
                self.key_lifetime(&branch.step.retry_policy(), branch.step.timeout());
            let step = Arc::clone(&branch.step);
            let input = block.inputs[index].clone();
            block.tasks.spawn(
                async move {
                    let clock = tokio::time::Instant::now();
                    let attempt_future = step.forward(&step_ctx, &input);
                    let result = match step.timeout() {
                        Some(limit) => tokio::time::timeout(limit, attempt_future)
                            .await
                            .unwrap_or_else(|_| Err(StepError::timed_out(limit))),
                        None => attempt_future.await,
                    };
                    Event::Attempted {
                        index,
                        attempt,
                        result,
                        seconds: clock.elapsed().as_secs_f64(),
                    }
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    /// Asks an interrupted branch's reconciliation check; `true` when it found the effect
    /// applied (the branch is then done, recorded with the next commit).
    async fn reconciled(&mut self, block: &mut Block<'_>, index: usize) -> Result<bool, Halt> {
        let position = branch_position(block.first, index);
        let branch = &block.branches[index];
        let attempts = self.state.record(position).map_or(1, |r| r.attempts);
        let span = tracing::info_span!("reconcile", step = branch.name, position);
        let ctx = self.step_context(
            branch.name,
            position,
            attempts,
            Phase::Forward,
            span.clone(),
        );
        let ttl = self.shared.config.lease_ttl;
        let checked = run_guarded(
            &*self.shared.store,
            &self.lease,
            ttl,
            branch.step.timeout(),
            branch
                .step
                .reconcile(&ctx, &block.inputs[index])
                .instrument(span),
        )
        .await;
        match checked {
            Guarded::Done(Ok(Reconciled::Applied(output))) => {
                self.record(EventKind::StepSucceeded {
                    position,
                    step: branch.name.to_owned(),
                    attempt: attempts,
                    output: output.clone(),
                    reconciled: true,
                    pivot: false,
                })?;
                block.progress[index] = Progress::Done(output);
                Ok(true)
            }
            Guarded::Lost(cause) => Err(Halt::Interrupted(cause)),
            _ => Ok(false),
        }
    }

    /// Records what one task reported, and commits it.
    async fn settle(&mut self, block: &mut Block<'_>, event: Event) -> Result<(), Halt> {
        let (index, attempt, result, seconds) = match event {
            Event::RetryDue { index } => {
                if !block.stopping {
                    let position = branch_position(block.first, index);
                    let attempts = self.state.record(position).map_or(0, |r| r.attempts);
                    block.progress[index] = Progress::Ready {
                        attempt: attempts + 1,
                        fresh: false,
                        ambiguous: false,
                    };
                }
                return Ok(());
            }
            Event::Attempted {
                index,
                attempt,
                result,
                seconds,
            } => (index, attempt, result, seconds),
        };
        let position = branch_position(block.first, index);
        let name = block.branches[index].name;
        let key = step_idempotency_key(self.state.id, position, name, Phase::Forward);
        let span = tracing::info_span!("step", step = name, position, attempt, branch = index);
        let ttl = self.shared.config.lease_ttl;
        let error = match result {
            Ok(output) => {
                self.record(EventKind::StepSucceeded {
                    position,
                    step: name.to_owned(),
                    attempt,
                    output: output.clone(),
                    reconciled: false,
                    pivot: false,
                })?;
                self.shared.observe_attempt(
                    &span,
                    &self.state,
                    position,
                    name,
                    &key,
                    attempt,
                    seconds,
                    &AttemptLog::Succeeded,
                );
                block.progress[index] = Progress::Done(output);
                self.commit(Vec::new(), Schedule::Continue { ttl }).await?;
                return Ok(());
            }
            Err(error) => error,
        };
        let now = self.shared.clock.now();
        let started = self
            .state
            .record(position)
            .and_then(|r| r.first_started_at)
            .unwrap_or(now);
        let policy = block.branches[index].step.retry_policy();
        let decision = policy.decide(attempt, error.class, now.since(started), &mut self.rng);
        match decision {
            RetryDecision::RetryAfter(delay) if !block.stopping => {
                let next_retry_at = now.plus(delay);
                let log = AttemptLog::Retry {
                    error: &error,
                    delay,
                    next_retry_at,
                };
                self.shared.observe_attempt(
                    &span,
                    &self.state,
                    position,
                    name,
                    &key,
                    attempt,
                    seconds,
                    &log,
                );
                let failed = EventKind::StepAttemptFailed {
                    position,
                    step: name.to_owned(),
                    attempt,
                    error,
                    backoff_seconds: delay.as_secs_f64(),
                    next_retry_at,
                };
                self.commit(vec![failed], Schedule::Continue { ttl })
                    .await?;
                block.progress[index] = Progress::Waiting;
                block.retry_at(index, next_retry_at, delay);
            }
            RetryDecision::RetryAfter(delay) => {
                // Winding down: the failure is recorded as a retry that will not run here;
                // the compensation judges the step like any step left unfinished.
                let failed = EventKind::StepAttemptFailed {
                    position,
                    step: name.to_owned(),
                    attempt,
                    error,
                    backoff_seconds: delay.as_secs_f64(),
                    next_retry_at: now.plus(delay),
                };
                self.commit(vec![failed], Schedule::Continue { ttl })
                    .await?;
                block.progress[index] = Progress::Stopped;
            }
            RetryDecision::GiveUp(reason) => {
                let log = AttemptLog::Failed {
                    error: &error,
                    reason,
                };
                self.shared.observe_attempt(
                    &span,
                    &self.state,
                    position,
                    name,
                    &key,
                    attempt,
                    seconds,
                    &log,
                );
                let failed = EventKind::StepFailed {
                    position,
                    step: name.to_owned(),
                    attempt,
                    error,
                    reason,
                };
                self.commit(vec![failed], Schedule::Continue { ttl })
                    .await?;
                block.progress[index] = Progress::Stopped;
                if block.failed.is_none() {
                    block.failed = Some((index, reason));
                }
                if block.on_failure == OnBranchFailure::StopOthers {
                    block.stop();
                }
            }
        }
        Ok(())
    }

    /// Records the start of compensation for the branch at `index` that failed for good.
    async fn fail_block(
        &mut self,
        first: u32,
        branches: &[ErasedBranch],
        index: usize,
        reason: GiveUpReason,
    ) -> Halt {
        let position = branch_position(first, index);
        let name = branches[index].name;
        if self.state.past_pivot.is_some() {
            // Past the pivot nothing is compensated: the saga ends `Failed` for an operator
            // to retry forward, as after a single step.
            let message = format!("step `{name}` (parallel branch at #{position}) failed for good");
            let cause = SagaError::StepFailed {
                step: name.to_owned(),
                position,
                reason,
                error: message.clone(),
            };
            return self.fail_after_pivot(Vec::new(), &message, cause).await;
        }
        let record = self.state.record(position);
        let error = record
            .and_then(|r| r.error.as_ref())
            .map_or_else(|| "failed for good".to_owned(), |e| e.message.clone());
        let cause = CompensationReason::StepFailed {
            position,
            step: name.to_owned(),
            reason,
            error: error.clone(),
        };
        let ttl = self.shared.config.lease_ttl;
        match self
            .commit(
                vec![EventKind::CompensationStarted { reason: cause }],
                Schedule::Continue { ttl },
            )
            .await
        {
            Ok(_) => Halt::StepFailed(SagaError::StepFailed {
                step: name.to_owned(),
                position,
                reason,
                error,
            }),
            Err(halt) => halt,
        }
    }
}

impl SagaContext {
    /// Why the branch at `position` was given up, when this run recorded it (a failure found
    /// already recorded on resume counts as permanent: the state keeps its error, not why).
    fn give_up_reason(&self, position: u32) -> GiveUpReason {
        self.pending
            .iter()
            .rev()
            .find_map(|event| match &event.kind {
                EventKind::StepFailed {
                    position: p,
                    reason,
                    ..
                } if *p == position => Some(*reason),
                _ => None,
            })
            .unwrap_or(GiveUpReason::Permanent)
    }
}

/// Branch `index` of the block whose size value is at `first - 1`.
fn branch_position(first: u32, index: usize) -> u32 {
    first + u32::try_from(index).unwrap_or(u32::MAX)
}

/// Every branch's output, in index order, if every branch is done.
fn all_done(progress: &[Progress]) -> Option<Vec<Value>> {
    progress
        .iter()
        .map(|p| match p {
            Progress::Done(output) => Some(output.clone()),
            _ => None,
        })
        .collect()
}

/// A parallel block being run.
struct Block<'a> {
    first: u32,
    limit: usize,
    on_failure: OnBranchFailure,
    branches: &'a [ErasedBranch],
    inputs: &'a [Value],
    progress: Vec<Progress>,
    tasks: JoinSet<Event>,
    /// The retry timers waiting, with when they are due: aborted when the block winds down
    /// or turns them into a durable timer.
    timers: Vec<(Timestamp, tokio::task::AbortHandle)>,
    /// The first branch that failed for good, and why it was given up.
    failed: Option<(usize, GiveUpReason)>,
    /// No more starts or retries: attempts in flight finish, nothing else runs.
    stopping: bool,
}

impl Block<'_> {
    fn running(&self) -> usize {
        self.progress
            .iter()
            .filter(|p| matches!(p, Progress::Running))
            .count()
    }

    fn retry_at(&mut self, index: usize, due: Timestamp, delay: Duration) {
        let timer = self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            Event::RetryDue { index }
        });
        self.timers.retain(|(_, handle)| !handle.is_finished());
        self.timers.push((due, timer));
    }

    /// When the nearest retry timer still waiting is due.
    fn earliest_retry(&self) -> Option<Timestamp> {
        self.timers
            .iter()
            .filter(|(_, handle)| !handle.is_finished())
            .map(|(due, _)| *due)
            .min()
    }

    fn stop_timers(&mut self) {
        for (_, timer) in self.timers.drain(..) {
            timer.abort();
        }
    }

    /// Winds the block down: branches not running stop where they are, except one whose
    /// attempt was cut off mid-way, which is resolved first.
    fn stop(&mut self) {
        self.stopping = true;
        self.stop_timers();
        for progress in &mut self.progress {
            let resolve = matches!(
                progress,
                Progress::Ready {
                    ambiguous: true,
                    ..
                }
            );
            if !resolve && matches!(progress, Progress::Ready { .. } | Progress::Waiting) {
                *progress = Progress::Stopped;
            }
        }
    }
}
