//! `deliver_signal.lua`: stores a signal in a saga's inbox, once per (name, key).

use std::sync::LazyLock;

use redis::Script;
use saga_core::store::{DeliveryOutcome, MAX_SIGNALS_PER_SAGA, SignalDelivery};
use saga_core::{SagaId, StoreError};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::saga_call;
use super::signals::encode_entry;
use crate::store::RedisStore;

static SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("deliver_signal.lua")));

/// [`SagaStore::deliver_signal`](saga_core::SagaStore::deliver_signal).
pub(crate) async fn deliver_signal(
    store: &RedisStore,
    id: SagaId,
    delivery: SignalDelivery,
) -> Result<DeliveryOutcome, StoreError> {
    store.check_size("signal payload", &delivery.payload)?;
    store.check_size("event", &delivery.event)?;
    let keys = store.keys();
    let p = keys.partition_of(id);
    let call = saga_call(Call::new("deliver_signal", &SCRIPT), keys, id, 0)
        .key(keys.events(id))
        .key(keys.due(p))
        .key(keys.quarantine(p))
        .key(keys.signals(id))
        .key(keys.signal_keys(id))
        .arg(id.to_string())
        .arg(&delivery.name)
        .arg(&delivery.key)
        .arg(&delivery.payload)
        .arg(encode_entry(&delivery))
        .arg(&delivery.event)
        .arg(store.max_payload())
        .arg(MAX_SIGNALS_PER_SAGA);
    store
        .call(call, |code, reply| match code {
            ReplyCode::Delivered => {
                let sequence = reply.uint()?;
                if reply.flag()? {
                    store.hints().mark_dirty(p);
                }
                Ok(Answer::Wrote(DeliveryOutcome::Delivered { sequence }))
            }
            // The signal found may be this sender's own earlier delivery whose replica wait
            // failed: answered only after the replica wait, as the delivery would have been.
            ReplyCode::Duplicate => Ok(Answer::Wrote(DeliveryOutcome::Duplicate {
                sequence: reply.uint()?,
            })),
            ReplyCode::Conflict => Err(StoreError::SignalConflict {
                saga: id,
                name: delivery.name.clone(),
                key: delivery.key.clone(),
            }),
            ReplyCode::InboxFull => Err(StoreError::InboxFull {
                saga: id,
                limit: usize::try_from(reply.uint()?).unwrap_or(usize::MAX),
            }),
            ReplyCode::Finished => Ok(Answer::Read(DeliveryOutcome::AlreadyFinished(
                reply.status(id)?,
            ))),
            _ => Ok(Answer::Refused),
        })
        .await
}
