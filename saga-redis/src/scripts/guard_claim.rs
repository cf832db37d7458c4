//! `guard_claim.lua`: claims an idempotency record for running an effect.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use saga_core::StoreError;
use saga_core::store::GuardClaim;
use uuid::Uuid;

use super::call::{Answer, Call, ReplyCode, with_prelude};
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("guard_claim.lua")));

/// [`SagaStore::guard_claim`](saga_core::SagaStore::guard_claim).
pub(crate) async fn guard_claim(
    store: &RedisStore,
    key: &str,
    fingerprint: &str,
    in_progress_ttl: Duration,
) -> Result<GuardClaim, StoreError> {
    store.check_size("idempotency key", key)?;
    store.check_size("fingerprint", fingerprint)?;
    let guard_key = store.keys().guard(key);
    let token = Uuid::new_v4().to_string();
    let call = Call::new("guard_claim", &SCRIPT)
        .wait_on(guard_key.clone())
        .key(&guard_key)
        .arg(fingerprint)
        .arg(&token)
        .arg(ms(in_progress_ttl))
        .arg(store.max_payload());
    store
        .call(call, |code, reply| match code {
            ReplyCode::Claimed => Ok(Answer::Wrote(GuardClaim::Claimed { token })),
            // The record found may have been completed on this connection by a call whose
            // replica wait failed: it is trusted (the effect not run again) only once the
            // replicas have it too.
            ReplyCode::Completed => Ok(Answer::Wrote(GuardClaim::Completed {
                result: reply.string()?,
            })),
            ReplyCode::InProgress => Ok(Answer::Read(GuardClaim::InProgress)),
            ReplyCode::Conflict => Ok(Answer::Read(GuardClaim::Conflict)),
            _ => Ok(Answer::Refused),
        })
        .await
}
