//! `load.lua`: reads one saga, and decodes its hash.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::Script;
use saga_core::store::{LeaseInfo, StoredSaga};
use saga_core::{SagaId, SagaStatus, StoreError, Timestamp};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::lease_call;
use super::reply::Reply;
use crate::store::RedisStore;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("load.lua")));

/// [`SagaStore::load`](saga_core::SagaStore::load).
pub(crate) async fn load(store: &RedisStore, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
    let call = lease_call(Call::new("load", &SCRIPT), store.keys(), id, 0).arg(id.to_string());
    store
        .call(call, |code, reply| match code {
            ReplyCode::Ok => decode_reply(id, reply).map(|saga| Answer::Read(Some(saga))),
            ReplyCode::NotFound => Ok(Answer::Read(None)),
            ReplyCode::Corrupt => {
                let problem = reply.string()?;
                let quarantined = reply.flag()?;
                let reason = reply.string()?;
                let problem = if quarantined {
                    format!("{problem} (quarantined: {reason})")
                } else {
                    problem
                };
                Err(StoreError::Corrupt { saga: id, problem })
            }
            _ => Ok(Answer::Refused),
        })
        .await
}

/// What follows `ok`: now, due, quarantine flag and reason, then the hash's fields.
fn decode_reply(id: SagaId, reply: &mut Reply) -> Result<StoredSaga, StoreError> {
    let now = reply.uint()?;
    let due = reply.string()?;
    let quarantined = reply.flag()?;
    let reason = reply.string()?;
    let mut fields: HashMap<String, String> = HashMap::new();
    let rest = reply.rest()?;
    for pair in rest.chunks_exact(2) {
        fields.insert(pair[0].clone(), pair[1].clone());
    }
    decode_saga(id, now, &due, quarantined.then_some(reason), fields)
}

/// Builds a [`StoredSaga`] from the fields of its hash; a missing or malformed field is
/// [`StoreError::Corrupt`] naming it.
fn decode_saga(
    id: SagaId,
    now: u64,
    due: &str,
    quarantined: Option<String>,
    mut fields: HashMap<String, String>,
) -> Result<StoredSaga, StoreError> {
    let corrupt = |problem: String| StoreError::Corrupt { saga: id, problem };
    let mut take = |name: &str| {
        fields
            .remove(name)
            .ok_or_else(|| corrupt(format!("field {name} is missing from the saga hash")))
    };
    let number = |name: &str, text: &str| {
        text.parse::<u64>().map_err(|_| {
            corrupt(format!(
                "field {name} is {text:?}, expected a non-negative integer"
            ))
        })
    };
    let saga_type = take("type")?;
    let status_text = take("status")?;
    let status: SagaStatus = status_text
        .parse()
        .map_err(|err| corrupt(format!("field status: {err}")))?;
    let state = take("state")?;
    let fingerprint = take("fingerprint")?;
    let cancel = take("cancel")?;
    let cancel_requested = match cancel.as_str() {
        "0" => false,
        "1" => true,
        other => {
            return Err(corrupt(format!(
                "field cancel is {other:?}, expected 0 or 1"
            )));
        }
    };
    let fence = number("fence", &take("fence")?)?;
    let updated_at = Timestamp(number("updated_at", &take("updated_at")?)?);
    let lease = match (fields.remove("owner"), fields.remove("lease_until")) {
        (Some(owner), Some(until)) => {
            let expires_at = number("lease_until", &until)?;
            (expires_at > now).then_some(LeaseInfo {
                owner,
                expires_at: Timestamp(expires_at),
            })
        }
        _ => None,
    };
    let due_at = if due.is_empty() {
        None
    } else {
        let score: f64 = due
            .parse()
            .map_err(|_| corrupt(format!("due time {due:?} is not a number")))?;
        // Whole milliseconds by construction.
        Some(Timestamp(score.max(0.0) as u64))
    };
    Ok(StoredSaga {
        id,
        saga_type,
        status,
        state,
        fingerprint,
        cancel_requested,
        fence,
        lease,
        due_at,
        quarantined,
        updated_at,
    })
}
