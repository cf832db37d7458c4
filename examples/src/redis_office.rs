//! The office state (books and ledger) in Redis, so that it survives a `kill -9` of the
//! example together with the sagas, and so that several coordinator processes share one
//! ledger. Keys (one hash tag, so that a Redis Cluster keeps them in one slot):
//! `{<prefix>:office}:books` (JSON of the books), `{<prefix>:office}:results` (HASH
//! idempotency key → result), `{<prefix>:office}:entries` (LIST of ledger entries),
//! `{<prefix>:office}:duplicates` (counter), `{<prefix>:office}:lock`.
//!
//! An effect is applied under a short `SET NX PX` lock and written by one script that first
//! checks that the lock still holds this writer's token and that the key has no result yet:
//! a writer that was paused (`SIGSTOP`, a long GC-like stall) past the lock's lifetime finds
//! its token gone and writes nothing, so books and ledger change together and each key's
//! effect is applied at most once even when two coordinators run the same step.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture};
use serde_json::Value;

use crate::ledger::{BookChange, Books, Entry, Ledger, OfficeState, OfficeStore};
use crate::services::ServiceError;
use crate::world::Caller;

/// How long a lock holder may take before the lock lapses (a crashed holder blocks no longer).
const LOCK_TTL: Duration = Duration::from_secs(2);

const RELEASE: &str = r"
-- KEYS[1] lock key; ARGV[1] owner token. Deletes the lock only if this owner still holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

const COMMIT: &str = r"
-- KEYS: lock, results, books, entries. ARGV: token, idempotency key, result, books, entry.
-- Writes only while this writer still holds the lock and the key has no result yet, then
-- releases the lock.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 0 end
redis.call('SET', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[5])
redis.call('DEL', KEYS[1])
return 1";

/// A connection to one server or to a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The office state in Redis.
#[derive(Clone)]
pub struct RedisOffice {
    conn: Conn,
    books: String,
    results: String,
    entries: String,
    duplicates: String,
    lock: String,
    release: redis::Script,
    commit: redis::Script,
    /// Serializes this process's writers, so that only one of them polls the Redis lock.
    local: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for RedisOffice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOffice")
            .field("books", &self.books)
            .finish_non_exhaustive()
    }
}

fn unavailable(err: &redis::RedisError) -> ServiceError {
    ServiceError::Unavailable(err.to_string())
}

fn corrupt(err: &serde_json::Error) -> ServiceError {
    ServiceError::Corrupt(err.to_string())
}

impl RedisOffice {
    /// Connects to `url` and keeps the state under `<prefix>:office:*`.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self::with(Conn::Standalone(conn), prefix))
    }

    /// Connects to the Redis Cluster whose seed nodes are `urls` and keeps the state under
    /// `{<prefix>:office}:*` (one slot).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn connect_cluster(urls: &[String], prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::cluster::ClusterClient::new(urls.to_vec())?;
        let conn = client.get_async_connection().await?;
        Ok(Self::with(Conn::Cluster(conn), prefix))
    }

    fn with(conn: Conn, prefix: &str) -> Self {
        let base = Self::key_base(prefix);
        Self {
            conn,
            books: format!("{base}:books"),
            results: format!("{base}:results"),
            entries: format!("{base}:entries"),
            duplicates: format!("{base}:duplicates"),
            lock: format!("{base}:lock"),
            release: redis::Script::new(RELEASE),
            commit: redis::Script::new(COMMIT),
            local: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The start of every office key under `prefix`: `{<prefix>:office}`.
    #[must_use]
    pub fn key_base(prefix: &str) -> String {
        format!("{{{prefix}:office}}")
    }

    /// The key of the ledger's entry list under `prefix`.
    #[must_use]
    pub fn entries_key(prefix: &str) -> String {
        format!("{}:entries", Self::key_base(prefix))
    }

    async fn read_books(&self) -> Result<Books, ServiceError> {
        let mut conn = self.conn.clone();
        let text: Option<String> = conn.get(&self.books).await.map_err(|e| unavailable(&e))?;
        text.map_or_else(
            || Ok(Books::default()),
            |t| serde_json::from_str(&t).map_err(|e| corrupt(&e)),
        )
    }

    async fn acquire(&self, token: &str) -> Result<(), ServiceError> {
        let mut conn = self.conn.clone();
        let ttl_ms = u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX);
        // A bounded number of short polls: a live holder needs a few milliseconds, a dead
        // holder's lock lapses after LOCK_TTL.
        for _ in 0..5_000 {
            let set: Option<String> = redis::cmd("SET")
                .arg(&self.lock)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            if set.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Err(ServiceError::Unavailable(format!(
            "lock `{}` stayed taken",
            self.lock
        )))
    }

    async fn release(&self, token: &str) {
        let mut conn = self.conn.clone();
        let released: Result<i64, _> = self
            .release
            .key(&self.lock)
            .arg(token)
            .invoke_async(&mut conn)
            .await;
        if let Err(err) = released {
            tracing::warn!(error = %err, "could not release the office lock; it lapses by itself");
        }
    }

    async fn apply_locked(
        &self,
        token: &str,
        caller: &Caller,
        change: BookChange,
        released: &mut bool,
    ) -> Result<Value, ServiceError> {
        let mut conn = self.conn.clone();
        // One round trip for everything the change needs.
        let (previous, books, seq): (Option<String>, Option<String>, u64) = redis::pipe()
            .hget(&self.results, &caller.key)
            .get(&self.books)
            .llen(&self.entries)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if let Some(previous) = previous {
            let _: i64 = conn
                .incr(&self.duplicates, 1)
                .await
                .map_err(|e| unavailable(&e))?;
            return serde_json::from_str(&previous).map_err(|e| corrupt(&e));
        }
        let mut books: Books = books.map_or_else(
            || Ok(Books::default()),
            |t| serde_json::from_str(&t).map_err(|e| corrupt(&e)),
        )?;
        let (result, summary) = change(&mut books)?;
        let mut ledger = Ledger::default();
        ledger.record(caller, summary, result.clone());
        let mut entry: Entry = ledger.entries.remove(0);
        entry.seq = seq;
        let written: i64 = self
            .commit
            .key(&self.lock)
            .key(&self.results)
            .key(&self.books)
            .key(&self.entries)
            .arg(token)
            .arg(&caller.key)
            .arg(result.to_string())
            .arg(serde_json::to_string(&books).map_err(|e| corrupt(&e))?)
            .arg(serde_json::to_string(&entry).map_err(|e| corrupt(&e))?)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if written == 1 {
            *released = true;
        } else {
            // The lock lapsed while this writer was stalled (and another writer may have
            // applied the same key meanwhile): nothing was written; the caller tries again.
            tracing::warn!(key = %caller.key, "office lock lapsed before the write; nothing written");
            return Err(ServiceError::Unavailable(
                "office lock lapsed before the write".into(),
            ));
        }
        Ok(result)
    }
}

/// Releases the lock of a dropped writer.
struct LockGuard {
    office: Option<RedisOffice>,
    token: String,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(office) = self.office.take() {
            let token = std::mem::take(&mut self.token);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { office.release(&token).await });
            }
        }
    }
}

#[async_trait]
impl OfficeStore for RedisOffice {
    async fn apply_once(&self, caller: &Caller, change: BookChange) -> Result<Value, ServiceError> {
        let _local = self.local.lock().await;
        let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        self.acquire(&token).await?;
        // A step that times out drops this future while it holds the lock: the guard then
        // releases the lock from a task of its own, so it need not lapse (blocking every
        // coordinator meanwhile). The effect itself is never finished late.
        let mut guard = LockGuard {
            office: Some(self.clone()),
            token,
        };
        let mut released = false;
        let outcome = self
            .apply_locked(&guard.token, caller, change, &mut released)
            .await;
        if released {
            guard.office = None;
        } else if let Some(office) = guard.office.take() {
            office.release(&guard.token).await;
        }
        outcome
    }

    async fn recorded(&self, key: &str) -> Result<Option<Value>, ServiceError> {
        let mut conn = self.conn.clone();
        let text: Option<String> = conn
            .hget(&self.results, key)
            .await
            .map_err(|e| unavailable(&e))?;
        text.map(|t| serde_json::from_str(&t).map_err(|e| corrupt(&e)))
            .transpose()
    }

    async fn snapshot(&self) -> Result<OfficeState, ServiceError> {
        let mut conn = self.conn.clone();
        let books = self.read_books().await?;
        let results: std::collections::HashMap<String, String> = conn
            .hgetall(&self.results)
            .await
            .map_err(|e| unavailable(&e))?;
        let entries: Vec<String> = conn
            .lrange(&self.entries, 0, -1)
            .await
            .map_err(|e| unavailable(&e))?;
        let duplicates: Option<u64> = conn
            .get(&self.duplicates)
            .await
            .map_err(|e| unavailable(&e))?;
        let ledger = Ledger {
            entries: entries
                .iter()
                .map(|e| serde_json::from_str(e).map_err(|e| corrupt(&e)))
                .collect::<Result<_, _>>()?,
            results: results
                .into_iter()
                .map(|(k, v)| {
                    serde_json::from_str(&v)
                        .map(|v| (k, v))
                        .map_err(|e| corrupt(&e))
                })
                .collect::<Result<_, _>>()?,
            duplicates: duplicates.unwrap_or_default(),
        };
        Ok(OfficeState { books, ledger })
    }
}
