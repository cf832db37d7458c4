//! The office state (books and ledger) in Redis, so that it survives a `kill -9` of the
//! example together with the sagas. Keys: `<prefix>:office:books` (JSON of the books),
//! `<prefix>:office:results` (HASH idempotency key → result), `<prefix>:office:entries` (LIST
//! of ledger entries), `<prefix>:office:duplicates` (counter). An effect is applied under a
//! short `SET NX PX` lock and written with one `MULTI`/`EXEC`, so books and ledger change
//! together; a dead holder's lock lapses by itself.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;
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

/// The office state in Redis.
#[derive(Clone)]
pub struct RedisOffice {
    conn: ConnectionManager,
    books: String,
    results: String,
    entries: String,
    duplicates: String,
    lock: String,
    release: redis::Script,
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
        Ok(Self {
            conn,
            books: format!("{prefix}:office:books"),
            results: format!("{prefix}:office:results"),
            entries: format!("{prefix}:office:entries"),
            duplicates: format!("{prefix}:office:duplicates"),
            lock: format!("{prefix}:office:lock"),
            release: redis::Script::new(RELEASE),
        })
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
        caller: &Caller,
        change: BookChange,
    ) -> Result<Value, ServiceError> {
        let mut conn = self.conn.clone();
        let previous: Option<String> = conn
            .hget(&self.results, &caller.key)
            .await
            .map_err(|e| unavailable(&e))?;
        if let Some(previous) = previous {
            let _: i64 = conn
                .incr(&self.duplicates, 1)
                .await
                .map_err(|e| unavailable(&e))?;
            return serde_json::from_str(&previous).map_err(|e| corrupt(&e));
        }
        let mut books = self.read_books().await?;
        let (result, summary) = change(&mut books)?;
        let seq: u64 = conn
            .llen(&self.entries)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut ledger = Ledger::default();
        ledger.record(caller, summary, result.clone());
        let mut entry: Entry = ledger.entries.remove(0);
        entry.seq = seq;
        let () = redis::pipe()
            .atomic()
            .set(
                &self.books,
                serde_json::to_string(&books).map_err(|e| corrupt(&e))?,
            )
            .ignore()
            .hset(&self.results, &caller.key, result.to_string())
            .ignore()
            .rpush(
                &self.entries,
                serde_json::to_string(&entry).map_err(|e| corrupt(&e))?,
            )
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(result)
    }
}

#[async_trait]
impl OfficeStore for RedisOffice {
    async fn apply_once(&self, caller: &Caller, change: BookChange) -> Result<Value, ServiceError> {
        let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        self.acquire(&token).await?;
        let outcome = self.apply_locked(caller, change).await;
        self.release(&token).await;
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
