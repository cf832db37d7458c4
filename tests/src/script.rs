//! What scripted steps do, per step, phase and invocation.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::Phase;
use tokio::sync::Notify;

/// A rendezvous between a test and a step that is running: the step signals `entered` when
/// it reaches the gate, and (for [`Behavior::WaitThenOk`]) waits for `release`.
///
/// Both sides use [`Notify::notify_one`], which stores a permit when nobody waits yet, so the
/// order in which the test and the step arrive does not matter.
#[derive(Debug, Default)]
pub struct Gate {
    /// Notified by the step when it reaches the gate.
    pub entered: Notify,
    /// Notified by the test to let a waiting step go on.
    pub release: Notify,
}

impl Gate {
    /// A new gate, shared between the script and the test.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

/// What one invocation of a step's forward action or compensation does.
#[derive(Clone, Debug, Default)]
pub enum Behavior {
    /// Applies the effect and succeeds.
    #[default]
    Ok,
    /// Fails with a transient error, without applying the effect.
    Transient,
    /// Fails with a transient error carrying a retry-after hint.
    RetryAfter(Duration),
    /// Fails with a permanent error, without applying the effect.
    Permanent,
    /// Sleeps far longer than any step timeout (one hour), so the engine cancels the
    /// attempt; the effect is never applied.
    Timeout,
    /// Applies the effect, signals the gate's `entered`, then never returns: the coordinator
    /// "dies" after the effect and before the result is recorded (abort its task).
    ApplyThenHang(Arc<Gate>),
    /// Signals the gate's `entered`, waits for its `release`, then applies the effect and
    /// succeeds.
    WaitThenOk(Arc<Gate>),
}

impl Behavior {
    /// A short name for the ledger.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Behavior::Ok => "ok",
            Behavior::Transient => "transient",
            Behavior::RetryAfter(_) => "retry_after",
            Behavior::Permanent => "permanent",
            Behavior::Timeout => "timeout",
            Behavior::ApplyThenHang(_) => "apply_then_hang",
            Behavior::WaitThenOk(_) => "wait_then_ok",
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    plans: HashMap<(usize, Phase), Vec<Behavior>>,
    reconciles: HashSet<usize>,
    dedupe: bool,
}

/// The script all [`Scripted`](crate::Scripted) steps follow. Cheap to clone: clones share
/// one script, so a test keeps a handle while the engine holds another as a resource.
///
/// Behaviours are listed per step index and phase, one per *invocation* of that phase (the
/// first call of the forward action uses the first entry, and so on); calls past the end of
/// the list succeed. Without crashes an invocation is an attempt. A step re-run after a crash
/// keeps its attempt number but is a new invocation, so a script can make the first run hang
/// and the re-run succeed.
#[derive(Clone, Debug, Default)]
pub struct Script {
    inner: Arc<Mutex<Inner>>,
}

impl Script {
    /// An empty script: every step succeeds at once.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the behaviours of step `step`'s forward action, one per invocation.
    pub fn forward(&self, step: usize, behaviors: impl IntoIterator<Item = Behavior>) -> &Self {
        self.set(step, Phase::Forward, behaviors)
    }

    /// Sets the behaviours of step `step`'s compensation, one per invocation.
    pub fn compensate(&self, step: usize, behaviors: impl IntoIterator<Item = Behavior>) -> &Self {
        self.set(step, Phase::Compensate, behaviors)
    }

    /// Sets the behaviours of one step and phase.
    pub fn set(
        &self,
        step: usize,
        phase: Phase,
        behaviors: impl IntoIterator<Item = Behavior>,
    ) -> &Self {
        self.inner
            .lock()
            .unwrap()
            .plans
            .insert((step, phase), behaviors.into_iter().collect());
        self
    }

    /// Makes step `step`'s reconciliation check look its effect up in the ledger (`Applied`
    /// with the recorded output, or `NotApplied`) instead of answering `Unknown`.
    pub fn reconcile_from_ledger(&self, step: usize) -> &Self {
        self.inner.lock().unwrap().reconciles.insert(step);
        self
    }

    /// Makes every step behave like a call to a system that honours idempotency keys: an
    /// invocation whose key already has an applied effect (in the same phase) succeeds with
    /// the recorded result, whatever the script says, and applies nothing.
    pub fn dedupe_by_key(&self) -> &Self {
        self.inner.lock().unwrap().dedupe = true;
        self
    }

    /// Whether [`Script::dedupe_by_key`] is on.
    #[must_use]
    pub fn dedupes(&self) -> bool {
        self.inner.lock().unwrap().dedupe
    }

    /// Whether step `step` reconciles from the ledger.
    #[must_use]
    pub fn reconciles(&self, step: usize) -> bool {
        self.inner.lock().unwrap().reconciles.contains(&step)
    }

    /// The behaviour of invocation `invocation` (0-based) of `step`'s `phase`.
    #[must_use]
    pub fn behavior(&self, step: usize, phase: Phase, invocation: usize) -> Behavior {
        self.inner
            .lock()
            .unwrap()
            .plans
            .get(&(step, phase))
            .and_then(|list| list.get(invocation))
            .cloned()
            .unwrap_or_default()
    }
}
