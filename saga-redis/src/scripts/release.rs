//! `release.lua`: gives a held lease up.

use std::sync::LazyLock;

use redis::Script;
use saga_core::StoreError;
use saga_core::store::Lease;

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::lease_call;
use crate::store::RedisStore;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("release.lua")));

/// [`SagaStore::release`](saga_core::SagaStore::release).
pub(crate) async fn release(store: &RedisStore, lease: &Lease) -> Result<(), StoreError> {
    let keys = store.keys();
    let id = lease.saga_id;
    let call = lease_call(Call::new("release", &SCRIPT), keys, id, lease.fence)
        .arg(id.to_string())
        .arg(lease.fence);
    store
        .call(call, |code, _| match code {
            ReplyCode::Ok => {
                store.hints().mark_dirty(keys.partition_of(id));
                Ok(Answer::Wrote(()))
            }
            _ => Ok(Answer::Refused),
        })
        .await
}
