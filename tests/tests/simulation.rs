//! Seeded simulation: for each seed, a plan of 1–6 scripted steps (random compensation
//! modes, maybe a pivot, random per-attempt outcomes) runs on the in-memory store under
//! faults the seed chooses — a crash after k commits, transient store errors injected before
//! a call reaches the store (and, optionally, replies lost after a commit or create was
//! applied), and reorderings (coordinators of different owners racing on the same saga with
//! short leases, so that claims and fencing decide who writes). A fresh engine on the healthy
//! store then brings the saga to its end, and the guarantees are checked against the history
//! and the effect ledger.
//!
//! `SAGA_SIM_SEEDS=<n>` runs `n` seeds (default 10 000); `SAGA_SIM_SEED=<n>` runs only seed
//! `n` and prints its schedule. Every failure names its seed and the command reproducing it.
//! Each seed runs on its own current-thread runtime on paused time, so backoffs, timeouts and
//! leases take no real time.

// Tests: a failed unwrap is a failed test, with the error in the message. The summary line
// and a reproduced seed's schedule are printed on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, DeliveryOutcome,
    GuardClaim, Lease, ListPage, ListQuery, NewSaga, SignalDelivery, StoredSaga, StoredSignal,
    Transition, VersionCount,
};
use saga_core::{
    Compensation, CompensationStatus, Engine, EngineError, EventKind, FailureKind, GiveUpReason,
    Phase, RunOutcome, Saga, SagaEvent, SagaId, SagaState, SagaStatus, SagaStore, StartOptions,
    StepStatus, StoreError,
};
use saga_tests::{
    Behavior, Call, CrashingStore, Effect, Harness, Plan, PlanSaga, compensated_positions,
    fast_policy, kinds, single_terminal,
};

/// Seeds per run unless `SAGA_SIM_SEEDS` says otherwise.
const DEFAULT_SEEDS: u64 = 10_000;
/// The idempotency key every simulated saga is started with (so restarts find it).
const KEY: &str = "sim";
/// The lease of racing coordinators: short, so that a coordinator whose renewals fail loses
/// the saga to the other one mid-run.
const RACE_LEASE: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------

/// A seeded wyrand generator (the algorithm of `fastrand::Rng::with_seed`, which this crate
/// does not depend on): the same seed always gives the same schedule.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn with_seed(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xA076_1D64_78BD_642F);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xE703_7ED1_A0B4_28DB);
        #[allow(clippy::cast_possible_truncation)]
        let folded = (t as u64) ^ ((t >> 64) as u64);
        folded
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    fn range_u32(&mut self, lo: u32, hi: u32) -> u32 {
        lo + u32::try_from(self.below(u64::from(hi - lo) + 1)).unwrap()
    }

    /// `true` with probability `per_mille / 1000`.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    /// Picks by weight.
    fn weighted<T: Copy>(&mut self, choices: &[(u64, T)]) -> T {
        let total: u64 = choices.iter().map(|(w, _)| w).sum();
        let mut roll = self.below(total);
        for &(weight, choice) in choices {
            if roll < weight {
                return choice;
            }
            roll -= weight;
        }
        choices[choices.len() - 1].1
    }
}

// ---------------------------------------------------------------------------------------
// The schedule a seed decides
// ---------------------------------------------------------------------------------------

/// One invocation's scripted outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Ok,
    Transient,
    /// A transient error with a retry-after hint, in ms (past the 100 ms the racing
    /// coordinators wait in process, it becomes a durable timer).
    RetryAfter(u64),
    Permanent,
    Timeout,
}

impl Act {
    fn behavior(self) -> Behavior {
        match self {
            Act::Ok => Behavior::Ok,
            Act::Transient => Behavior::Transient,
            Act::RetryAfter(ms) => Behavior::RetryAfter(Duration::from_millis(ms)),
            Act::Permanent => Behavior::Permanent,
            Act::Timeout => Behavior::Timeout,
        }
    }

    fn random(rng: &mut Rng) -> Self {
        match rng.weighted(&[(12, 0), (3, 1), (1, 2), (1, 3), (1, 4)]) {
            0 => Act::Ok,
            1 => Act::Transient,
            2 => Act::RetryAfter(if rng.chance(500) { 5 } else { 1500 }),
            3 => Act::Permanent,
            _ => Act::Timeout,
        }
    }
}

#[derive(Clone, Debug)]
struct StepCase {
    compensation: Compensation,
    max_attempts: u32,
    compensation_max_attempts: u32,
    /// Whether the step's reconciliation check looks its effect up (else: `Unknown`).
    reconciles: bool,
    /// One act per forward invocation (later invocations succeed).
    forward: Vec<Act>,
    /// One act per compensation invocation.
    compensate: Vec<Act>,
}

/// How coordinators race on the saga.
#[derive(Clone, Copy, Debug)]
struct Race {
    /// A second coordinator already polls for the saga while the first run is going on.
    during_first_run: bool,
    /// How many runs each racing coordinator attempts.
    rounds: u32,
}

#[derive(Clone, Debug)]
struct Faults {
    /// The first coordinator's store dies after this many commits.
    crash_after: Option<usize>,
    /// Per-mille of store calls that fail with `Unavailable` before reaching the store.
    store_errors_per_mille: u64,
    /// Whether some commits and creates are applied and then answered `Unavailable`.
    lost_replies: bool,
    race: Option<Race>,
}

#[derive(Clone, Debug)]
struct Schedule {
    seed: u64,
    steps: Vec<StepCase>,
    faults: Faults,
}

impl Schedule {
    fn from_seed(seed: u64) -> Self {
        let mut rng = Rng::with_seed(seed);
        // Every length from 1 to 6, the short ones more often: a long plan costs more
        // commits per seed without exercising much more.
        let n = rng.weighted(&[(3, 1), (3, 2), (3, 3), (2, 4), (1, 5), (1, 6)]);
        let mut steps: Vec<StepCase> = (0..n)
            .map(|_| StepCase {
                compensation: rng.weighted(&[
                    (1, Compensation::None),
                    (3, Compensation::OnSuccess),
                    (2, Compensation::Always),
                ]),
                max_attempts: rng.range_u32(1, 4),
                compensation_max_attempts: rng.range_u32(1, 4),
                reconciles: rng.chance(300),
                forward: (0..4).map(|_| Act::random(&mut rng)).collect(),
                compensate: (0..4).map(|_| Act::random(&mut rng)).collect(),
            })
            .collect();
        if rng.chance(200) {
            let pivot = usize::try_from(rng.below(n as u64)).unwrap();
            steps[pivot].compensation = Compensation::Pivot;
        }
        let crash_after = rng
            .chance(600)
            .then(|| usize::try_from(rng.below(2 * n as u64 + 6)).unwrap());
        let store_errors_per_mille = if rng.chance(500) {
            rng.range_u32(20, 200).into()
        } else {
            0
        };
        let lost_replies = store_errors_per_mille > 0 && rng.chance(500);
        let race = rng.chance(400).then(|| Race {
            during_first_run: rng.chance(500),
            rounds: rng.range_u32(1, 6),
        });
        Self {
            seed,
            steps,
            faults: Faults {
                crash_after,
                store_errors_per_mille,
                lost_replies,
                race,
            },
        }
    }

    fn plan(&self) -> Plan {
        let mut plan = Plan::linear(self.steps.len());
        for (i, case) in self.steps.iter().enumerate() {
            plan = plan.with(i, |spec| {
                spec.compensation = case.compensation;
                spec.policy = fast_policy(case.max_attempts);
                spec.compensation_policy = fast_policy(case.compensation_max_attempts);
                spec.timeout = Some(Duration::from_secs(1));
            });
        }
        plan
    }

    fn script(&self, h: &Harness) {
        // The steps call a system that honours idempotency keys: re-running an applied effect
        // under its key returns its result, so "at most once per key" is checkable.
        h.script.dedupe_by_key();
        for (i, case) in self.steps.iter().enumerate() {
            h.script
                .forward(i, case.forward.iter().map(|a| a.behavior()));
            h.script
                .compensate(i, case.compensate.iter().map(|a| a.behavior()));
            if case.reconciles {
                h.script.reconcile_from_ledger(i);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// A store that fails a seeded fraction of its calls
// ---------------------------------------------------------------------------------------

/// Fails a seeded fraction of calls with [`StoreError::Unavailable`] before they reach the
/// store (nothing applied); with `lost_replies`, also applies some commits and creates and
/// then answers `Unavailable` (the reply lost on the way back), which the engine must
/// tolerate because both are idempotent (by commit id, by saga id).
struct FlakyStore {
    inner: Arc<dyn SagaStore>,
    rng: Mutex<Rng>,
    per_mille: u64,
    lost_replies: bool,
    injected: Arc<AtomicUsize>,
}

impl FlakyStore {
    fn new(
        inner: Arc<dyn SagaStore>,
        seed: u64,
        per_mille: u64,
        lost_replies: bool,
        injected: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            inner,
            rng: Mutex::new(Rng::with_seed(seed)),
            per_mille,
            lost_replies,
            injected,
        }
    }

    fn roll(&self, per_mille: u64) -> bool {
        per_mille > 0
            && self
                .rng
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .chance(per_mille)
    }

    fn unavailable(&self, what: &str) -> StoreError {
        self.injected.fetch_add(1, Ordering::SeqCst);
        StoreError::Unavailable {
            message: format!("injected fault: {what}"),
            source: None,
        }
    }

    /// Fails the call before it reaches the store, sometimes.
    fn gate(&self, op: &str) -> Result<(), StoreError> {
        if self.roll(self.per_mille) {
            return Err(self.unavailable(&format!("`{op}` did not reach the store")));
        }
        Ok(())
    }

    /// Loses the reply of an applied call, sometimes.
    fn reply<T>(&self, op: &str, applied: Result<T, StoreError>) -> Result<T, StoreError> {
        if applied.is_ok() && self.lost_replies && self.roll(self.per_mille / 2) {
            return Err(self.unavailable(&format!("the reply of an applied `{op}` was lost")));
        }
        applied
    }
}

#[async_trait]
impl SagaStore for FlakyStore {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        self.gate("create")?;
        let applied = self.inner.create(new).await;
        self.reply("create", applied)
    }
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        self.gate("load")?;
        self.inner.load(id).await
    }
    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        self.gate("events")?;
        self.inner.events(id).await
    }
    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.gate("claim")?;
        self.inner.claim(id, request).await
    }
    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.gate("claim_due")?;
        self.inner.claim_due(request, limit).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError> {
        self.gate("renew")?;
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.gate("release")?;
        self.inner.release(lease).await
    }
    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.gate("commit")?;
        let applied = self.inner.commit(lease, transition).await;
        self.reply("commit", applied)
    }
    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError> {
        self.gate("request_cancel")?;
        self.inner.request_cancel(id, event).await
    }
    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.gate("operator_transition")?;
        self.inner
            .operator_transition(id, expected, transition)
            .await
    }
    async fn count_quarantined(&self) -> Result<u64, StoreError> {
        self.gate("count_quarantined")?;
        self.inner.count_quarantined().await
    }
    async fn count_active_by_version(&self) -> Result<Vec<VersionCount>, StoreError> {
        self.gate("count_active_by_version")?;
        self.inner.count_active_by_version().await
    }
    async fn due_backlog(&self) -> Result<Option<Vec<u64>>, StoreError> {
        self.gate("due_backlog")?;
        self.inner.due_backlog().await
    }
    async fn deliver_signal(
        &self,
        id: SagaId,
        delivery: SignalDelivery,
    ) -> Result<DeliveryOutcome, StoreError> {
        self.gate("deliver_signal")?;
        self.inner.deliver_signal(id, delivery).await
    }
    async fn signals(&self, id: SagaId, after: u64) -> Result<Vec<StoredSignal>, StoreError> {
        self.gate("signals")?;
        self.inner.signals(id, after).await
    }
    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        self.gate("quarantine")?;
        self.inner.quarantine(id, reason).await
    }
    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError> {
        self.gate("guard_claim")?;
        self.inner
            .guard_claim(key, fingerprint, in_progress_ttl)
            .await
    }
    async fn guard_complete(
        &self,
        key: &str,
        token: &str,
        result: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.gate("guard_complete")?;
        self.inner.guard_complete(key, token, result, ttl).await
    }
    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.gate("guard_release")?;
        self.inner.guard_release(key, token).await
    }
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        self.gate("list")?;
        self.inner.list(query).await
    }
    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError> {
        self.gate("count_by_status")?;
        self.inner.count_by_status().await
    }
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        self.gate("purge")?;
        self.inner.purge(older_than, limit).await
    }
    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.wakeups()
    }
    fn saga_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SagaId>> {
        self.inner.saga_changes()
    }
}

// ---------------------------------------------------------------------------------------
// Running one seed
// ---------------------------------------------------------------------------------------

/// What happened in one seed, for the summary line.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    seeds: u64,
    crashed: u64,
    raced: u64,
    /// Seeds in which a racing coordinator found the saga busy or was fenced out of it.
    contested: u64,
    errored: u64,
    completed: u64,
    compensated: u64,
    failed: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.seeds += other.seeds;
        self.crashed += other.crashed;
        self.raced += other.raced;
        self.contested += other.contested;
        self.errored += other.errored;
        self.completed += other.completed;
        self.compensated += other.compensated;
        self.failed += other.failed;
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

fn saga_id() -> SagaId {
    SagaId::from_idempotency_key(PlanSaga::NAME, KEY)
}

/// A coordinator of its own owner on its own (maybe flaky) store handle, with a short lease.
fn racer(h: &Harness, store: Arc<dyn SagaStore>, plan: Plan, owner: &str) -> Engine {
    h.builder_on(store, plan)
        .owner(owner)
        .lease_ttl(RACE_LEASE)
        .inline_wait_max(RACE_LEASE / 3)
        .build()
        .unwrap()
}

/// Plays a polling coordinator for `rounds` runs: runs the saga once, sleeps (on the paused
/// clock) through its timer or another owner's lease, and tries again. Returns whether it
/// ever lost the saga to the other coordinator (found it busy, or was fenced out of it).
async fn race(h: &Harness, engine: &Engine, rounds: u32) -> bool {
    let id = saga_id();
    let mut contested = false;
    for _ in 0..rounds {
        let wait = match engine.run_once(id).await {
            Ok(RunOutcome::Finished(_)) => break,
            Ok(RunOutcome::Suspended(until)) => until.since(h.now()) + Duration::from_millis(1),
            Err(EngineError::Busy { until, .. }) => {
                contested = true;
                until.since(h.now()) + Duration::from_millis(1)
            }
            Err(err) => {
                contested |= err.is_fenced() || err.is_lease_lapsed();
                // Not created yet, interrupted, store down: poll again shortly.
                Duration::from_millis(50)
            }
            Ok(_) => Duration::from_millis(50),
        };
        tokio::time::sleep(wait).await;
    }
    contested
}

fn run_seed(seed: u64, verbose: bool) -> Tally {
    let schedule = Schedule::from_seed(seed);
    if verbose {
        println!("seed {seed}: {schedule:#?}");
    }
    paused_runtime().block_on(async {
        // Anything that never finishes (a lost wake-up, a deadlock) shows up as this timeout:
        // under paused time an idle runtime jumps straight to it.
        tokio::time::timeout(Duration::from_secs(24 * 3600), simulate(&schedule, verbose))
            .await
            .unwrap_or_else(|_| panic!("the simulation hung (one virtual day passed)"))
    })
}

async fn simulate(schedule: &Schedule, verbose: bool) -> Tally {
    let seed = schedule.seed;
    let faults = &schedule.faults;
    let h = Harness::new();
    schedule.script(&h);
    let plan = schedule.plan();
    let id = saga_id();
    let injected = Arc::new(AtomicUsize::new(0));
    // Each coordinator's own handle on the store, failing calls by its own seeded stream.
    let flaky = |salt: u64| {
        FlakyStore::new(
            Arc::new(h.store.clone()),
            seed.wrapping_mul(31).wrapping_add(salt),
            faults.store_errors_per_mille,
            faults.lost_replies,
            Arc::clone(&injected),
        )
    };
    let mut tally = Tally {
        seeds: 1,
        raced: u64::from(faults.race.is_some()),
        ..Tally::default()
    };

    // The first coordinator, on a store that may fail calls and die after k commits.
    let base = flaky(0);
    let crashing = Arc::new(match faults.crash_after {
        Some(k) => CrashingStore::after_commits(base, k),
        None => CrashingStore::healthy(base),
    });
    let mut first = h.builder_on(crashing.clone(), plan.clone());
    if faults.race.is_some() {
        first = first.lease_ttl(RACE_LEASE).inline_wait_max(RACE_LEASE / 3);
    }
    let first = first.build().unwrap();
    let first_run = first.execute::<PlanSaga>(&0, StartOptions::key(KEY));
    let result = match faults.race {
        Some(Race {
            during_first_run: true,
            rounds,
        }) => {
            let early = racer(&h, Arc::new(flaky(1)), plan.clone(), "racer-early");
            let (result, contested) = tokio::join!(first_run, race(&h, &early, rounds));
            tally.contested |= u64::from(contested);
            result
        }
        _ => first_run.await,
    };
    tally.crashed = u64::from(crashing.crashed());
    match &result {
        Ok(outcome) => assert!(outcome.status.is_terminal(), "{outcome:?}"),
        Err(err) => assert!(
            crashing.crashed() || injected.load(Ordering::SeqCst) > 0 || faults.race.is_some(),
            "the first run failed without any fault: {err}"
        ),
    }
    drop(first);

    // The journal as it was when the first coordinator stopped: none of what it records as
    // done may run again. Kept raw and decoded at the end, as a prefix of the final history
    // (decoding is most of a seed's cost in a debug build).
    let at_stop = match h.store.events(id).await {
        Ok(events) => events,
        // The create never got through: the healer starts the saga.
        Err(StoreError::NotFound(_)) => Vec::new(),
        Err(err) => panic!("the journal does not load: {err}"),
    };
    let calls_before = h.ledger.calls().len();

    // Two coordinators of different owners resume it at once; leases and fencing decide.
    if let Some(Race { rounds, .. }) = faults.race {
        let a = racer(&h, Arc::new(flaky(2)), plan.clone(), "racer-a");
        let b = racer(&h, Arc::new(flaky(3)), plan.clone(), "racer-b");
        let (a, b) = tokio::join!(race(&h, &a, rounds), race(&h, &b, rounds));
        tally.contested |= u64::from(a || b);
    }

    // Heal: every lease lapses, and a coordinator on the healthy store finishes the saga.
    tokio::time::advance(Duration::from_secs(31)).await;
    let healer = h.engine(plan.clone());
    let finished = h
        .store
        .load(id)
        .await
        .unwrap()
        .is_some_and(|stored| stored.status.is_terminal());
    // A saga that is already terminal needs no run (and a run would only read its outcome).
    let healed = if finished {
        None
    } else {
        Some(
            healer
                .execute::<PlanSaga>(&0, StartOptions::key(KEY))
                .await
                .unwrap_or_else(|err| {
                    panic!("the healthy coordinator could not finish the saga: {err}")
                }),
        )
    };
    let state = healer.state(id).await.unwrap();
    if let Some(healed) = &healed {
        assert_eq!(
            state.status, healed.status,
            "the outcome differs from the stored state"
        );
    }
    tally.errored = u64::from(injected.load(Ordering::SeqCst) > 0);
    match state.status {
        SagaStatus::Completed => tally.completed = 1,
        SagaStatus::Compensated => tally.compensated = 1,
        SagaStatus::Failed => tally.failed = 1,
        other => panic!("the saga ended {other}, which is not terminal"),
    }

    let history = healer.history(id).await.unwrap();
    let calls = h.ledger.calls();
    let effects = h.ledger.effects();
    if verbose {
        println!("first run: {result:?}\nhistory: {:#?}", kinds(&history));
        for call in &calls {
            println!("call: {call:?}");
        }
        for effect in &effects {
            println!("effect: {effect:?}");
        }
    }
    check(
        schedule,
        &calls,
        &effects,
        &history,
        state.status,
        state.failure.as_ref().map(|f| f.0),
    );
    // The fold of the history is the stored state (what `assert_fold_matches` checks, on the
    // history loaded above rather than a second copy of it).
    let folded = SagaState::fold(id, &history).expect("history folds");
    assert_eq!(
        folded, state,
        "state folded from the history differs from the stored state"
    );
    // The journal only grows: what was durable at the stop is a prefix of the final one.
    let now = h.store.events(id).await.unwrap();
    assert!(
        now.starts_with(&at_stop),
        "the journal was rewritten after the first coordinator stopped"
    );
    if !at_stop.is_empty() {
        let at_stop =
            SagaState::fold(id, &history[..at_stop.len()]).expect("the journal at the stop folds");
        not_run_again(&calls[calls_before..], &at_stop);
    }
    tally
}

// ---------------------------------------------------------------------------------------
// The guarantees
// ---------------------------------------------------------------------------------------

/// The undo the engine owes when steps `0..failed` succeeded and step `failed` failed for
/// good: the failed step first if it declares Always (it may be half done) — unless its
/// reconciliation check can tell that nothing was applied —, then every succeeded step that
/// has something to undo, newest first.
fn expected_undo(steps: &[StepCase], failed: usize, failed_applied: bool) -> Vec<usize> {
    let mut undo = Vec::new();
    let case = &steps[failed];
    if case.compensation == Compensation::Always && (failed_applied || !case.reconciles) {
        undo.push(failed);
    }
    undo.extend((0..failed).rev().filter(|&i| {
        !matches!(
            steps[i].compensation,
            Compensation::None | Compensation::Pivot
        )
    }));
    undo
}

fn is_subsequence(small: &[usize], big: &[usize]) -> bool {
    let mut rest = big.iter();
    small.iter().all(|x| rest.any(|y| y == x))
}

fn check(
    schedule: &Schedule,
    calls: &[Call],
    effects: &[Effect],
    history: &[SagaEvent],
    status: SagaStatus,
    failure: Option<FailureKind>,
) {
    let steps = &schedule.steps;
    let n = steps.len();
    let ev = kinds(history);
    let calls_of = |i: usize, phase: Phase| -> Vec<&Call> {
        calls
            .iter()
            .filter(|c| c.step == i && c.phase == phase)
            .collect()
    };
    let effects_of = |i: usize, phase: Phase| {
        effects
            .iter()
            .filter(|e| e.step == i && e.phase == phase)
            .count()
    };

    // Exactly one terminal event, last, and the one the status says (a Failed saga is never
    // also Compensated).
    let terminal = single_terminal(history);
    let expected_terminal = match status {
        SagaStatus::Completed => "SagaCompleted",
        SagaStatus::Compensated => "SagaCompensated",
        _ => "SagaFailed",
    };
    assert_eq!(
        terminal, expected_terminal,
        "status {status} but history {ev:?}"
    );

    // Steps succeed in order, each once in the journal.
    let succeeded: Vec<(usize, bool)> = history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepSucceeded {
                position, pivot, ..
            } => Some((*position as usize, *pivot)),
            _ => None,
        })
        .collect();
    let positions: Vec<usize> = succeeded.iter().map(|s| s.0).collect();
    let k = positions.len();
    assert_eq!(
        positions,
        (0..k).collect::<Vec<_>>(),
        "steps succeeded out of order or twice: {ev:?}"
    );
    let failed: Vec<(usize, GiveUpReason)> = history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepFailed {
                position, reason, ..
            } => Some((*position as usize, *reason)),
            _ => None,
        })
        .collect();
    let past_pivot = succeeded
        .iter()
        .any(|&(p, _)| steps[p].compensation == Compensation::Pivot);
    assert_eq!(
        succeeded.iter().filter(|s| s.1).count(),
        usize::from(past_pivot),
        "the first succeeded pivot step (only) is marked as the pivot: {ev:?}"
    );

    // Each step and phase runs under one key; no attempt is numbered past its policy; a
    // restart never resets the numbering; each effect is applied at most once.
    for (i, case) in steps.iter().enumerate() {
        for (phase, max) in [
            (Phase::Forward, case.max_attempts),
            (Phase::Compensate, case.compensation_max_attempts),
        ] {
            let calls = calls_of(i, phase);
            assert!(
                calls.iter().all(|c| c.key == calls[0].key),
                "step {i} {phase:?}: several keys: {calls:?}"
            );
            assert!(
                calls.iter().all(|c| c.attempt >= 1 && c.attempt <= max),
                "step {i} {phase:?}: attempt past the policy's {max}: {calls:?}"
            );
            assert!(
                calls.windows(2).all(|w| w[0].attempt <= w[1].attempt),
                "step {i} {phase:?}: attempt numbers went down: {calls:?}"
            );
            let effects = effects_of(i, phase);
            assert!(
                effects <= 1,
                "step {i} {phase:?}: effect applied {effects} times"
            );
        }
    }

    // Forward effects: every succeeded step applied its effect exactly once, the steps after
    // the failed one never ran, and the failed one applied nothing unless its outcome stayed
    // unknown (interrupted too often: the engine cannot know, which is what Always is for).
    let forward_effects = |i: usize| effects_of(i, Phase::Forward);
    for i in 0..k {
        assert_eq!(
            forward_effects(i),
            1,
            "succeeded step {i} applied its effect {} times",
            forward_effects(i)
        );
    }
    if status == SagaStatus::Completed {
        assert_eq!(k, n, "completed with {k} of {n} steps: {ev:?}");
        assert!(failed.is_empty(), "completed with a failed step: {ev:?}");
        assert!(
            calls.iter().all(|c| c.phase == Phase::Forward),
            "a completed saga compensated"
        );
        return;
    }
    assert!(k < n, "{status} with every step succeeded: {ev:?}");
    assert_eq!(failed.len(), 1, "one step fails for good: {ev:?}");
    assert_eq!(
        failed[0].0, k,
        "the step after the last success is the one that failed: {ev:?}"
    );
    if failed[0].1 != GiveUpReason::InterruptedTooOften {
        assert_eq!(
            forward_effects(k),
            0,
            "step {k} failed for good ({:?}) but applied its effect",
            failed[0].1
        );
    }
    for i in k + 1..n {
        assert!(
            calls_of(i, Phase::Forward).is_empty(),
            "step {i} ran after step {k} failed"
        );
    }

    let owed = expected_undo(steps, k, forward_effects(k) > 0);
    let undone: Vec<usize> = effects
        .iter()
        .filter(|e| e.phase == Phase::Compensate)
        .map(|e| e.step)
        .collect();
    let journaled: Vec<usize> = compensated_positions(history)
        .iter()
        .map(|&p| p as usize)
        .collect();
    assert_eq!(
        undone, journaled,
        "undo effects differ from the journal's StepCompensated: {ev:?}"
    );
    for i in 0..n {
        if !owed.contains(&i) {
            assert!(
                calls_of(i, Phase::Compensate).is_empty(),
                "step {i} owes no undo but its compensation ran"
            );
        }
    }
    match status {
        SagaStatus::Compensated => {
            assert!(!past_pivot, "compensated past the pivot: {ev:?}");
            assert_eq!(
                undone, owed,
                "a compensated saga undoes each effect once, newest first"
            );
        }
        SagaStatus::Failed if past_pivot => {
            assert_eq!(failure, Some(FailureKind::AfterPivot), "{ev:?}");
            assert!(
                undone.is_empty(),
                "undid something past the pivot: {undone:?}"
            );
        }
        SagaStatus::Failed => {
            assert_eq!(failure, Some(FailureKind::CompensationFailed), "{ev:?}");
            assert!(
                is_subsequence(&undone, &owed),
                "undo {undone:?} is not in the order {owed:?}"
            );
            assert!(
                undone.len() < owed.len(),
                "failed though every undo was done: {ev:?}"
            );
        }
        other => panic!("not terminal: {other}"),
    }
}

/// Nothing the journal held as done when the first coordinator stopped runs again.
fn not_run_again(later: &[Call], at_stop: &SagaState) {
    for call in later {
        let recorded = at_stop
            .record(call.position)
            .is_some_and(|r| match call.phase {
                Phase::Forward => r.status == StepStatus::Succeeded,
                Phase::Compensate => r.compensation.as_ref().is_some_and(|c| {
                    matches!(
                        c.status,
                        CompensationStatus::Done | CompensationStatus::Skipped
                    )
                }),
            });
        assert!(
            !recorded,
            "{call:?} ran again although it was recorded before the stop"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// Runs one seed, turning a failure into a message that names the seed and how to
/// reproduce it.
fn try_seed(seed: u64, verbose: bool) -> Result<Tally, String> {
    catch_unwind(AssertUnwindSafe(|| run_seed(seed, verbose))).map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        format!(
            "seed {seed} failed: {why}\n  reproduce with: SAGA_SIM_SEED={seed} cargo test -p saga-tests --test simulation"
        )
    })
}

#[test]
fn seeded_simulation_keeps_the_guarantees() {
    let (seeds, verbose): (Vec<u64>, bool) = match env_u64("SAGA_SIM_SEED") {
        Some(seed) => (vec![seed], true),
        None => (
            (0..env_u64("SAGA_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
            false,
        ),
    };
    // Two workers: seeds are independent, each on its own runtime.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let mut tally = Tally::default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Tally::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(&seed) = seeds.get(i) else { break };
                        match try_seed(seed, verbose) {
                            Ok(t) => mine.add(t),
                            Err(message) => {
                                let mut failures =
                                    failures.lock().unwrap_or_else(PoisonError::into_inner);
                                failures.push(message);
                                // A handful is enough to debug; stop early.
                                if failures.len() >= 5 {
                                    next.store(seeds.len(), Ordering::SeqCst);
                                }
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        for handle in handles {
            tally.add(handle.join().unwrap());
        }
    });
    println!(
        "simulation: {} seeds ok ({} crashed, {} raced ({} contested), {} with store errors; {} completed, {} compensated, {} failed)",
        tally.seeds,
        tally.crashed,
        tally.raced,
        tally.contested,
        tally.errored,
        tally.completed,
        tally.compensated,
        tally.failed
    );
    let failures = failures
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
