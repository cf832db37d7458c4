//! The one call path of every script: send it (`EVALSHA`, loading the script on
//! `NOSCRIPT`), read the reply's outcome code into a [`ReplyCode`], let the script's module
//! decode the rest, turn the shared refusals into [`StoreError`]s, and wait for replicas
//! after a write when a replica wait is configured.
//!
//! Each script is `prelude.lua` (shared helpers) followed by its own file; the text is fixed
//! at compile time (`include_str!`) and hashed once. [`redis::Script::invoke_async`] sends
//! `EVALSHA` and falls back to loading the script on `NOSCRIPT` (after a restart, a failover
//! or `SCRIPT FLUSH`), so the caller never sees the cache being empty.

use redis::{Script, ScriptInvocation, ToRedisArgs, Value};
use saga_core::{SagaId, StoreError};

use crate::builder::ReplicaWait;
use crate::connection::Connection;
use crate::error::{redis_error, unexpected};
use crate::store::{ms, nil_id};

use super::reply::Reply;

const PRELUDE: &str = include_str!("prelude.lua");

/// A script: the prelude followed by `body`.
pub(crate) fn with_prelude(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// The outcome a script names in the first element of its reply. Every code any script
/// answers with is here; text that is none of them is an unexpected reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplyCode {
    /// `ok`
    Ok,
    /// `not_found`: no saga under the key.
    NotFound,
    /// `fenced`: the caller's fencing token is stale.
    Fenced,
    /// `not_writable`: the saga is finished, quarantined, or not in an expected status.
    NotWritable,
    /// `corrupt`: a key has the wrong type or a field is missing or malformed.
    Corrupt,
    /// `too_large`: an argument is over the payload limit.
    TooLarge,
    /// `invalid`: the arguments are malformed.
    Invalid,
    /// `created` (create).
    Created,
    /// `existing` (create).
    Existing,
    /// `conflict` (create, guard_claim, deliver_signal).
    Conflict,
    /// `claimed` (claim, guard_claim).
    Claimed,
    /// `busy` (claim).
    Busy,
    /// `not_runnable` (claim).
    NotRunnable,
    /// `requested` (request_cancel).
    Requested,
    /// `finished` (request_cancel, deliver_signal).
    Finished,
    /// `completed` (guard_claim).
    Completed,
    /// `in_progress` (guard_claim).
    InProgress,
    /// `lost` (guard_complete).
    Lost,
    /// `delivered` (deliver_signal).
    Delivered,
    /// `duplicate` (deliver_signal).
    Duplicate,
    /// `inbox_full` (deliver_signal).
    InboxFull,
}

impl ReplyCode {
    const NAMES: [(ReplyCode, &'static str); 21] = [
        (ReplyCode::Ok, "ok"),
        (ReplyCode::NotFound, "not_found"),
        (ReplyCode::Fenced, "fenced"),
        (ReplyCode::NotWritable, "not_writable"),
        (ReplyCode::Corrupt, "corrupt"),
        (ReplyCode::TooLarge, "too_large"),
        (ReplyCode::Invalid, "invalid"),
        (ReplyCode::Created, "created"),
        (ReplyCode::Existing, "existing"),
        (ReplyCode::Conflict, "conflict"),
        (ReplyCode::Claimed, "claimed"),
        (ReplyCode::Busy, "busy"),
        (ReplyCode::NotRunnable, "not_runnable"),
        (ReplyCode::Requested, "requested"),
        (ReplyCode::Finished, "finished"),
        (ReplyCode::Completed, "completed"),
        (ReplyCode::InProgress, "in_progress"),
        (ReplyCode::Lost, "lost"),
        (ReplyCode::Delivered, "delivered"),
        (ReplyCode::Duplicate, "duplicate"),
        (ReplyCode::InboxFull, "inbox_full"),
    ];

    /// The code named `text`; an unknown name is an unexpected reply of `op`.
    pub(crate) fn parse(op: &str, text: &str) -> Result<Self, StoreError> {
        Self::NAMES
            .iter()
            .find(|(_, name)| *name == text)
            .map(|(code, _)| *code)
            .ok_or_else(|| unexpected(op, &format!("outcome {text:?}")))
    }

    /// The name the scripts use.
    pub(crate) fn as_str(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(code, _)| *code == self)
            .map_or("?", |(_, name)| name)
    }
}

/// What a script's module made of a reply.
pub(crate) enum Answer<T> {
    /// An outcome of a script that wrote nothing.
    Read(T),
    /// An outcome of a script that wrote: a configured replica wait runs before the caller
    /// gets it.
    Wrote(T),
    /// Not an outcome of this script: one of the shared refusals (`not_found`, `fenced`,
    /// `not_writable`, `too_large`, `corrupt`, `invalid`), mapped by the call path.
    Refused,
}

/// Whether a failed replica wait fails the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaitFailure {
    /// The caller gets the error (retrying is safe).
    Fails,
    /// Logged: the outcome is returned anyway (claims: the leases are held on the primary,
    /// and returning them keeps the sagas running instead of stranding them).
    Logged,
}

/// One script invocation, ready to send: the script, its KEYS and ARGV, and what the call
/// path needs to report errors and wait for replicas.
pub(crate) struct Call {
    op: &'static str,
    invocation: ScriptInvocation<'static>,
    saga: Option<SagaId>,
    fence: u64,
    wait_key: Option<String>,
    wait_failure: WaitFailure,
}

impl Call {
    /// A call of `script`, named `op` in errors and logs.
    pub(crate) fn new(op: &'static str, script: &'static Script) -> Self {
        Self {
            op,
            invocation: script.prepare_invoke(),
            saga: None,
            fence: 0,
            wait_key: None,
            wait_failure: WaitFailure::Fails,
        }
    }

    /// Appends a key to KEYS.
    pub(crate) fn key(mut self, key: impl ToRedisArgs) -> Self {
        self.invocation.key(key);
        self
    }

    /// Appends keys to KEYS.
    pub(crate) fn keys<K: ToRedisArgs>(self, keys: impl IntoIterator<Item = K>) -> Self {
        keys.into_iter().fold(self, Call::key)
    }

    /// Appends an argument to ARGV.
    pub(crate) fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.invocation.arg(arg);
        self
    }

    /// Appends arguments to ARGV.
    pub(crate) fn args<A: ToRedisArgs>(self, args: impl IntoIterator<Item = A>) -> Self {
        args.into_iter().fold(self, Call::arg)
    }

    /// The saga the call concerns and the caller's fencing token (0 without one), for the
    /// errors it maps.
    pub(crate) fn saga(mut self, id: SagaId, fence: u64) -> Self {
        self.saga = Some(id);
        self.fence = fence;
        self
    }

    /// After a write, the replica wait runs on the node holding `key`; without this the
    /// script never waits (a read, or a write nobody waits for).
    pub(crate) fn wait_on(mut self, key: String) -> Self {
        self.wait_key = Some(key);
        self
    }

    /// A failed replica wait is logged instead of failing the call.
    pub(crate) fn wait_logged(mut self) -> Self {
        self.wait_failure = WaitFailure::Logged;
        self
    }

    /// Sends the call and decodes its reply with `decode` (which reads what follows the
    /// outcome code); Redis errors are mapped with [`redis_error`], shared refusals with
    /// [`Reply::into_error`].
    pub(crate) async fn run<T>(
        self,
        conn: &Connection,
        replica_wait: Option<ReplicaWait>,
        decode: impl FnOnce(ReplyCode, &mut Reply) -> Result<Answer<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let mut connection = conn.clone();
        let value: Value = self
            .invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|err| redis_error(self.op, self.saga, err))?;
        let (code, mut reply) = Reply::parse(self.op, value)?;
        match decode(code, &mut reply)? {
            Answer::Read(value) => Ok(value),
            Answer::Wrote(value) => {
                let (Some(wait), Some(key)) = (replica_wait, &self.wait_key) else {
                    return Ok(value);
                };
                match replicate(conn, wait, self.op, key).await {
                    Ok(()) => Ok(value),
                    Err(err) if self.wait_failure == WaitFailure::Logged => {
                        tracing::warn!(error = %err, "{}: replicas did not acknowledge the write", self.op);
                        Ok(value)
                    }
                    Err(err) => Err(err),
                }
            }
            Answer::Refused => {
                Err(reply.into_error(code, self.saga.unwrap_or_else(nil_id), self.fence))
            }
        }
    }
}

/// `WAIT` on the node that holds `key`; fails when too few replicas acknowledged.
async fn replicate(
    conn: &Connection,
    wait: ReplicaWait,
    op: &str,
    key: &str,
) -> Result<(), StoreError> {
    let mut conn = conn.clone();
    let mut cmd = redis::cmd("WAIT");
    cmd.arg(wait.replicas).arg(ms(wait.timeout));
    let acked = conn
        .on_node_of(key, cmd)
        .await
        .map_err(|err| redis_error(op, None, err))?;
    let acked: u64 = redis::from_redis_value(acked)
        .map_err(|err| unexpected(op, &format!("WAIT answered {err}")))?;
    if acked < u64::from(wait.replicas) {
        return Err(StoreError::Unavailable {
            message: format!(
                "{op}: the write was acknowledged by {acked} of {} replicas within {:?}; it is applied on the primary but may be lost on failover (retrying is safe)",
                wait.replicas, wait.timeout
            ),
            source: None,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ReplyCode;

    #[test]
    fn every_code_round_trips_and_unknown_ones_are_errors() {
        for (code, name) in ReplyCode::NAMES {
            assert_eq!(ReplyCode::parse("test", name).ok(), Some(code));
            assert_eq!(code.as_str(), name);
        }
        let Err(err) = ReplyCode::parse("commit", "weird") else {
            panic!("an unknown code must be an error");
        };
        assert!(
            err.to_string().contains("outcome \"weird\""),
            "an unknown code names itself: {err}"
        );
    }
}
