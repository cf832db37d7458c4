//! `claim_due` on Redis: batched claims that visit only the partitions that may have due work
//! (see [`crate::hints`]).
//!
//! - Standalone: one `claim_due.lua` call over every partition to visit, which merges their
//!   due sets and claims the oldest entries first: one round trip per batch, however many
//!   partitions there are (up to [`MAX_PARTITIONS_PER_CALL`]).
//! - Redis Cluster (or more partitions than that): partitions live in different slots, so the
//!   oldest due entries are first peeked in every partition to visit (concurrently; reads),
//!   then each partition that holds some of the batch is claimed from with its share, all
//!   partitions concurrently. With a single partition to visit the peek is skipped.
//!
//! Either way the batch is the oldest due sagas over all the visited partitions: a busy
//! partition cannot starve another one, and a burst of new sagas (due when created) cannot
//! starve retries and lapsed leases that fell due before it.

use std::collections::{BTreeMap, HashMap};

use futures_util::future::join_all;
use redis::Value;
use saga_core::StoreError;
use saga_core::store::{ClaimRequest, Lease};

use crate::connection::Connection;
use crate::error::{redis_error, unexpected};
use crate::hints::client_now_ms;
use crate::scripts::claim_due::claim_from;
use crate::store::RedisStore;

/// The most partitions one standalone claim call looks at; with more, partitions are peeked
/// and claimed from one by one (concurrently), which bounds each script's run time.
const MAX_PARTITIONS_PER_CALL: usize = 64;

/// The most sagas one claim call takes (the script's own bound).
const MAX_BATCH: usize = 1000;

impl RedisStore {
    /// [`SagaStore::claim_due`](saga_core::SagaStore::claim_due) for Redis.
    pub(crate) async fn claim_due_batch(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let limit = limit.min(MAX_BATCH);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let visit = self.inner.hints.plan();
        if visit.partitions.is_empty() {
            return Ok(Vec::new());
        }
        let standalone = matches!(self.inner.conn, Connection::Standalone(_));
        let one_call = visit.partitions.len() == 1
            || (standalone && visit.partitions.len() <= MAX_PARTITIONS_PER_CALL);
        let result = if one_call {
            match claim_from(self, request, &visit.partitions, limit).await {
                Ok(leases) => Ok(leases.into_iter().map(|(_, l)| l).collect()),
                // One partition's keys are damaged (a wrong type): claim from the others one
                // by one, so that it does not stop claiming everywhere.
                Err(StoreError::Corrupt { problem, .. }) if visit.partitions.len() > 1 => {
                    tracing::warn!(%problem, "claim_due: a partition's keys are damaged; claiming partition by partition");
                    self.claim_one_by_one(request, &visit.partitions, limit)
                        .await
                }
                Err(err) => Err(err),
            }
        } else {
            self.peek_then_claim(request, &visit.partitions, limit)
                .await
        };
        if result.is_err() {
            // Nothing was learnt about these partitions: look at them again next time.
            self.inner.hints.retry(&visit.partitions);
        }
        result
    }

    /// Claims from each partition in turn until `limit` are taken, skipping (and logging)
    /// partitions that fail.
    async fn claim_one_by_one(
        &self,
        request: &ClaimRequest,
        partitions: &[u16],
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let mut leases = Vec::new();
        let mut failure = None;
        for &p in partitions {
            if leases.len() >= limit {
                // Not visited this time: look again next time.
                self.inner.hints.mark_dirty(p);
                continue;
            }
            match claim_from(self, request, &[p], limit - leases.len()).await {
                Ok(claimed) => leases.extend(claimed.into_iter().map(|(_, l)| l)),
                Err(err) => {
                    tracing::warn!(partition = p, error = %err, "claim_due: a partition could not be claimed from");
                    failure.get_or_insert(err);
                }
            }
        }
        match failure {
            Some(err) if leases.is_empty() => Err(err),
            _ => Ok(leases),
        }
    }

    /// The cluster path: peek the oldest due entries of every partition, pick the oldest
    /// `limit` over all of them, then claim each partition's share, concurrently.
    async fn peek_then_claim(
        &self,
        request: &ClaimRequest,
        partitions: &[u16],
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let mut candidates = Vec::new();
        let mut oldest: HashMap<u16, u64> = HashMap::new();
        let peeks = partitions.iter().map(|&p| self.peek(p, limit));
        let mut failure = None;
        for (&p, result) in partitions.iter().zip(join_all(peeks).await) {
            let head = match result {
                Ok(head) => head,
                // One partition failing (a node away, a damaged key) must not stop the others.
                Err(err) => {
                    tracing::warn!(partition = p, error = %err, "claim_due: a partition could not be peeked");
                    self.inner.hints.mark_dirty(p);
                    failure.get_or_insert(err);
                    continue;
                }
            };
            match head.first() {
                Some((score, _)) => {
                    oldest.insert(p, *score);
                }
                None => self.inner.hints.visited(p, None),
            }
            candidates.extend(head.into_iter().map(|(score, id)| (score, p, id)));
        }
        if candidates.is_empty()
            && let Some(err) = failure
        {
            return Err(err);
        }
        candidates.sort();
        candidates.truncate(limit);
        let order: HashMap<String, usize> = candidates
            .iter()
            .enumerate()
            .map(|(i, (_, _, id))| (id.clone(), i))
            .collect();
        let mut shares: BTreeMap<u16, usize> = BTreeMap::new();
        for (_, p, _) in &candidates {
            *shares.entry(*p).or_default() += 1;
        }
        let now = client_now_ms();
        for (&p, &score) in &oldest {
            if !shares.contains_key(&p) {
                // Peeked but left out of this batch: visit it again once its head is due
                // (the peek's scores are the server's clock; a sweep covers any skew).
                if score <= now {
                    self.inner.hints.mark_dirty(p);
                } else {
                    self.inner.hints.visited(p, Some(score));
                }
            }
        }
        let claims = shares
            .iter()
            .map(|(&p, &share)| async move { (p, claim_from(self, request, &[p], share).await) });
        let mut leases = Vec::new();
        let mut failure = None;
        for (p, result) in join_all(claims).await {
            match result {
                Ok(claimed) => leases.extend(claimed),
                // One partition failing must not drop the leases already taken in others
                // (those sagas would stall until their leases lapse).
                Err(err) => {
                    tracing::warn!(partition = p, error = %err, "claim_due: a partition could not be claimed from");
                    self.inner.hints.mark_dirty(p);
                    failure.get_or_insert(err);
                }
            }
        }
        if leases.is_empty()
            && let Some(err) = failure
        {
            return Err(err);
        }
        leases.sort_by_key(|(id, _)| order.get(id).copied().unwrap_or(usize::MAX));
        Ok(leases.into_iter().map(|(_, lease)| lease).collect())
    }

    /// The oldest `limit` entries of partition `p`'s due set, due or not: (score, id).
    async fn peek(&self, p: u16, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        let key = self.inner.keys.due(p);
        let mut conn = self.inner.conn.clone();
        let value: Value = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(|err| redis_error("claim_due", None, err))?;
        let flat = flatten(value);
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            out.push((parse_score(&pair[1], p)?, pair[0].clone()));
        }
        Ok(out)
    }
}

/// A due score (whole milliseconds by construction; garbage is saturated, never trusted
/// for more than a hint).
pub(crate) fn parse_score(text: &str, p: u16) -> Result<u64, StoreError> {
    let score = text
        .parse::<f64>()
        .map_err(|_| unexpected("claim_due", &format!("due score {text:?} in partition {p}")))?;
    // The saturating cast keeps garbage finite.
    Ok(score.max(0.0) as u64)
}

/// A flat array of strings (RESP2 `WITHSCORES`), or nested pairs (RESP3), as strings.
fn flatten(value: Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(value: Value, out: &mut Vec<String>) {
        match value {
            Value::Array(items) | Value::Set(items) => {
                for item in items {
                    walk(item, out);
                }
            }
            Value::BulkString(bytes) => out.push(String::from_utf8_lossy(&bytes).into_owned()),
            Value::SimpleString(text) => out.push(text),
            Value::Int(n) => out.push(n.to_string()),
            Value::Double(x) => out.push(x.to_string()),
            _ => {}
        }
    }
    walk(value, &mut out);
    out
}
