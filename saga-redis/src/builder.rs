//! Configuring and connecting a [`RedisStore`].

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo};
use saga_core::StoreError;
use saga_core::store::DEFAULT_MAX_PAYLOAD;

use crate::check::{ServerFinding, ServerIssue, UnsafeServerConfig, check_server};
use crate::connection::Connection;
use crate::error::{ConnectError, is_auth_error, redact_url as redact, redis_error};
use crate::hints::DueHints;
use crate::keys::{KeyLayout, LAYOUT_VERSION};
use crate::scripts;
use crate::store::{Inner, RedisStore};
#[cfg(feature = "tls")]
use crate::tls::{Pem, TlsSettings};
use crate::wake::Wakeups;

/// The TLS material of one connection (a stand-in without the `tls` feature).
#[cfg(feature = "tls")]
type Certificates = redis::TlsCertificates;
#[cfg(not(feature = "tls"))]
type Certificates = ();

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
    allowed_unsafe: Vec<UnsafeServerConfig>,
    #[cfg(feature = "tls")]
    tls: TlsSettings,
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
            allowed_unsafe: Vec::new(),
            #[cfg(feature = "tls")]
            tls: TlsSettings::default(),
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

    /// Starts even though the server has this configuration that
    /// [`connect`](Self::connect) refuses, e.g. [`UnsafeServerConfig::AofAclReplayLoss`]:
    /// the finding is still logged (as an error) and kept in
    /// [`RedisStore::server_findings`]. Only for a deliberate, temporary decision: the
    /// refused configurations lose every saga on the server's next restart.
    pub fn allow_unsafe_server_config(mut self, config: UnsafeServerConfig) -> Self {
        if !self.allowed_unsafe.contains(&config) {
            self.allowed_unsafe.push(config);
        }
        self
    }

    /// For `rediss://` URLs: trust only the CA certificates in `pem` (one or more PEM
    /// certificates), *instead of* the system's root certificates — for a private CA, as
    /// self-hosted and test servers use. Without it the system's roots are trusted
    /// (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
    #[cfg(feature = "tls")]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root = Some(Pem::Bytes(pem.into()));
        self
    }

    /// As [`tls_root_certificate`](Self::tls_root_certificate), read from a PEM file when
    /// connecting (an unreadable file or one without a certificate fails
    /// [`connect`](Self::connect) with [`ConnectError::Tls`] naming the file).
    #[cfg(feature = "tls")]
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls.root = Some(Pem::File(path.into()));
        self
    }

    /// For `rediss://` URLs: present this client certificate (PEM chain) and private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1) to servers that ask for one (`tls-auth-clients yes` or
    /// `optional`: mutual TLS). A key that does not belong to the certificate fails
    /// [`connect`](Self::connect) with [`ConnectError::Tls`].
    #[cfg(feature = "tls")]
    pub fn tls_client_certificate(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client = Some((Pem::Bytes(cert_pem.into()), Pem::Bytes(key_pem.into())));
        self
    }

    /// As [`tls_client_certificate`](Self::tls_client_certificate), read from PEM files
    /// when connecting (errors name the file).
    #[cfg(feature = "tls")]
    pub fn tls_client_certificate_files(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls.client = Some((Pem::File(cert.into()), Pem::File(key.into())));
        self
    }

    /// The configured TLS material, read and checked, in the form the `redis` crate takes
    /// (`redis::Client::build_with_tls`, `ClusterClientBuilder::certs`): for other clients of
    /// the same servers, so that they trust the same CA and present the same certificate.
    /// `None` when no TLS setting was made.
    ///
    /// # Errors
    ///
    /// [`ConnectError::Tls`]: a file cannot be read, holds no certificate or key, or the key
    /// does not belong to the client certificate.
    #[cfg(feature = "tls")]
    pub fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>, ConnectError> {
        self.tls.certificates()
    }

    /// A standalone client for `url`, with the configured TLS material.
    fn client(&self, url: &str, tls: Option<&Certificates>) -> Result<Client, ConnectError> {
        let bad_url = |source| ConnectError::Url {
            url: redact(url),
            source,
        };
        #[cfg(feature = "tls")]
        if let Some(certificates) = tls {
            return Client::build_with_tls(url, certificates.clone()).map_err(bad_url);
        }
        #[cfg(not(feature = "tls"))]
        let _: Option<&Certificates> = tls;
        Client::open(url).map_err(bad_url)
    }

    /// The TLS material, checked; an error when it is given for a URL that is not
    /// `rediss://` (it would be ignored, and the connection would not be encrypted).
    fn certificates(&self, urls: &[String]) -> Result<Option<Certificates>, ConnectError> {
        #[cfg(feature = "tls")]
        {
            let certificates = self.tls.certificates()?;
            if certificates.is_some()
                && let Some(plain) = urls.iter().find(|url| !url.starts_with("rediss://"))
            {
                return Err(ConnectError::Tls {
                    what: "settings".to_owned(),
                    origin: format!("for {}", redact(plain)),
                    problem: "a CA or client certificate was given, but the URL is not rediss://; use rediss://host:port for TLS".to_owned(),
                });
            }
            Ok(certificates)
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = urls;
            Ok(None)
        }
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

    /// Refuses the findings that lose every saga on the next restart, unless allowed; an
    /// allowed one is logged as an error.
    fn refuse_unsafe(&self, findings: &[ServerFinding]) -> Result<(), ConnectError> {
        for finding in findings {
            let ServerIssue::AofReplayLoss {
                server, problem, ..
            } = &finding.issue
            else {
                continue;
            };
            if !finding.issue.loses_everything_on_restart() {
                continue;
            }
            if self
                .allowed_unsafe
                .contains(&UnsafeServerConfig::AofAclReplayLoss)
            {
                tracing::error!(
                    node = %finding.node,
                    "starting although {finding} -- allowed by allow_unsafe_server_config(AofAclReplayLoss): \
                     the next restart of this Redis server loses every saga"
                );
                continue;
            }
            return Err(ConnectError::AofReplayLoss {
                node: finding.node.clone(),
                server: server.clone(),
                problem: problem.clone(),
            });
        }
        Ok(())
    }

    /// Connects, runs [`RedisStore::check_server`] (its findings are logged as warnings and
    /// kept, see [`RedisStore::server_findings`]), and records (or checks) the partition
    /// count.
    ///
    /// # Errors
    ///
    /// [`ConnectError`]: invalid settings, URL or TLS material, refused credentials, an
    /// unreachable server, a server configuration that loses every saga on its next restart
    /// ([`ConnectError::AofReplayLoss`], unless allowed with
    /// [`allow_unsafe_server_config`](Self::allow_unsafe_server_config)), or a partition count
    /// that differs from the one recorded for the key prefix.
    pub async fn connect(self) -> Result<RedisStore, ConnectError> {
        let target = self.validate()?;
        let response_timeout = self.response_timeout
            + self
                .replica_wait
                .map_or(Duration::ZERO, |wait| wait.timeout);
        let urls = match &target {
            Target::Standalone(url) => std::slice::from_ref(url),
            Target::Cluster(nodes) => nodes.as_slice(),
        };
        let tls = self.certificates(urls)?;
        ensure_tls_provider(urls)?;
        let connected = match &target {
            Target::Standalone(url) => {
                self.connect_standalone(url, tls.as_ref(), response_timeout)
                    .await?
            }
            Target::Cluster(nodes) => {
                self.connect_cluster(nodes, tls.as_ref(), response_timeout)
                    .await?
            }
        };
        let keys = KeyLayout::new(self.prefix.clone(), self.partitions);
        // Before the first write (the meta key): a server that would lose it is refused.
        let findings = check_server(&connected.connection, &connected.node_name, &keys).await;
        self.refuse_unsafe(&findings)?;
        check_meta(&connected.connection, &keys, &connected.node_name).await?;
        check_publish(&connected.connection, &keys, &connected.node_name).await?;
        Ok(self.store(connected, keys, findings))
    }

    /// A connection manager to one server, after a probe that the server answers.
    async fn connect_standalone(
        &self,
        url: &str,
        tls: Option<&Certificates>,
        response_timeout: Duration,
    ) -> Result<Connected, ConnectError> {
        let client = self.client(url, tls)?;
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
        Ok(Connected {
            connection: Connection::Standalone(manager),
            node_name: node,
            pubsub_clients: vec![pubsub],
        })
    }

    /// A cluster connection through the seed `nodes`, checked with a `PING`.
    async fn connect_cluster(
        &self,
        nodes: &[String],
        tls: Option<&Certificates>,
        response_timeout: Duration,
    ) -> Result<Connected, ConnectError> {
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
        let cluster = match tls {
            Some(certificates) => cluster.certs(certificates.clone()),
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
            .map(|url| self.client(url, tls))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Connected {
            connection: Connection::Cluster(connection),
            node_name: node,
            pubsub_clients: pubsub,
        })
    }

    /// The store over a checked connection, with its wake-up subscription (not started yet).
    fn store(
        self,
        connected: Connected,
        keys: KeyLayout,
        findings: Vec<ServerFinding>,
    ) -> RedisStore {
        let hints = Arc::new(DueHints::new(keys.partitions(), self.due_sweep_interval));
        let wake = Wakeups::new(
            connected.pubsub_clients,
            keys.clone(),
            Arc::clone(&hints),
            self.connection_timeout,
        );
        RedisStore {
            inner: Arc::new(Inner {
                conn: connected.connection,
                keys,
                max_payload: self.max_payload,
                replica_wait: self.replica_wait,
                node_name: connected.node_name,
                findings,
                wake,
                hints,
            }),
        }
    }
}

/// A connection the server answered, before the configuration and meta checks.
struct Connected {
    connection: Connection,
    /// The server's address, or the seed nodes of a cluster: names the node in errors and
    /// findings.
    node_name: String,
    /// The clients the wake-up subscription may use.
    pubsub_clients: Vec<Client>,
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
    let (recorded, layout) = scripts::meta::record(connection, keys)
        .await
        .map_err(|err| auth_refusal(err, node))?;
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

/// Checks that the user may `PUBLISH` on the prefix's wake channel, on every primary. Every
/// script that changes what is due publishes there before its first write, so without that
/// permission (Redis 7 gives a new ACL user `resetchannels`) every such write would be
/// refused: better said once, at start-up, with the fix. The probe message is not a
/// `<what> <id>` pair; subscribers take it as a hint to look for due work, which is harmless.
async fn check_publish(
    connection: &Connection,
    keys: &KeyLayout,
    node: &str,
) -> Result<(), ConnectError> {
    let channel = keys.wake_channel();
    let mut cmd = redis::cmd("PUBLISH");
    cmd.arg(&channel).arg("connected");
    let mut connection = connection.clone();
    for (at, reply) in connection.on_every_primary(node, cmd).await {
        let Err(err) = reply else { continue };
        return Err(match redis_error("connect", None, err) {
            StoreError::Refused { message, source } => ConnectError::Store(StoreError::Refused {
                message: format!(
                    "{message}; at {at}: the user may not PUBLISH on the wake channel `{channel}`, which every write that makes a saga due does: allow it (`ACL SETUSER <user> &{channel}`)"
                ),
                source,
            }),
            other => ConnectError::Store(other),
        });
    }
    Ok(())
}

/// Refused credentials are [`ConnectError::Auth`] (with the server's answer); any other
/// store error stays one.
fn auth_refusal(err: StoreError, node: &str) -> ConnectError {
    let StoreError::Refused {
        message,
        source: Some(source),
    } = err
    else {
        return ConnectError::Store(err);
    };
    match source.downcast::<redis::RedisError>() {
        Ok(redis) if is_auth_error(&redis) => ConnectError::Auth {
            node: node.to_owned(),
            source: *redis,
        },
        Ok(redis) => ConnectError::Store(StoreError::Refused {
            message,
            source: Some(redis),
        }),
        Err(source) => ConnectError::Store(StoreError::Refused {
            message,
            source: Some(source),
        }),
    }
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
