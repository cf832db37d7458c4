//! `guard_complete.lua`: records an effect's result under a claimed key.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use saga_core::StoreError;

use super::call::{Answer, Call, ReplyCode, with_prelude};
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("guard_complete.lua")));

/// [`SagaStore::guard_complete`](saga_core::SagaStore::guard_complete).
pub(crate) async fn guard_complete(
    store: &RedisStore,
    key: &str,
    token: &str,
    result: &str,
    ttl: Duration,
) -> Result<(), StoreError> {
    store.check_size("idempotency result", result)?;
    let guard_key = store.keys().guard(key);
    let call = Call::new("guard_complete", &SCRIPT)
        .wait_on(guard_key.clone())
        .key(&guard_key)
        .arg(token)
        .arg(result)
        .arg(ms(ttl))
        .arg(store.max_payload());
    store
        .call(call, |code, _| match code {
            ReplyCode::Ok => Ok(Answer::Wrote(())),
            ReplyCode::Lost => Err(StoreError::Invalid(format!(
                "idempotency key {key}: the claim expired and was taken over before the result was recorded"
            ))),
            _ => Ok(Answer::Refused),
        })
        .await
}
