//! `commit.lua`: one atomic step transition under a lease.

use std::sync::LazyLock;

use redis::Script;
use saga_core::StoreError;
use saga_core::store::{CommitOutcome, Lease, Schedule, Transition};

use super::call::{Call, with_prelude};
use super::{rewrite_call, run_rewrite};
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("commit.lua")));

/// [`SagaStore::commit`](saga_core::SagaStore::commit).
pub(crate) async fn commit(
    store: &RedisStore,
    lease: &Lease,
    transition: Transition,
) -> Result<CommitOutcome, StoreError> {
    transition.check_sizes(store.max_payload())?;
    let (schedule, span) = schedule_args(&transition)?;
    let id = lease.saga_id;
    let call = rewrite_call(Call::new("commit", &SCRIPT), store.keys(), id, lease.fence)
        .arg(id.to_string())
        .arg(&lease.owner)
        .arg(lease.fence)
        .arg(&transition.commit_id)
        .arg(transition.status.as_str())
        .arg(schedule)
        .arg(span)
        .arg(store.max_payload())
        .arg(&transition.state);
    run_rewrite(store, call, id, &transition).await
}

/// The script's schedule name and duration (ms) for `transition`, checked against its
/// status.
fn schedule_args(transition: &Transition) -> Result<(&'static str, u64), StoreError> {
    let (schedule, span) = match transition.schedule {
        Schedule::Continue { ttl } => ("continue", ms(ttl)),
        Schedule::WakeAfter(delay) => ("wake", ms(delay)),
        Schedule::Finished => ("finished", 0),
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
    Ok((schedule, span))
}
