//! `operator_transition.lua`: an operator's transition, outside any lease.

use std::sync::LazyLock;

use redis::Script;
use saga_core::store::{CommitOutcome, Schedule, Transition};
use saga_core::{SagaId, SagaStatus, StoreError};

use super::call::{Call, with_prelude};
use super::{rewrite_call, run_rewrite};
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("operator_transition.lua")));

/// [`SagaStore::operator_transition`](saga_core::SagaStore::operator_transition).
pub(crate) async fn operator_transition(
    store: &RedisStore,
    id: SagaId,
    expected: &[SagaStatus],
    transition: Transition,
) -> Result<CommitOutcome, StoreError> {
    transition.check_sizes(store.max_payload())?;
    let terminal = transition.status.is_terminal();
    let (schedule, delay) = match transition.schedule {
        Schedule::WakeAfter(delay) if !terminal => ("wake", ms(delay)),
        Schedule::Finished if terminal => ("finished", 0),
        other => {
            return Err(StoreError::Invalid(format!(
                "an operator transition to {} cannot use schedule {other:?}",
                transition.status
            )));
        }
    };
    let expected = expected
        .iter()
        .map(|status| status.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let call = rewrite_call(
        Call::new("operator_transition", &SCRIPT),
        store.keys(),
        id,
        0,
    )
    .arg(id.to_string())
    .arg(&transition.commit_id)
    .arg(transition.status.as_str())
    .arg(schedule)
    .arg(delay)
    .arg(store.max_payload())
    .arg(&transition.state)
    .arg(expected);
    run_rewrite(store, call, id, &transition).await
}
