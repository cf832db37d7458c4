//! `signals.lua`: a saga's signal inbox; and the encoding of an inbox entry, which
//! `deliver_signal` writes and this module reads.

use std::sync::LazyLock;

use redis::Script;
use saga_core::store::{SignalDelivery, StoredSignal};
use saga_core::{SagaId, StoreError};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::saga_call;
use crate::store::RedisStore;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("signals.lua")));

/// The largest `after` sent to the script (15 digits, what its integer check accepts): an
/// inbox never holds that many signals, so a larger one reads the same (nothing).
const MAX_AFTER: u64 = 999_999_999_999_999;

/// The inbox entry of `delivery`: a JSON object with its name, key, payload and sending
/// time. The sequence number is not in it: it is the entry's position in the inbox.
pub(crate) fn encode_entry(delivery: &SignalDelivery) -> String {
    serde_json::json!({
        "name": delivery.name,
        "key": delivery.key,
        "payload": delivery.payload,
        "at": delivery.at,
    })
    .to_string()
}

/// The signal that inbox entry `entry` of saga `id` stands for, under `sequence`; an entry
/// that is not one [`encode_entry`] wrote is [`StoreError::Corrupt`].
fn decode_entry(id: SagaId, sequence: u64, entry: &str) -> Result<StoredSignal, StoreError> {
    let corrupt = |problem: String| StoreError::Corrupt {
        saga: id,
        problem: format!("signal {sequence} of the inbox {problem}"),
    };
    let mut value: serde_json::Value = serde_json::from_str(entry)
        .map_err(|err| corrupt(format!("is not JSON ({err}): {entry:.80}")))?;
    let Some(fields) = value.as_object_mut() else {
        return Err(corrupt(format!("is not a JSON object: {entry:.80}")));
    };
    fields.insert("sequence".to_owned(), sequence.into());
    serde_json::from_value(value).map_err(|err| corrupt(format!("is malformed: {err}")))
}

/// [`SagaStore::signals`](saga_core::SagaStore::signals).
pub(crate) async fn signals(
    store: &RedisStore,
    id: SagaId,
    after: u64,
) -> Result<Vec<StoredSignal>, StoreError> {
    let keys = store.keys();
    let call = saga_call(Call::new("signals", &SCRIPT), keys, id, 0)
        .key(keys.signals(id))
        .arg(after.min(MAX_AFTER));
    store
        .call(call, |code, reply| match code {
            ReplyCode::Ok => {
                let first = reply.uint()?;
                let signals = (first..)
                    .zip(reply.rest()?)
                    .map(|(sequence, entry)| decode_entry(id, sequence, &entry))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Answer::Read(signals))
            }
            _ => Ok(Answer::Refused),
        })
        .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use saga_core::Timestamp;

    use super::*;

    #[test]
    fn an_entry_round_trips_byte_for_byte() {
        let delivery = SignalDelivery {
            name: "approval\0x".into(),
            key: "k\"1\"".into(),
            payload: "{\"v\":\"\u{e9}\\n\"}".into(),
            at: Timestamp(u64::MAX),
            event: String::new(),
        };
        let id = SagaId::random();
        let signal = decode_entry(id, 7, &encode_entry(&delivery)).unwrap();
        assert_eq!(
            signal,
            StoredSignal {
                sequence: 7,
                name: delivery.name,
                key: delivery.key,
                payload: delivery.payload,
                at: delivery.at,
            }
        );
    }

    #[test]
    fn a_malformed_entry_is_corrupt_naming_the_saga() {
        let id = SagaId::random();
        for entry in ["not json", "[1]", r#"{"name":"a","key":"b","at":1}"#] {
            let err = decode_entry(id, 3, entry).unwrap_err();
            assert!(
                matches!(&err, StoreError::Corrupt { saga, problem } if *saga == id && problem.contains("signal 3")),
                "{entry}: {err:?}"
            );
        }
    }
}
