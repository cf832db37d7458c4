//! `list.lua`: one bounded slice of one partition's listing; the client pages the slices and
//! merges the partitions.

use std::sync::LazyLock;

use futures_util::future::join_all;
use redis::Script;
use saga_core::store::{ListPage, ListQuery, SagaSummary};
use saga_core::{SagaId, SagaStatus, StoreError, Timestamp};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::reply::Reply;
use crate::error::unexpected;
use crate::store::RedisStore;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("list.lua")));

/// The largest page a listing returns.
const MAX_PAGE: usize = 1000;

/// Ids one `list.lua` call examines at most (bounds the script's run time).
pub(crate) const LIST_BUDGET: usize = 2000;

/// [`SagaStore::list`](saga_core::SagaStore::list): every partition concurrently, merged in
/// id order.
pub(crate) async fn list(store: &RedisStore, query: &ListQuery) -> Result<ListPage, StoreError> {
    let limit = query.limit.clamp(1, MAX_PAGE);
    let want = limit + 1;
    let partitions = (0..store.keys().partitions()).map(|p| list_partition(store, p, query, want));
    let mut rows = Vec::new();
    for result in join_all(partitions).await {
        rows.extend(result?);
    }
    rows.sort_by_key(|row| row.id);
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|row| row.id)
    } else {
        None
    };
    Ok(ListPage { sagas: rows, next })
}

/// One slice: whether the index is exhausted, the last id examined, and the rows.
struct Slice {
    exhausted: bool,
    last: String,
    rows: Vec<SagaSummary>,
}

/// Lists one partition: up to `want` matching rows after `after`, in id order.
async fn list_partition(
    store: &RedisStore,
    p: u16,
    query: &ListQuery,
    want: usize,
) -> Result<Vec<SagaSummary>, StoreError> {
    let keys = store.keys();
    let index = match (&query.status, &query.saga_type) {
        (Some(status), _) => keys.status(p, *status),
        (None, Some(saga_type)) => keys.type_index(p, saga_type),
        (None, None) => keys.ids(p),
    };
    let mut cursor = query.after.map(|id| id.to_string()).unwrap_or_default();
    let mut rows = Vec::new();
    loop {
        let call = Call::new("list", &SCRIPT)
            .key(&index)
            .key(keys.quarantine(p))
            .arg(keys.partition_base(p))
            .arg(&cursor)
            .arg(want - rows.len())
            .arg(LIST_BUDGET)
            .arg(query.status.map_or("", SagaStatus::as_str))
            .arg(query.saga_type.as_deref().unwrap_or(""));
        let slice = store
            .call(call, |code, reply| match code {
                ReplyCode::Ok => decode_slice(reply, &index).map(Answer::Read),
                _ => Ok(Answer::Refused),
            })
            .await?;
        rows.extend(slice.rows);
        if slice.exhausted || rows.len() >= want || slice.last.is_empty() {
            return Ok(rows);
        }
        cursor = slice.last;
    }
}

/// What follows `ok`: the flags, the rows of 6, then one quarantine flag per row.
fn decode_slice(reply: &mut Reply, index: &str) -> Result<Slice, StoreError> {
    let exhausted = reply.flag()?;
    let last = reply.string()?;
    let count = reply.count()?;
    let mut page = Vec::with_capacity(count);
    for _ in 0..count {
        page.push(decode_row(reply, index)?);
    }
    let mut rows = Vec::with_capacity(count);
    for (row, reason) in page {
        let quarantined = reply.flag()?;
        rows.push(SagaSummary {
            quarantined: quarantined.then_some(reason),
            ..row
        });
    }
    Ok(Slice {
        exhausted,
        last,
        rows,
    })
}

/// One row (without its quarantine flag, which follows the rows) and its quarantine reason.
fn decode_row(reply: &mut Reply, index: &str) -> Result<(SagaSummary, String), StoreError> {
    let id_text = reply.string()?;
    let id: SagaId = id_text
        .parse()
        .map_err(|_| unexpected("list", &format!("saga id {id_text:?} in {index}")))?;
    let saga_type = reply.string()?;
    let status = reply.status(id)?;
    let updated = reply.string()?;
    let updated_at = updated
        .parse()
        .map(Timestamp)
        .map_err(|_| StoreError::Corrupt {
            saga: id,
            problem: format!("field updated_at is {updated:?}, expected milliseconds"),
        })?;
    let version = parse_version(id, &reply.string()?)?;
    let reason = reply.string()?;
    let summary = SagaSummary {
        id,
        saga_type,
        status,
        version,
        updated_at,
        quarantined: None,
    };
    Ok((summary, reason))
}

/// A saga's `version` field as a script returns it: '' for a saga stored before versions
/// were kept.
pub(crate) fn parse_version(id: SagaId, text: &str) -> Result<Option<u32>, StoreError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| StoreError::Corrupt {
        saga: id,
        problem: format!("field version is {text:?}, expected an unsigned 32-bit integer"),
    })
}
