//! Start-up checks of the server settings the store's guarantees depend on.

use std::collections::HashMap;
use std::fmt;

use redis::Value;

use crate::connection::Connection;
use crate::keys::KeyLayout;
use crate::replay::{DefaultUser, Rules, ServerVersion, dryrun_verdict, replayed_writes};

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
    /// AOF is on (or could not be read) and the `default` user may not run the writes the
    /// store's scripts make, on a server that re-checks `EXEC`'s ACL as the `default` user
    /// while loading its AOF (redis/redis#14541: Redis before 8.6.0, and Valkey): after a
    /// restart every saga write is dropped while the AOF loads, silently. When AOF is known
    /// to be on, [`RedisStoreBuilder::connect`](crate::RedisStoreBuilder::connect) refuses
    /// to start ([`ConnectError::AofReplayLoss`](crate::ConnectError::AofReplayLoss)) unless
    /// allowed with
    /// [`allow_unsafe_server_config`](crate::RedisStoreBuilder::allow_unsafe_server_config).
    AofReplayLoss {
        /// The server and its version, e.g. `Redis 7.0.15`.
        server: String,
        /// What the `default` user lacks, e.g. its rules.
        problem: String,
        /// `true` when `appendonly yes` was read; `false` when `CONFIG GET` was refused.
        aof_confirmed: bool,
    },
    /// AOF is on (or could not be read), but whether the `default` user may replay the
    /// store's writes could not be verified (`ACL GETUSER default` refused): the hazard of
    /// [`AofReplayLoss`](Self::AofReplayLoss) is not ruled out.
    AofReplayUnverifiable {
        /// The server and its version, e.g. `Redis 7.0.15`.
        server: String,
        /// Why.
        reason: String,
    },
}

impl ServerIssue {
    /// `true` for the configurations that lose every saga on the next restart, which
    /// [`RedisStoreBuilder::connect`](crate::RedisStoreBuilder::connect) refuses.
    #[must_use]
    pub fn loses_everything_on_restart(&self) -> bool {
        matches!(
            self,
            ServerIssue::AofReplayLoss {
                aof_confirmed: true,
                ..
            }
        )
    }
}

/// A server configuration that [`RedisStoreBuilder::connect`](crate::RedisStoreBuilder::connect)
/// refuses unless allowed with
/// [`allow_unsafe_server_config`](crate::RedisStoreBuilder::allow_unsafe_server_config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnsafeServerConfig {
    /// [`ServerIssue::AofReplayLoss`] with AOF known to be on: the next restart of the
    /// server loses every saga (redis/redis#14541).
    AofAclReplayLoss,
}

/// The workaround of redis/redis#14541, for messages.
pub(crate) const REPLAY_WORKAROUND: &str = "keep `user default on` with a strong password and full permissions \
     (`user default on >LONG-RANDOM-PASSWORD ~* &* +@all`) and connect as your own ACL user, or run Redis 8.6.0 or later";

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
            ServerIssue::AofReplayLoss {
                server,
                problem,
                aof_confirmed,
            } => write!(
                f,
                "Redis {node} ({server}): {aof}the default user {problem}, and this server re-checks EXEC's ACL as the default user while loading its AOF \
                 (redis/redis#14541), so after a restart it drops every saga write the scripts made and comes back without them; {REPLAY_WORKAROUND}",
                aof = if *aof_confirmed {
                    "AOF is on and "
                } else {
                    "if AOF is on (appendonly could not be read), "
                }
            ),
            ServerIssue::AofReplayUnverifiable { server, reason } => write!(
                f,
                "Redis {node} ({server}): could not read the default user's permissions ({reason}); if AOF is on and the default user may not run the store's writes, \
                 a restart loses every saga (redis/redis#14541): make sure the server has `user default on` with `~* &* +@all`, or allow ACL GETUSER to this user so that it can be checked"
            ),
        }
    }
}

/// Runs `CONFIG GET appendonly appendfsync maxmemory-policy` on every primary reachable
/// through `connection` (`node_name` names a standalone server), and on those whose AOF is
/// on (or unreadable) the AOF replay check of [`crate::replay`]; logs each finding.
pub(crate) async fn check_server(
    connection: &Connection,
    node_name: &str,
    keys: &KeyLayout,
) -> Vec<ServerFinding> {
    let mut conn = connection.clone();
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET")
        .arg("appendonly")
        .arg("appendfsync")
        .arg("maxmemory-policy");
    let mut findings = Vec::new();
    // Nodes whose AOF may be replayed, with whether `appendonly yes` was read.
    let mut replaying = Vec::new();
    for (node, reply) in conn.on_every_primary(node_name, cmd).await {
        let node_findings = findings_for(&node, reply);
        let aof_off = node_findings
            .iter()
            .any(|f| f.issue == ServerIssue::AofDisabled);
        let unreadable = node_findings
            .iter()
            .any(|f| matches!(f.issue, ServerIssue::Unverifiable { .. }));
        if !aof_off {
            replaying.push((node.clone(), !unreadable));
        }
        findings.extend(node_findings);
    }
    if !replaying.is_empty() {
        findings.extend(replay_findings(&mut conn, node_name, keys, &replaying).await);
    }
    for finding in &findings {
        tracing::warn!(node = %finding.node, issue = ?finding.issue, "{finding}");
    }
    findings
}

/// The AOF replay findings of the `replaying` nodes (name, whether AOF is known to be on).
async fn replay_findings(
    conn: &mut Connection,
    node_name: &str,
    keys: &KeyLayout,
    replaying: &[(String, bool)],
) -> Vec<ServerFinding> {
    let mut info = redis::cmd("INFO");
    info.arg("server");
    let versions: HashMap<String, ServerVersion> = conn
        .on_every_primary(node_name, info)
        .await
        .into_iter()
        .map(|(node, reply)| {
            let version = reply
                .ok()
                .and_then(|value| redis::from_redis_value::<String>(value).ok())
                .map_or_else(ServerVersion::unknown, |text| {
                    ServerVersion::from_info(&text)
                });
            (node, version)
        })
        .collect();
    let mut getuser = redis::cmd("ACL");
    getuser.arg("GETUSER").arg("default");
    let rules: HashMap<String, Result<Value, redis::RedisError>> = conn
        .on_every_primary(node_name, getuser)
        .await
        .into_iter()
        .collect();
    // Rules narrower than `+@all ~* &*` are looked at closer, on every primary at once.
    let needs_dry_run = rules.values().any(|reply| {
        reply
            .as_ref()
            .ok()
            .and_then(|value| Rules::parse(value.clone()))
            .is_some_and(|rules| !rules.grants_everything())
    });
    let dry_runs = if needs_dry_run {
        dry_run(conn, node_name, keys).await
    } else {
        HashMap::new()
    };
    let mut findings = Vec::new();
    for (node, aof_confirmed) in replaying {
        let server = versions
            .get(node)
            .cloned()
            .unwrap_or_else(ServerVersion::unknown);
        if !server.rechecks_exec_acl_on_load() {
            continue;
        }
        let verdict = match rules.get(node) {
            Some(Ok(value)) => match Rules::parse(value.clone()) {
                Some(rules) if rules.grants_everything() => DefaultUser::Sufficient,
                Some(rules) => judge(&rules, dry_runs.get(node)),
                None => DefaultUser::Unknown(format!("unexpected ACL GETUSER reply {value:?}")),
            },
            // A server without ACLs (before Redis 6) has no `default` user to restrict.
            Some(Err(err)) if is_unknown_command(err) => DefaultUser::Sufficient,
            Some(Err(err)) => DefaultUser::Unknown(format!("ACL GETUSER default: {err}")),
            None => DefaultUser::Unknown("ACL GETUSER default got no reply from this node".into()),
        };
        let issue = match verdict {
            DefaultUser::Sufficient => continue,
            DefaultUser::Lacking(problem) => ServerIssue::AofReplayLoss {
                server: server.to_string(),
                problem,
                aof_confirmed: *aof_confirmed,
            },
            DefaultUser::Unknown(reason) => ServerIssue::AofReplayUnverifiable {
                server: server.to_string(),
                reason,
            },
        };
        findings.push(ServerFinding {
            node: node.clone(),
            issue,
        });
    }
    findings
}

/// What `ACL DRYRUN default ...` answered on one node for each write of the scripts: the
/// commands denied, or why it could not be asked.
type DryRun = Result<Vec<String>, String>;

/// Asks every primary with `ACL DRYRUN default ...` whether the `default` user may run each
/// write of the scripts.
async fn dry_run(
    conn: &mut Connection,
    node_name: &str,
    keys: &KeyLayout,
) -> HashMap<String, DryRun> {
    let mut results: HashMap<String, DryRun> = HashMap::new();
    for write in replayed_writes(keys) {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("DRYRUN").arg("default").arg(&write);
        for (node, reply) in conn.on_every_primary(node_name, cmd).await {
            let entry = results.entry(node).or_insert_with(|| Ok(Vec::new()));
            let Ok(denied) = entry else { continue };
            match dryrun_verdict(reply) {
                Ok(None) => {}
                Ok(Some(_)) => {
                    if !denied.contains(&write[0]) {
                        denied.push(write[0].clone());
                    }
                }
                Err(reason) => *entry = Err(reason),
            }
        }
    }
    results
}

/// The verdict on rules narrower than `+@all ~* &*`, given what `ACL DRYRUN` said; without
/// an answer (before Redis 7.0 there is no `ACL DRYRUN`) they count as lacking.
fn judge(rules: &Rules, dry_run: Option<&DryRun>) -> DefaultUser {
    match dry_run {
        Some(Ok(denied)) if denied.is_empty() => DefaultUser::Sufficient,
        Some(Ok(denied)) => DefaultUser::Lacking(format!(
            "may not run {} on the store's keys and wake channel ({rules})",
            denied.join(", ")
        )),
        Some(Err(_)) | None => DefaultUser::Lacking(format!(
            "has narrower rules than `+@all ~* &*` ({rules}), and this server cannot tell with ACL DRYRUN whether they allow the store's writes"
        )),
    }
}

fn is_unknown_command(err: &redis::RedisError) -> bool {
    err.code() == Some("ERR") && err.to_string().to_lowercase().contains("unknown command")
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
