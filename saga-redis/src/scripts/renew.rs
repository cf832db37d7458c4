//! `renew.lua`: extends a held lease.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use saga_core::StoreError;
use saga_core::store::{CommitOutcome, Lease};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::lease_call;
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("renew.lua")));

/// [`SagaStore::renew`](saga_core::SagaStore::renew).
pub(crate) async fn renew(
    store: &RedisStore,
    lease: &Lease,
    ttl: Duration,
) -> Result<CommitOutcome, StoreError> {
    let id = lease.saga_id;
    let call = lease_call(Call::new("renew", &SCRIPT), store.keys(), id, lease.fence)
        .arg(id.to_string())
        .arg(&lease.owner)
        .arg(lease.fence)
        .arg(ms(ttl))
        .arg(store.max_payload());
    store
        .call(call, |code, reply| match code {
            ReplyCode::Ok => Ok(Answer::Wrote(CommitOutcome {
                cancel_requested: reply.flag()?,
            })),
            _ => Ok(Answer::Refused),
        })
        .await
}
