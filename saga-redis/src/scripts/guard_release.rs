//! `guard_release.lua`: gives up a claimed idempotency key.

use std::sync::LazyLock;

use redis::Script;
use saga_core::StoreError;

use super::call::{Answer, Call, ReplyCode, with_prelude};
use crate::store::RedisStore;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("guard_release.lua")));

/// [`SagaStore::guard_release`](saga_core::SagaStore::guard_release).
pub(crate) async fn guard_release(
    store: &RedisStore,
    key: &str,
    token: &str,
) -> Result<(), StoreError> {
    let guard_key = store.keys().guard(key);
    let call = Call::new("guard_release", &SCRIPT)
        .wait_on(guard_key.clone())
        .key(&guard_key)
        .arg(token);
    store
        .call(call, |code, reply| match code {
            // Released only when the token held an in-progress claim.
            ReplyCode::Ok if reply.flag()? => Ok(Answer::Wrote(())),
            ReplyCode::Ok => Ok(Answer::Read(())),
            _ => Ok(Answer::Refused),
        })
        .await
}
