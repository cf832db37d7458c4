//! Shared support for the workspace integration tests.
//!
//! The engine behaviour suite (`tests/engine_*.rs`) drives real [`Engine`]s over a
//! [`MemoryStore`] with hand-written steps whose behaviour is scripted per attempt:
//!
//! - [`Script`] says, per step and per invocation, what a step does: succeed, fail
//!   transiently (optionally with a retry-after hint), fail permanently, run past its
//!   timeout, apply its effect and then hang (a coordinator that dies mid-step), or wait on a
//!   [`Gate`] before succeeding;
//! - [`Ledger`] records every invocation and every applied effect, keyed by the step's
//!   idempotency key and phase, so a test can assert "this effect was applied exactly once";
//! - [`Scripted`] is the step type (one type per journal slot, with its compensation mode as
//!   a const parameter) and [`PlanSaga`] the workflow that runs a [`Plan`] of them in order;
//! - [`CrashingStore`] wraps a store, lets n commits through and fails every call after,
//!   which is what a coordinator sees when its process (or its store) dies at that point;
//! - [`SlowStore`] wraps a store, answers every call after a (virtual) latency, can hold
//!   `claim_due` calls back, and counts calls per operation;
//! - [`Harness`] ties a shared paused-time clock, a store, a script and a ledger together and
//!   builds engines on them, so that a second engine can resume what the first one left.
//!
//! Every helper works under paused tokio time (`#[tokio::test(start_paused = true)]`): steps
//! that "take long" sleep on tokio's clock, which the runtime advances instantly.

// Test support: a poisoned mutex or a missing event is a test failure, and panicking with
// the message is the clearest way to report it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod crash;
mod effects;
mod harness;
mod ledger;
mod running;
mod script;
mod slow;
mod steps;

pub use crash::CrashingStore;
pub use effects::{Effects, effects};
pub use harness::{
    Harness, OWNER, assert_fold_matches, compensated_positions, count, events_named, kinds,
    single_terminal, skipped_positions, started_attempts, until,
};
pub use ledger::{Call, Effect, Ledger};
pub use running::RunningCoordinator;
pub use script::{Behavior, Gate, Script};
pub use slow::SlowStore;
pub use steps::{
    ALWAYS, NAMES, NONE, ON_SUCCESS, PIVOT, Plan, PlanSaga, ScriptError, Scripted, StepOutput,
    StepSpec, compensation_mode, fast_policy, run_spec,
};

#[doc(no_inline)]
pub use saga_core::{Engine, MemoryStore};
