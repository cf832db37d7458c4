//! `quarantine.lua`: sets a saga aside with a reason.

use std::sync::LazyLock;

use redis::Script;
use saga_core::{SagaId, StoreError};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::saga_call;
use crate::store::RedisStore;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("quarantine.lua")));

/// [`SagaStore::quarantine`](saga_core::SagaStore::quarantine).
pub(crate) async fn quarantine(
    store: &RedisStore,
    id: SagaId,
    reason: &str,
) -> Result<(), StoreError> {
    store.check_size("quarantine reason", reason)?;
    let keys = store.keys();
    let p = keys.partition_of(id);
    let call = saga_call(Call::new("quarantine", &SCRIPT), keys, id, 0)
        .key(keys.due(p))
        .key(keys.quarantine(p))
        .key(keys.terminal(p))
        .arg(id.to_string())
        .arg(reason)
        .arg(store.max_payload());
    store
        .call(call, |code, _| match code {
            ReplyCode::Ok => Ok(Answer::Wrote(())),
            _ => Ok(Answer::Refused),
        })
        .await
}
