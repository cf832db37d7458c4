//! `request_cancel.lua`: sets a saga's cancel flag, once.

use std::sync::LazyLock;

use redis::Script;
use saga_core::store::CancelOutcome;
use saga_core::{SagaId, StoreError};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::saga_call;
use crate::store::RedisStore;

static SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("request_cancel.lua")));

/// [`SagaStore::request_cancel`](saga_core::SagaStore::request_cancel).
pub(crate) async fn request_cancel(
    store: &RedisStore,
    id: SagaId,
    event: &str,
) -> Result<CancelOutcome, StoreError> {
    store.check_size("event", event)?;
    let keys = store.keys();
    let p = keys.partition_of(id);
    let call = saga_call(Call::new("request_cancel", &SCRIPT), keys, id, 0)
        .key(keys.events(id))
        .key(keys.due(p))
        .key(keys.quarantine(p))
        .arg(id.to_string())
        .arg(event)
        .arg(store.max_payload());
    store
        .call(call, |code, reply| match code {
            ReplyCode::Requested => {
                store.hints().mark_dirty(p);
                // Only the first request appends, but a repeated one may be the retry of a
                // first whose replica wait failed: both are answered after the replica wait,
                // so that a cancel is never acknowledged while it is on the primary alone.
                let _first_request = reply.flag()?;
                Ok(Answer::Wrote(CancelOutcome::Requested))
            }
            ReplyCode::Finished => Ok(Answer::Read(CancelOutcome::AlreadyFinished(
                reply.status(id)?,
            ))),
            _ => Ok(Answer::Refused),
        })
        .await
}
