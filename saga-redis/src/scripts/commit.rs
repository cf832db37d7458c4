//! `commit.lua`: one atomic step transition under a lease.

use std::sync::LazyLock;

use redis::Script;
use saga_core::StoreError;
use saga_core::store::{CommitOutcome, Lease, Schedule, Transition};

use super::call::{Call, with_prelude};
use super::{rewrite_call, run_rewrite};
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("commit.lua")));

/// The largest signals-seen count sent to the script (15 digits, what its integer check
/// accepts).
const MAX_SEEN: u64 = 999_999_999_999_999;

/// [`SagaStore::commit`](saga_core::SagaStore::commit).
pub(crate) async fn commit(
    store: &RedisStore,
    lease: &Lease,
    transition: Transition,
) -> Result<CommitOutcome, StoreError> {
    transition.check_sizes(store.max_payload())?;
    let (schedule, span, seen) = schedule_args(&transition)?;
    let id = lease.saga_id;
    let keys = store.keys();
    let call = rewrite_call(Call::new("commit", &SCRIPT), keys, id, lease.fence)
        .key(keys.signals(id))
        .arg(id.to_string())
        .arg(&lease.owner)
        .arg(lease.fence)
        .arg(&transition.commit_id)
        .arg(transition.status.as_str())
        .arg(schedule)
        .arg(span)
        .arg(store.max_payload())
        .arg(&transition.state)
        .arg(seen);
    run_rewrite(store, call, id, &transition).await
}

/// The script's schedule name, duration (ms) and signals seen for `transition`, checked
/// against its status.
fn schedule_args(transition: &Transition) -> Result<(&'static str, u64, u64), StoreError> {
    let (schedule, span, seen) = match transition.schedule {
        Schedule::Continue { ttl } => ("continue", ms(ttl), 0),
        Schedule::WakeAfter(delay) => ("wake", ms(delay), 0),
        // A count past the script's integer check is past any inbox's size too.
        Schedule::AwaitSignal { timeout, seen } => ("await", ms(timeout), seen.min(MAX_SEEN)),
        Schedule::Finished => ("finished", 0, 0),
        other => {
            return Err(StoreError::Invalid(format!(
                "schedule {other:?} is not supported by saga-redis"
            )));
        }
    };
    if transition.status.is_terminal() != (schedule == "finished") {
        return Err(StoreError::Invalid(format!(
            "status {} does not go with schedule {:?}",
            transition.status, transition.schedule
        )));
    }
    Ok((schedule, span, seen))
}
