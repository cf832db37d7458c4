//! `claim.lua`: takes the lease of one saga.

use std::sync::LazyLock;

use redis::Script;
use saga_core::store::{ClaimOutcome, ClaimRequest, Lease, LeaseInfo};
use saga_core::{SagaId, StoreError, Timestamp};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::lease_call;
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("claim.lua")));

/// [`SagaStore::claim`](saga_core::SagaStore::claim).
pub(crate) async fn claim(
    store: &RedisStore,
    id: SagaId,
    request: &ClaimRequest,
) -> Result<ClaimOutcome, StoreError> {
    let call = lease_call(Call::new("claim", &SCRIPT), store.keys(), id, 0)
        .arg(id.to_string())
        .arg(&request.owner)
        .arg(ms(request.ttl))
        .arg(store.max_payload());
    store
        .call(call, |code, reply| match code {
            ReplyCode::Claimed => Ok(Answer::Wrote(ClaimOutcome::Claimed(Lease {
                saga_id: id,
                owner: request.owner.clone(),
                fence: reply.uint()?,
            }))),
            ReplyCode::Busy => {
                let owner = reply.string()?;
                let expires_at = Timestamp(reply.uint()?);
                Ok(Answer::Read(ClaimOutcome::Busy(LeaseInfo {
                    owner,
                    expires_at,
                })))
            }
            ReplyCode::NotRunnable => {
                let status = reply.status(id)?;
                let quarantined = reply.flag()?;
                let reason = reply.string()?;
                Ok(Answer::Read(ClaimOutcome::NotRunnable {
                    status,
                    quarantined: quarantined.then_some(reason),
                }))
            }
            _ => Ok(Answer::Refused),
        })
        .await
}
