//! Start-up checks of the server settings the store's guarantees depend on.

use std::collections::HashMap;
use std::fmt;

use redis::Value;

use crate::connection::Connection;

/// One setting of one Redis node that weakens the store's guarantees, or a node whose
/// settings could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFinding {
    /// The node (`host:port`).
    pub node: String,
    /// What is wrong.
    pub issue: ServerIssue,
}

/// What [`RedisStore::check_server`](crate::RedisStore::check_server) found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerIssue {
    /// `appendonly no`: a restart loses every saga written since the last snapshot (or all of
    /// them without snapshots).
    AofDisabled,
    /// `appendfsync` is not `always`: a crash of the server (or its machine) can lose the
    /// last acknowledged writes — up to about one second with `everysec`, an OS-dependent
    /// amount with `no`.
    FsyncNotAlways {
        /// The configured value.
        appendfsync: String,
    },
    /// `maxmemory-policy` is not `noeviction`: under memory pressure Redis may evict saga
    /// keys, silently losing sagas, histories, leases or idempotency records.
    EvictionPolicy {
        /// The configured policy.
        policy: String,
    },
    /// The settings could not be read (`CONFIG GET` refused, e.g. by ACL or a managed
    /// service), so they could not be verified.
    Unverifiable {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for ServerFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let node = &self.node;
        match &self.issue {
            ServerIssue::AofDisabled => write!(
                f,
                "Redis {node}: appendonly is off, so a restart loses acknowledged sagas; set `appendonly yes` and `appendfsync always`"
            ),
            ServerIssue::FsyncNotAlways { appendfsync } if appendfsync == "everysec" => write!(
                f,
                "Redis {node}: appendfsync is everysec, so a crash can lose up to 1 s of acknowledged writes; set `appendfsync always` to lose nothing"
            ),
            ServerIssue::FsyncNotAlways { appendfsync } => write!(
                f,
                "Redis {node}: appendfsync is {appendfsync}, so a crash can lose acknowledged writes (as much as the OS has not flushed); set `appendfsync always`"
            ),
            ServerIssue::EvictionPolicy { policy } => write!(
                f,
                "Redis {node}: maxmemory-policy is {policy}, so Redis may evict saga keys under memory pressure; set `maxmemory-policy noeviction`"
            ),
            ServerIssue::Unverifiable { reason } => write!(
                f,
                "Redis {node}: could not read appendonly, appendfsync and maxmemory-policy ({reason}); the store's durability settings are not verified"
            ),
        }
    }
}

/// Runs `CONFIG GET appendonly appendfsync maxmemory-policy` on every primary reachable
/// through `connection` (`node_name` names a standalone server) and logs each finding.
pub(crate) async fn check_server(connection: &Connection, node_name: &str) -> Vec<ServerFinding> {
    let mut conn = connection.clone();
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET")
        .arg("appendonly")
        .arg("appendfsync")
        .arg("maxmemory-policy");
    let mut findings = Vec::new();
    for (node, reply) in conn.on_every_primary(node_name, cmd).await {
        findings.extend(findings_for(&node, reply));
    }
    for finding in &findings {
        tracing::warn!(node = %finding.node, issue = ?finding.issue, "{finding}");
    }
    findings
}

/// The findings for one node's `CONFIG GET appendonly appendfsync maxmemory-policy` reply.
fn findings_for(node: &str, reply: Result<Value, redis::RedisError>) -> Vec<ServerFinding> {
    let finding = |issue| ServerFinding {
        node: node.to_owned(),
        issue,
    };
    let settings = match reply.and_then(|value| {
        redis::from_redis_value::<HashMap<String, String>>(value).map_err(Into::into)
    }) {
        Ok(settings) => settings,
        Err(err) => {
            return vec![finding(ServerIssue::Unverifiable {
                reason: err.to_string(),
            })];
        }
    };
    let get = |name: &str| settings.get(name).map(String::as_str);
    let (Some(appendonly), Some(appendfsync), Some(policy)) = (
        get("appendonly"),
        get("appendfsync"),
        get("maxmemory-policy"),
    ) else {
        return vec![finding(ServerIssue::Unverifiable {
            reason: format!(
                "CONFIG GET answered only {:?}",
                settings.keys().collect::<Vec<_>>()
            ),
        })];
    };
    let mut findings = Vec::new();
    if appendonly != "yes" {
        findings.push(finding(ServerIssue::AofDisabled));
    }
    if appendfsync != "always" {
        findings.push(finding(ServerIssue::FsyncNotAlways {
            appendfsync: appendfsync.to_owned(),
        }));
    }
    if policy != "noeviction" {
        findings.push(finding(ServerIssue::EvictionPolicy {
            policy: policy.to_owned(),
        }));
    }
    findings
}
