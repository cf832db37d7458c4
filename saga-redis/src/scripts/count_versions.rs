//! `count_versions.lua`: active sagas by type and workflow version, one bounded slice of one
//! status index per call; partitions concurrently.

use std::sync::LazyLock;

use futures_util::future::join_all;
use redis::Script;
use saga_core::store::VersionCount;
use saga_core::{SagaStatus, StoreError};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::list::{LIST_BUDGET, parse_version};
use super::reply::Reply;
use crate::store::{RedisStore, nil_id};

static SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("count_versions.lua")));

/// The statuses whose sagas count as active.
const ACTIVE: [SagaStatus; 2] = [SagaStatus::Running, SagaStatus::Compensating];

/// One tally: (type, version, status, sagas).
type Tally = (String, Option<u32>, SagaStatus, u64);

/// [`SagaStore::count_active_by_version`](saga_core::SagaStore::count_active_by_version).
pub(crate) async fn count_active_by_version(
    store: &RedisStore,
) -> Result<Vec<VersionCount>, StoreError> {
    let partitions = (0..store.keys().partitions()).map(|p| count_partition(store, p));
    let mut tallies = Vec::new();
    for result in join_all(partitions).await {
        tallies.extend(result?);
    }
    Ok(VersionCount::tally(tallies))
}

/// One slice: whether the index is exhausted, the last id examined, and its tallies.
struct Slice {
    exhausted: bool,
    last: String,
    tallies: Vec<Tally>,
}

/// Partition `p`'s tallies: each active status index, slice by slice.
async fn count_partition(store: &RedisStore, p: u16) -> Result<Vec<Tally>, StoreError> {
    let keys = store.keys();
    let mut tallies = Vec::new();
    for status in ACTIVE {
        let mut cursor = String::new();
        loop {
            let call = Call::new("count_active_by_version", &SCRIPT)
                .key(keys.status(p, status))
                .arg(keys.partition_base(p))
                .arg(status.as_str())
                .arg(&cursor)
                .arg(LIST_BUDGET);
            let slice = store
                .call(call, |code, reply| match code {
                    ReplyCode::Ok => decode_slice(reply, status).map(Answer::Read),
                    _ => Ok(Answer::Refused),
                })
                .await?;
            tallies.extend(slice.tallies);
            if slice.exhausted || slice.last.is_empty() {
                break;
            }
            cursor = slice.last;
        }
    }
    Ok(tallies)
}

/// What follows `ok`: the flags, then the groups of 3 (type, version, count).
fn decode_slice(reply: &mut Reply, status: SagaStatus) -> Result<Slice, StoreError> {
    let exhausted = reply.flag()?;
    let last = reply.string()?;
    let groups = reply.count()?;
    let mut tallies = Vec::with_capacity(groups);
    for _ in 0..groups {
        let saga_type = reply.string()?;
        let version = parse_version(nil_id(), &reply.string()?)?;
        let count = reply.uint()?;
        tallies.push((saga_type, version, status, count));
    }
    Ok(Slice {
        exhausted,
        last,
        tallies,
    })
}
