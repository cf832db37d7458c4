//! `claim_due.lua`: claims the oldest due sagas of one or more partitions in one call (the
//! planning of which partitions to visit is `crate::claim`).

use std::sync::LazyLock;

use redis::Script;
use saga_core::StoreError;
use saga_core::store::{ClaimRequest, Lease};

use super::call::{Answer, Call, ReplyCode, with_prelude};
use super::reply::Reply;
use crate::claim::parse_score;
use crate::error::unexpected;
use crate::hints::client_now_ms;
use crate::store::{RedisStore, ms};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("claim_due.lua")));

/// One `claim_due.lua` call over `partitions` (on a cluster: exactly one partition): the
/// leases taken, as (id as text, lease), oldest due first. Tells the due hints what it found
/// in each partition.
pub(crate) async fn claim_from(
    store: &RedisStore,
    request: &ClaimRequest,
    partitions: &[u16],
    limit: usize,
) -> Result<Vec<(String, Lease)>, StoreError> {
    let keys = store.keys();
    let mut call = Call::new("claim_due", &SCRIPT).wait_logged();
    if let Some(&first) = partitions.first() {
        call = call.wait_on(keys.due(first));
    }
    for &p in partitions {
        call = call.key(keys.due(p)).key(keys.quarantine(p));
    }
    let call = call
        .arg(&request.owner)
        .arg(ms(request.ttl))
        .arg(store.max_payload())
        .arg(limit)
        .args(partitions.iter().map(|&p| keys.partition_base(p)));
    store
        .call(call, |code, reply| match code {
            ReplyCode::Ok => decode(store, reply, request, partitions),
            _ => Ok(Answer::Refused),
        })
        .await
}

/// What follows `ok`: the server's now, the claims, the sagas set aside, and each
/// partition's next due time (fed to the hints).
fn decode(
    store: &RedisStore,
    reply: &mut Reply,
    request: &ClaimRequest,
    partitions: &[u16],
) -> Result<Answer<Vec<(String, Lease)>>, StoreError> {
    let server_now = reply.uint()?;
    let client_now = client_now_ms();
    let mut leases = Vec::new();
    for _ in 0..reply.count()? {
        let id = reply.string()?;
        let fence = reply.uint()?;
        let saga_id = id
            .parse()
            .map_err(|_| unexpected("claim_due", &format!("saga id {id:?}")))?;
        let owner = request.owner.clone();
        leases.push((
            id,
            Lease {
                saga_id,
                owner,
                fence,
            },
        ));
    }
    let mut set_aside = 0;
    for _ in 0..reply.count()? {
        let id = reply.string()?;
        let reason = reply.string()?;
        set_aside += 1;
        tracing::warn!(saga_id = %id, %reason, "quarantined a corrupt saga found by claim_due");
    }
    let visited = reply.count()?;
    if visited != partitions.len() {
        return Err(unexpected(
            "claim_due",
            &format!(
                "{visited} next due times for {} partitions",
                partitions.len()
            ),
        ));
    }
    for &p in partitions {
        let next = reply.string()?;
        let next_due = if next.is_empty() {
            None
        } else {
            let score = parse_score(&next, p)?;
            // On the client's clock: the hints compare with it.
            Some(client_now.saturating_add(score.saturating_sub(server_now)))
        };
        store.hints().visited(p, next_due);
    }
    Ok(if leases.is_empty() && set_aside == 0 {
        Answer::Read(leases)
    } else {
        Answer::Wrote(leases)
    })
}
