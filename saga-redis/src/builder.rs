//! Configuring and connecting a [`RedisStore`].

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo};
use saga_core::store::DEFAULT_MAX_PAYLOAD;

use crate::check::check_server;
use crate::connection::Connection;
use crate::error::{ConnectError, Reply, is_auth_error, redact_url as redact, redis_error};
use crate::hints::DueHints;
use crate::keys::{KeyLayout, LAYOUT_VERSION};
use crate::scripts::SCRIPTS;
use crate::store::{Inner, RedisStore};
use crate::wake::Wakeups;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "saga";

/// The default partition count.
pub const DEFAULT_PARTITIONS: u16 = 16;

/// The largest partition count (keep it well below the 16384 slots of a cluster).
pub const MAX_PARTITIONS: u16 = 4096;

/// Where the store connects.
#[derive(Clone, Debug)]
enum Target {
    Standalone(String),
    Cluster(Vec<String>),
}

/// `WAIT numreplicas timeout` after each write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaWait {
    /// Replicas that must acknowledge each write.
    pub replicas: u32,
    /// How long to wait for them.
    pub timeout: Duration,
}

/// Builds a [`RedisStore`]: where to connect, the key prefix, the partition count, the
/// payload limit and the optional replica acknowledgement. Start with
/// [`RedisStore::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct RedisStoreBuilder {
    target: Option<Target>,
    prefix: String,
    partitions: u16,
    max_payload: usize,
    replica_wait: Option<ReplicaWait>,
    connection_timeout: Duration,
    response_timeout: Duration,
    reconnect_retries: usize,
    due_sweep_interval: Duration,
    #[cfg(feature = "tls")]
    tls_root_certificate: Option<Vec<u8>>,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            target: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            partitions: DEFAULT_PARTITIONS,
            max_payload: DEFAULT_MAX_PAYLOAD,
            replica_wait: None,
            connection_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            reconnect_retries: 6,
            due_sweep_interval: Duration::from_millis(250),
            #[cfg(feature = "tls")]
            tls_root_certificate: None,
        }
    }
}

impl RedisStoreBuilder {
    /// A standalone server: `redis://[user:password@]host[:port][/db]`, or `rediss://...` for
    /// TLS (feature `tls`, on by default). The password may be a `requirepass` password
    /// (`redis://:password@host`) or an ACL user's (`redis://user:password@host`).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.target = Some(Target::Standalone(url.into()));
        self
    }

    /// A Redis Cluster, given some of its nodes' URLs (the client discovers the rest).
    /// Credentials and TLS as for [`url`](Self::url).
    pub fn cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.target = Some(Target::Cluster(nodes.into_iter().map(Into::into).collect()));
        self
    }

    /// The prefix of every key (default `saga`). Several deployments can share one Redis
    /// with different prefixes. Must not contain `{` or `}` (they would break the hash tags).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The partition count (default 16). Fixed at deployment: the first store to use a key
    /// prefix records it, and a store with another count refuses to start.
    pub fn partitions(mut self, partitions: u16) -> Self {
        self.partitions = partitions;
        self
    }

    /// The largest encoded state, event or idempotency result accepted, in bytes (default
    /// 4 MiB). Checked before sending and again inside the scripts.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// After each write, `WAIT replicas timeout`: the write is acknowledged only when that
    /// many replicas have it. When fewer answer in time the operation fails with
    /// [`StoreError::Unavailable`](saga_core::StoreError::Unavailable) (the write is on the
    /// primary and may be lost on failover; retrying is safe).
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_wait = Some(ReplicaWait { replicas, timeout });
        self
    }

    /// How long establishing a connection may take (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long one command may wait for its reply (default 10 s; a `WAIT` timeout is added
    /// to it).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How many times the standalone connection manager retries a lost connection before a
    /// request fails (default 6, with exponential backoff from 100 ms). Requests made while
    /// it reconnects fail with `Unavailable`.
    pub fn reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }

    /// How often `claim_due` looks at every partition even when nothing told it that work is
    /// waiting there (default 250 ms). Between sweeps it visits only the partitions that a
    /// wake-up message named, whose known next due time has come, or that this store wrote to
    /// itself; a sweep finds what no message announces (other processes' durable timers and
    /// lapsed leases), so this bounds how late those are picked up. Without a live wake-up
    /// subscription every call is a sweep.
    pub fn due_sweep_interval(mut self, interval: Duration) -> Self {
        self.due_sweep_interval = interval;
        self
    }

    /// For `rediss://` URLs: trust this CA certificate (PEM) instead of the system's root
    /// certificates — for a private CA, as managed Redis services and test servers use.
    #[cfg(feature = "tls")]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_certificate = Some(pem.into());
        self
    }

    /// A standalone client for `url`, with the configured root certificate for TLS.
    fn client(&self, url: &str) -> Result<Client, ConnectError> {
        let bad_url = |source| ConnectError::Url {
            url: redact(url),
            source,
        };
        #[cfg(feature = "tls")]
        if let Some(pem) = &self.tls_root_certificate {
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            };
            return Client::build_with_tls(url, certificates).map_err(bad_url);
        }
        Client::open(url).map_err(bad_url)
    }

    fn validate(&self) -> Result<Target, ConnectError> {
        let target = self.target.clone().ok_or_else(|| {
            ConnectError::Config("no Redis URL: call .url(..) or .cluster(..)".into())
        })?;
        if let Target::Cluster(nodes) = &target
            && nodes.is_empty()
        {
            return Err(ConnectError::Config(
                "a cluster needs at least one node URL".into(),
            ));
        }
        if self.prefix.is_empty()
            || self.prefix.contains(['{', '}'])
            || self.prefix.chars().any(char::is_whitespace)
        {
            return Err(ConnectError::Config(format!(
                "key prefix {:?} must be non-empty, without braces or whitespace",
                self.prefix
            )));
        }
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(ConnectError::Config(format!(
                "partition count {} must be between 1 and {MAX_PARTITIONS}",
                self.partitions
            )));
        }
        if self.max_payload == 0 {
            return Err(ConnectError::Config(
                "max payload must be at least 1 byte".into(),
            ));
        }
        Ok(target)
    }

    /// Connects, records (or checks) the partition count, and runs
    /// [`RedisStore::check_server`] (its findings are logged as warnings and kept, see
    /// [`RedisStore::server_findings`]).
    ///
    /// # Errors
    ///
    /// [`ConnectError`]: invalid settings or URL, refused credentials, an unreachable server,
    /// or a partition count that differs from the one recorded for the key prefix.
    pub async fn connect(self) -> Result<RedisStore, ConnectError> {
        let target = self.validate()?;
        let response_timeout = self.response_timeout
            + self
                .replica_wait
                .map_or(Duration::ZERO, |wait| wait.timeout);
        let (connection, node_name, pubsub_clients) = match &target {
            Target::Standalone(url) => {
                ensure_tls_provider(std::slice::from_ref(url))?;
                let client = self.client(url)?;
                let node = client.get_connection_info().addr().to_string();
                // One plain connection first, so that wrong credentials or a dead server give
                // a clear error at once instead of the manager's reconnect retries.
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.connection_timeout))
                    .set_response_timeout(Some(response_timeout));
                let mut probe = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|source| connect_error(&node, source))?;
                redis::cmd("PING")
                    .query_async::<()>(&mut probe)
                    .await
                    .map_err(|source| connect_error(&node, source))?;
                drop(probe);
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connection_timeout))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(self.reconnect_retries)
                    .set_max_delay(Duration::from_secs(2));
                let pubsub = client.clone();
                let manager = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(|source| connect_error(&node, source))?;
                (Connection::Standalone(manager), node, vec![pubsub])
            }
            Target::Cluster(nodes) => {
                ensure_tls_provider(nodes)?;
                let mut infos = Vec::with_capacity(nodes.len());
                for url in nodes {
                    infos.push(url.as_str().into_connection_info().map_err(|source| {
                        ConnectError::Url {
                            url: redact(url),
                            source,
                        }
                    })?);
                }
                let node = nodes
                    .iter()
                    .map(|url| redact(url))
                    .collect::<Vec<_>>()
                    .join(", ");
                let cluster = ClusterClientBuilder::new(infos)
                    .connection_timeout(self.connection_timeout)
                    .response_timeout(response_timeout);
                #[cfg(feature = "tls")]
                let cluster = match &self.tls_root_certificate {
                    Some(pem) => cluster.certs(redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    }),
                    None => cluster,
                };
                let client = cluster.build().map_err(|source| ConnectError::Url {
                    url: node.clone(),
                    source,
                })?;
                let mut connection = client
                    .get_async_connection()
                    .await
                    .map_err(|source| connect_error(&node, source))?;
                redis::cmd("PING")
                    .query_async::<()>(&mut connection)
                    .await
                    .map_err(|source| connect_error(&node, source))?;
                // Wake-ups subscribe on one node (a cluster delivers PUBLISH to every node):
                // a client per seed node, tried in turn.
                let pubsub = nodes
                    .iter()
                    .map(|url| self.client(url))
                    .collect::<Result<Vec<_>, _>>()?;
                (Connection::Cluster(connection), node, pubsub)
            }
        };
        let keys = KeyLayout::new(self.prefix.clone(), self.partitions);
        check_meta(&connection, &keys, &node_name).await?;
        let findings = check_server(&connection, &node_name).await;
        let hints = Arc::new(DueHints::new(keys.partitions(), self.due_sweep_interval));
        let wake = Wakeups::new(
            pubsub_clients,
            keys.clone(),
            Arc::clone(&hints),
            self.connection_timeout,
        );
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn: connection,
                keys,
                max_payload: self.max_payload,
                replica_wait: self.replica_wait,
                node_name,
                findings,
                wake,
                hints,
            }),
        })
    }
}

fn connect_error(node: &str, source: redis::RedisError) -> ConnectError {
    if is_auth_error(&source) {
        ConnectError::Auth {
            node: node.to_owned(),
            source,
        }
    } else {
        ConnectError::Unreachable {
            node: node.to_owned(),
            source,
        }
    }
}

/// Records the partition count and layout version on first use; refuses a mismatch.
async fn check_meta(
    connection: &Connection,
    keys: &KeyLayout,
    node: &str,
) -> Result<(), ConnectError> {
    let mut conn = connection.clone();
    let meta = keys.meta();
    let value: redis::Value = SCRIPTS
        .meta
        .key(&meta)
        .arg(keys.partitions())
        .arg(LAYOUT_VERSION)
        .invoke_async(&mut conn)
        .await
        .map_err(|err| {
            if is_auth_error(&err) {
                ConnectError::Auth {
                    node: node.to_owned(),
                    source: err,
                }
            } else {
                ConnectError::Store(redis_error("meta", None, err))
            }
        })?;
    let nil = saga_core::SagaId(uuid::Uuid::nil());
    let (code, mut reply) = Reply::parse("meta", value)?;
    if code != "ok" {
        return Err(reply.into_error(&code, nil, 0).into());
    }
    let recorded = reply.uint()?;
    let layout = reply.uint()?;
    if recorded != u64::from(keys.partitions()) {
        return Err(ConnectError::PartitionMismatch {
            prefix: keys.prefix().to_owned(),
            recorded,
            configured: keys.partitions(),
        });
    }
    if layout != u64::from(LAYOUT_VERSION) {
        return Err(ConnectError::LayoutMismatch {
            prefix: keys.prefix().to_owned(),
            recorded: layout,
            supported: LAYOUT_VERSION,
        });
    }
    Ok(())
}

/// `rediss://` needs a rustls crypto provider: installs ring's as the process default when
/// a TLS URL is used and none is installed yet.
fn ensure_tls_provider(urls: &[String]) -> Result<(), ConnectError> {
    if !urls.iter().any(|url| url.starts_with("rediss://")) {
        return Ok(());
    }
    #[cfg(feature = "tls")]
    {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Another thread may install one meanwhile; either way one is installed after.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        Ok(())
    }
    #[cfg(not(feature = "tls"))]
    {
        Err(ConnectError::Config(
            "rediss:// URLs need saga-redis's `tls` feature (on by default)".into(),
        ))
    }
}
