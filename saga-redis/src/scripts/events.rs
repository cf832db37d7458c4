//! `events.lua`: a saga's whole encoded history.

use std::sync::LazyLock;

use redis::Script;
use saga_core::{SagaId, StoreError};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::saga_call;
use crate::store::RedisStore;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("events.lua")));

/// [`SagaStore::events`](saga_core::SagaStore::events).
pub(crate) async fn events(store: &RedisStore, id: SagaId) -> Result<Vec<String>, StoreError> {
    let keys = store.keys();
    let call = saga_call(Call::new("events", &SCRIPT), keys, id, 0).key(keys.events(id));
    store
        .call(call, |code, reply| match code {
            ReplyCode::Ok => Ok(Answer::Read(reply.rest()?)),
            _ => Ok(Answer::Refused),
        })
        .await
}
