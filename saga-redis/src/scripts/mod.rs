//! The Lua scripts, one module per script beside its `.lua` file: each module builds its
//! script's invocation (KEYS and ARGV, in the order the script's header states) and decodes
//! its reply into a typed result. They all go through one call path ([`call`]), which sends
//! the script, reads the outcome code, maps the shared refusals and Redis errors, and waits
//! for replicas after a write. `prelude.lua` holds the Lua helpers every script shares.

pub(crate) mod call;
pub(crate) mod reply;

pub(crate) mod claim;
pub(crate) mod claim_due;
pub(crate) mod commit;
pub(crate) mod count_versions;
pub(crate) mod create;
pub(crate) mod deliver_signal;
pub(crate) mod events;
pub(crate) mod guard_claim;
pub(crate) mod guard_complete;
pub(crate) mod guard_release;
pub(crate) mod list;
pub(crate) mod load;
pub(crate) mod meta;
pub(crate) mod operator_transition;
pub(crate) mod purge;
pub(crate) mod quarantine;
pub(crate) mod release;
pub(crate) mod renew;
pub(crate) mod request_cancel;
pub(crate) mod signals;

use saga_core::store::{CommitOutcome, Schedule, Transition};
use saga_core::{SagaId, StoreError};

use crate::keys::KeyLayout;
use crate::store::RedisStore;
use call::{Answer, Call, ReplyCode};

/// `call` (of a script whose KEYS[1] is the saga hash of `id`) with that key: its errors
/// name the saga and the caller's `fence` (0 without a lease), and a write waits for
/// replicas on the saga's node.
fn saga_call(call: Call, keys: &KeyLayout, id: SagaId, fence: u64) -> Call {
    let saga_key = keys.saga(id);
    call.saga(id, fence).wait_on(saga_key.clone()).key(saga_key)
}

/// A [`saga_call`] of the scripts that act on one saga and its lease (`load`, `claim`,
/// `renew`, `release`): KEYS are the saga hash, the partition's due set and its quarantine
/// hash.
fn lease_call(call: Call, keys: &KeyLayout, id: SagaId, fence: u64) -> Call {
    let p = keys.partition_of(id);
    let call = saga_call(call, keys, id, fence);
    call.key(keys.due(p)).key(keys.quarantine(p))
}

/// A [`saga_call`] of the scripts that rewrite a saga (`commit`, `operator_transition`),
/// with KEYS in the order their headers state: the saga hash, its events, the partition's
/// due set, quarantine hash and terminal index, then one index per status.
fn rewrite_call(call: Call, keys: &KeyLayout, id: SagaId, fence: u64) -> Call {
    let p = keys.partition_of(id);
    saga_call(call, keys, id, fence)
        .key(keys.events(id))
        .key(keys.due(p))
        .key(keys.quarantine(p))
        .key(keys.terminal(p))
        .keys(keys.statuses(p))
}

/// Appends the transition's events (their count, then each) to a [`rewrite_call`] and runs
/// it: `ok` tells the due hints about the schedule and carries the cancel flag.
async fn run_rewrite(
    store: &RedisStore,
    call: Call,
    id: SagaId,
    transition: &Transition,
) -> Result<CommitOutcome, StoreError> {
    let call = call.arg(transition.events.len()).args(&transition.events);
    let schedule: Schedule = transition.schedule;
    store
        .call(call, |code, reply| match code {
            ReplyCode::Ok => {
                store.note_schedule(id, schedule);
                Ok(Answer::Wrote(CommitOutcome {
                    cancel_requested: reply.flag()?,
                }))
            }
            _ => Ok(Answer::Refused),
        })
        .await
}
