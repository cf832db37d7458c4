//! `create.lua`: create-if-absent, optionally with the creator's lease.

use std::sync::LazyLock;

use redis::Script;
use saga_core::store::{CreateOutcome, Lease, NewSaga};
use saga_core::{SagaStatus, StoreError};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::saga_call;
use crate::keys::KeyLayout;
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("create.lua")));

/// [`SagaStore::create`](saga_core::SagaStore::create).
pub(crate) async fn create(store: &RedisStore, new: NewSaga) -> Result<CreateOutcome, StoreError> {
    new.validate(store.max_payload())?;
    let keys = store.keys();
    let id = new.id;
    let p = keys.partition_of(id);
    let call = saga_call(Call::new("create", &SCRIPT), keys, id, 0)
        .key(keys.events(id))
        .key(keys.due(p))
        .key(keys.ids(p))
        .key(keys.status(p, SagaStatus::Running))
        .key(keys.type_index(p, &new.saga_type))
        .arg(id.to_string())
        .arg(&new.saga_type)
        .arg(KeyLayout::type_key(&new.saga_type).to_string())
        .arg(&new.fingerprint)
        .arg(new.idempotency_key.as_deref().unwrap_or(""))
        .arg(&new.state)
        .arg(store.max_payload())
        .arg(new.claim.as_ref().map_or("", |claim| claim.owner.as_str()))
        .arg(new.claim.as_ref().map_or(0, |claim| ms(claim.ttl)))
        .arg(new.version)
        .arg(new.events.len())
        .args(&new.events);
    store
        .call(call, |code, reply| match code {
            ReplyCode::Created => {
                let fence = reply.uint()?;
                if new.claim.is_none() {
                    store.hints().mark_dirty(p);
                }
                let lease = new.claim.as_ref().map(|claim| Lease {
                    saga_id: id,
                    owner: claim.owner.clone(),
                    fence,
                });
                Ok(Answer::Wrote(CreateOutcome::Created { lease }))
            }
            // The saga found may be this caller's own create whose replica wait failed (a
            // retried start): answered only after the replica wait too, or a start would be
            // acknowledged while its saga is on the primary alone. `WAIT` covers every write
            // this connection made before it, that create included, as long as the store's
            // multiplexed connection did not reconnect in between (then it proves less).
            ReplyCode::Existing => Ok(Answer::Wrote(CreateOutcome::Existing {
                status: reply.status(id)?,
            })),
            ReplyCode::Conflict => Err(StoreError::IdempotencyConflict { saga: id }),
            _ => Ok(Answer::Refused),
        })
        .await
}
