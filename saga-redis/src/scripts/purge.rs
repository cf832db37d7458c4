//! `purge.lua`: deletes old finished sagas, one partition per call.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use saga_core::StoreError;

use super::call::{Answer, Call, ReplyCode, with_prelude};
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("purge.lua")));

/// [`SagaStore::purge`](saga_core::SagaStore::purge): the partitions in turn, until `limit`
/// sagas are deleted.
pub(crate) async fn purge(
    store: &RedisStore,
    older_than: Duration,
    limit: usize,
) -> Result<u64, StoreError> {
    let mut deleted: u64 = 0;
    for p in 0..store.keys().partitions() {
        let remaining = u64::try_from(limit)
            .unwrap_or(u64::MAX)
            .saturating_sub(deleted);
        if remaining == 0 {
            break;
        }
        deleted += purge_partition(store, p, older_than, remaining).await?;
    }
    Ok(deleted)
}

/// One call on partition `p`: how many sagas it deleted.
async fn purge_partition(
    store: &RedisStore,
    p: u16,
    older_than: Duration,
    limit: u64,
) -> Result<u64, StoreError> {
    let keys = store.keys();
    let terminal = keys.terminal(p);
    let call = Call::new("purge", &SCRIPT)
        .wait_on(terminal.clone())
        .key(&terminal)
        .key(keys.ids(p))
        .key(keys.due(p))
        .key(keys.quarantine(p))
        .keys(keys.statuses(p))
        .arg(keys.partition_base(p))
        .arg(ms(older_than))
        .arg(limit);
    store
        .call(call, |code, reply| match code {
            ReplyCode::Ok => {
                let n = reply.uint()?;
                Ok(if n > 0 {
                    Answer::Wrote(n)
                } else {
                    Answer::Read(n)
                })
            }
            _ => Ok(Answer::Refused),
        })
        .await
}
