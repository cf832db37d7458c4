//! The office state (books and ledger) in Redis, so that it survives a `kill -9` of the
//! example together with the sagas, and so that several coordinator processes share one
//! ledger.
//!
//! The office is stored record by record, so that effects on different records never wait
//! for each other. Every key starts with the hash tag `{<prefix>:office}`, so that a Redis
//! Cluster keeps them in one slot and one script may touch all of them:
//!
//! | Key | Type | Contents |
//! |---|---|---|
//! | `{<prefix>:office}:results` | hash | idempotency key → the effect's result (JSON) |
//! | `{<prefix>:office}:entries` | list | ledger entries (JSON of [`Entry`]), in order of application |
//! | `{<prefix>:office}:duplicates` | string | counter of repeated keys answered from `results` |
//! | `{<prefix>:office}:deal_records` | hash | record key → `[score, version]` |
//! | `{<prefix>:office}:crm_deals` | hash | deal id → `[company id, amount]` |
//! | `{<prefix>:office}:portfolio` | hash | company id → invested amount (a number) |
//! | `{<prefix>:office}:committee` | list | messages to the investment committee |
//! | `{<prefix>:office}:partners` | list | messages to the partners |
//! | `{<prefix>:office}:audit` | hash | audit id → `[text, voided]` |
//!
//! Each effect is one call of `lua/office_apply.lua`, which atomically checks whether the key
//! already has a result (then returns it and counts a duplicate), validates the
//! [`BookChange`] against the one record it names, and writes the record, the result and the
//! ledger entry. There is no lock: a writer never reads the books to write them back later,
//! so a writer paused for any length of time (`SIGSTOP`, a long stall) cannot overwrite
//! anything with stale data, and the "already recorded" check inside the same script applies
//! each key's effect at most once even when two coordinators run the same step at once.
//!
//! One slot means one primary serves the whole office on a cluster. Splitting it across
//! slots would need a cross-slot order for the ledger (its `seq`, the committee's message
//! numbers and the audit ids are global counters) and so a second round trip per effect;
//! one script per effect on one primary does not limit the example (see
//! `examples/README.md`).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ledger::{BookChange, Books, Entry, Ledger, OfficeState, OfficeStore};
use crate::services::ServiceError;
use crate::world::Caller;

const APPLY: &str = include_str!("../lua/office_apply.lua");
/// How long a reply may take, as for the saga store (`saga_redis` defaults to 10 s): a slow
/// reply under load is not a lost one, and the step's own timeout bounds how long a step
/// waits for the office.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const SNAPSHOT: &str = include_str!("../lua/office_snapshot.lua");

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

/// The office's keys, in the order both scripts take them.
const KEY_NAMES: [&str; 9] = [
    "results",
    "entries",
    "duplicates",
    "deal_records",
    "crm_deals",
    "portfolio",
    "committee",
    "partners",
    "audit",
];
const RESULTS: usize = 0;

/// The office state in Redis.
#[derive(Clone)]
pub struct RedisOffice {
    conn: Conn,
    keys: Vec<String>,
    apply: redis::Script,
    snapshot: redis::Script,
}

impl std::fmt::Debug for RedisOffice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOffice")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

fn unavailable(err: &redis::RedisError) -> ServiceError {
    ServiceError::Unavailable(err.to_string())
}

fn corrupt(what: &str, err: &serde_json::Error) -> ServiceError {
    ServiceError::Corrupt(format!("{what}: {err}"))
}

fn decode<T: DeserializeOwned>(what: &str, text: &str) -> Result<T, ServiceError> {
    serde_json::from_str(text).map_err(|e| corrupt(what, &e))
}

/// `[field, value, field, value, ...]` (a hash as a script returns it) as pairs.
fn pairs(flat: Vec<String>, key: &str) -> Result<Vec<(String, String)>, ServiceError> {
    if !flat.len().is_multiple_of(2) {
        return Err(ServiceError::Corrupt(format!(
            "the snapshot of {key} has an odd number of elements"
        )));
    }
    let mut flat = flat.into_iter();
    let mut out = Vec::with_capacity(flat.len() / 2);
    while let (Some(field), Some(value)) = (flat.next(), flat.next()) {
        out.push((field, value));
    }
    Ok(out)
}

/// What `office_snapshot.lua` returns after its `'ok'`, in its order.
type SnapshotReply = (
    Vec<String>,
    Vec<String>,
    Option<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
);

impl RedisOffice {
    /// Connects to `url` and keeps the state under `{<prefix>:office}:*`.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        Self::connect_with_tls(url, prefix, None).await
    }

    /// As [`connect`](Self::connect), with TLS material for a `rediss://` URL (a private CA,
    /// a client certificate; see `saga_redis::RedisStoreBuilder::tls_certificates`).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn connect_with_tls(
        url: &str,
        prefix: &str,
        tls: Option<redis::TlsCertificates>,
    ) -> Result<Self, redis::RedisError> {
        let client = match tls {
            Some(certificates) => redis::Client::build_with_tls(url, certificates)?,
            None => redis::Client::open(url)?,
        };
        let config = ConnectionManagerConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self::with(Conn::Standalone(conn), prefix))
    }

    /// Connects to the Redis Cluster whose seed nodes are `urls` and keeps the state under
    /// `{<prefix>:office}:*` (one slot).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn connect_cluster(urls: &[String], prefix: &str) -> Result<Self, redis::RedisError> {
        Self::connect_cluster_with_tls(urls, prefix, None).await
    }

    /// As [`connect_cluster`](Self::connect_cluster), with TLS material for `rediss://` URLs.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn connect_cluster_with_tls(
        urls: &[String],
        prefix: &str,
        tls: Option<redis::TlsCertificates>,
    ) -> Result<Self, redis::RedisError> {
        let builder = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
            .response_timeout(RESPONSE_TIMEOUT);
        let builder = match tls {
            Some(certificates) => builder.certs(certificates),
            None => builder,
        };
        let client = builder.build()?;
        let conn = client.get_async_connection().await?;
        Ok(Self::with(Conn::Cluster(conn), prefix))
    }

    fn with(conn: Conn, prefix: &str) -> Self {
        let base = Self::key_base(prefix);
        Self {
            conn,
            keys: KEY_NAMES
                .iter()
                .map(|name| format!("{base}:{name}"))
                .collect(),
            apply: redis::Script::new(APPLY),
            snapshot: redis::Script::new(SNAPSHOT),
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

    fn invocation<'a>(&'a self, script: &'a redis::Script) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        invocation
    }

    /// Reads the whole state in one atomic script call.
    async fn read_all(&self) -> Result<SnapshotReply, ServiceError> {
        let mut conn = self.conn.clone();
        let reply: redis::Value = self
            .invocation(&self.snapshot)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let redis::Value::Array(mut items) = reply else {
            return Err(ServiceError::Corrupt(format!(
                "office_snapshot.lua answered {reply:?}"
            )));
        };
        let unreadable =
            |e: redis::ParsingError| ServiceError::Corrupt(format!("office snapshot: {e}"));
        let outcome: String = match items.first() {
            Some(first) => redis::from_redis_value_ref(first).map_err(unreadable)?,
            None => String::new(),
        };
        if outcome != "ok" {
            let problem: Vec<String> =
                redis::from_redis_value(redis::Value::Array(items)).map_err(unreadable)?;
            return Err(ServiceError::Corrupt(format!(
                "cannot read the office: {}",
                problem.join(": ")
            )));
        }
        items.remove(0);
        redis::from_redis_value(redis::Value::Array(items)).map_err(unreadable)
    }
}

#[async_trait]
impl OfficeStore for RedisOffice {
    async fn apply_once(
        &self,
        caller: &Caller,
        change: &BookChange,
    ) -> Result<Value, ServiceError> {
        let change_json =
            serde_json::to_string(change).map_err(|e| corrupt("encoding the change", &e))?;
        // The script fills in the entry's position in the ledger and its summary.
        let entry_json = serde_json::to_string(&Entry::of(caller, 0, String::new()))
            .map_err(|e| corrupt("encoding the ledger entry", &e))?;
        let mut conn = self.conn.clone();
        let (outcome, detail): (String, String) = self
            .invocation(&self.apply)
            .arg(&caller.key)
            .arg(change_json)
            .arg(entry_json)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        match outcome.as_str() {
            "applied" | "duplicate" => decode("the recorded result", &detail),
            "rejected" => Err(ServiceError::Rejected(detail)),
            "invalid" => Err(ServiceError::Corrupt(format!(
                "the office refused the change for key {}: {detail}",
                caller.key
            ))),
            "corrupt" => Err(ServiceError::Corrupt(format!(
                "the office in Redis is unreadable: {detail}"
            ))),
            other => Err(ServiceError::Corrupt(format!(
                "office_apply.lua answered `{other}`: {detail}"
            ))),
        }
    }

    async fn recorded(&self, key: &str) -> Result<Option<Value>, ServiceError> {
        let mut conn = self.conn.clone();
        let text: Option<String> = conn
            .hget(&self.keys[RESULTS], key)
            .await
            .map_err(|e| unavailable(&e))?;
        text.map(|t| decode("the recorded result", &t)).transpose()
    }

    async fn snapshot(&self) -> Result<OfficeState, ServiceError> {
        let (
            results,
            entries,
            duplicates,
            deal_records,
            crm_deals,
            portfolio,
            committee,
            partners,
            audit,
        ) = self.read_all().await?;
        let mut books = Books {
            committee,
            partners,
            ..Books::default()
        };
        for (record_key, record) in pairs(deal_records, "deal_records")? {
            let record = decode(&format!("deal record {record_key}"), &record)?;
            books.deal_records.insert(record_key, record);
        }
        for (deal_id, deal) in pairs(crm_deals, "crm_deals")? {
            let deal = decode(&format!("CRM deal {deal_id}"), &deal)?;
            books.crm_deals.insert(deal_id, deal);
        }
        for (company_id, amount) in pairs(portfolio, "portfolio")? {
            // `str::parse` reads the shortest round-trip text exactly.
            let amount: f64 = amount.parse().map_err(|e| {
                ServiceError::Corrupt(format!(
                    "portfolio position {company_id} is not a number ({amount:?}): {e}"
                ))
            })?;
            books.portfolio.insert(company_id, amount);
        }
        for (audit_id, entry) in pairs(audit, "audit")? {
            let entry = decode(&format!("audit entry {audit_id}"), &entry)?;
            books.audit.insert(audit_id, entry);
        }
        let ledger = Ledger {
            entries: entries
                .iter()
                .map(|e| decode("a ledger entry", e))
                .collect::<Result<_, _>>()?,
            results: pairs(results, "results")?
                .into_iter()
                .map(|(k, v)| decode("a recorded result", &v).map(|v| (k, v)))
                .collect::<Result<HashMap<_, _>, _>>()?,
            duplicates: duplicates
                .map(|d| {
                    d.parse()
                        .map_err(|e| ServiceError::Corrupt(format!("duplicate counter {d:?}: {e}")))
                })
                .transpose()?
                .unwrap_or_default(),
        };
        Ok(OfficeState { books, ledger })
    }
}
