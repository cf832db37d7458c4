//! The AOF replay hazard of redis/redis#14541: the writes of a Lua script reach the AOF
//! wrapped in `MULTI`/`EXEC`, and while loading the AOF, Redis before 8.6.0 (and Valkey)
//! re-checks the ACL of every command queued in an `EXEC` as the `default` user. When that
//! user may not run them (`user default off` in the config resets it to no permissions),
//! every transaction is dropped with `NOPERM` while the rest loads: after a restart the
//! server comes back without any saga, and nothing fails loudly.
//!
//! This module finds out, per primary, which server it is ([`ServerVersion`]) and whether
//! the `default` user may run what the store's scripts write ([`DefaultUser`]).

use redis::Value;
use saga_core::SagaId;
use uuid::Uuid;

use crate::keys::KeyLayout;

/// Releases known to have fixed the hazard, by server name: Redis 8.6.0 (redis/redis#14545,
/// listed in the 8.6-RC1 release notes). Valkey merged its fix (valkey-io/valkey#3984) with
/// no release known to us, so every Valkey version counts as affected, as does every
/// server not listed here.
const FIXED_IN: &[(&str, (u32, u32, u32))] = &[("redis", (8, 6, 0))];

/// Which server a node runs, from `INFO server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerVersion {
    /// `redis`, `valkey`, another fork's `server_name`, or empty when unknown.
    name: String,
    /// The version as written, when known.
    version: Option<String>,
}

impl ServerVersion {
    /// The server behind an `INFO server` reply: Valkey names itself in `server_name` and
    /// `valkey_version` (its `redis_version` is the Redis version it is compatible with).
    pub(crate) fn from_info(info: &str) -> Self {
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
                .map(|value| value.trim().to_owned())
        };
        if let Some(version) = field("valkey_version") {
            return Self {
                name: "valkey".to_owned(),
                version: Some(version),
            };
        }
        let name = field("server_name").map_or_else(|| "redis".to_owned(), |n| n.to_lowercase());
        Self {
            name,
            version: field("redis_version"),
        }
    }

    /// A server whose `INFO` could not be read.
    pub(crate) fn unknown() -> Self {
        Self {
            name: String::new(),
            version: None,
        }
    }

    /// `true` unless this server is known to replay an AOF without the `EXEC` ACL re-check.
    pub(crate) fn rechecks_exec_acl_on_load(&self) -> bool {
        let Some(version) = self.version.as_deref().and_then(parse_version) else {
            return true;
        };
        !FIXED_IN
            .iter()
            .any(|(name, fixed)| *name == self.name && version >= *fixed)
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.name.as_str() {
            "" => return f.write_str("server of unknown version"),
            "redis" => "Redis",
            "valkey" => "Valkey",
            other => other,
        };
        match &self.version {
            Some(version) => write!(f, "{name} {version}"),
            None => write!(f, "{name} of unknown version"),
        }
    }
}

/// `8.6.0` (or `7.2.4-rc1`) as numbers; `None` when it does not start like a version.
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.split(['.', '-']).map(|part| part.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// What the `default` user may do, as far as replaying the store's writes goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DefaultUser {
    /// It may run every write the scripts make, on the store's keys and wake channel.
    Sufficient,
    /// It may not: why, for people.
    Lacking(String),
    /// Its rules could not be read (`ACL GETUSER` refused): why.
    Unknown(String),
}

/// The `default` user's rules, from `ACL GETUSER default`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rules {
    flags: Vec<String>,
    commands: String,
    keys: String,
    channels: String,
}

impl Rules {
    /// Parses an `ACL GETUSER` reply (a RESP3 map or a RESP2 array of name/value pairs;
    /// `keys` and `channels` are strings since Redis 7.0 and arrays of patterns before).
    pub(crate) fn parse(value: Value) -> Option<Self> {
        let pairs: Vec<(Value, Value)> = match value {
            Value::Map(pairs) => pairs,
            Value::Array(items) => {
                let mut items = items.into_iter();
                let mut pairs = Vec::new();
                while let (Some(name), Some(value)) = (items.next(), items.next()) {
                    pairs.push((name, value));
                }
                pairs
            }
            _ => return None,
        };
        let mut rules = Rules::default();
        for (name, value) in pairs {
            match text(&name)?.as_str() {
                "flags" => rules.flags = words(&value),
                "commands" => rules.commands = words(&value).join(" "),
                "keys" => rules.keys = patterns(&value, '~'),
                "channels" => rules.channels = patterns(&value, '&'),
                _ => {}
            }
        }
        Some(rules)
    }

    /// `true` when the rules grant everything (`+@all ~* &*`), which needs no closer look.
    pub(crate) fn grants_everything(&self) -> bool {
        let flag = |name: &str| self.flags.iter().any(|f| f == name);
        (self.commands == "+@all" || flag("allcommands") && !self.commands.contains('-'))
            && (self
                .keys
                .split_whitespace()
                .any(|k| k == "~*" || k == "%RW~*")
                || flag("allkeys"))
            && (self.channels.split_whitespace().any(|c| c == "&*") || flag("allchannels"))
    }

    /// `true` when the user is `off`.
    pub(crate) fn is_off(&self) -> bool {
        self.flags.iter().any(|f| f == "off")
    }
}

impl std::fmt::Display for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_none = |s: &str| {
            if s.is_empty() {
                "none".to_owned()
            } else {
                s.to_owned()
            }
        };
        write!(
            f,
            "`user default {}`: commands {}, keys {}, channels {}",
            if self.is_off() { "off" } else { "on" },
            or_none(&self.commands),
            or_none(&self.keys),
            or_none(&self.channels)
        )
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

fn words(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) | Value::Set(items) => items.iter().filter_map(text).collect(),
        other => text(other)
            .map(|t| t.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    }
}

/// Key or channel patterns as one string in the 7.0 form (`~a:* ~b:*`); Redis 6 answers an
/// array of bare patterns.
fn patterns(value: &Value, sigil: char) -> String {
    match value {
        Value::Array(items) | Value::Set(items) => items
            .iter()
            .filter_map(text)
            .map(|p| format!("{sigil}{p}"))
            .collect::<Vec<_>>()
            .join(" "),
        other => text(other).unwrap_or_default(),
    }
}

/// The commands the store's scripts write with (what an AOF holds inside their
/// `MULTI`/`EXEC`), each as `ACL DRYRUN default ...` arguments on a representative key of
/// `keys` (or its wake channel for `PUBLISH`). Reads are not replayed, so they do not count.
pub(crate) fn replayed_writes(keys: &KeyLayout) -> Vec<Vec<String>> {
    let key = keys.saga(SagaId(Uuid::nil()));
    let meta = keys.meta();
    let due = keys.due(0);
    let s = |parts: &[&str]| parts.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
    vec![
        s(&["HSET", &meta, "f", "v"]),
        s(&["HSET", &key, "f", "v"]),
        s(&["HDEL", &key, "f"]),
        s(&["ZADD", &due, "1", "m"]),
        s(&["ZREM", &due, "m"]),
        s(&["RPUSH", &keys.events(SagaId(Uuid::nil())), "v"]),
        s(&["DEL", &key]),
        s(&["PEXPIRE", &key, "1000"]),
        s(&["PUBLISH", &keys.wake_channel(), "m"]),
    ]
}

/// What one `ACL DRYRUN` answered: `Ok(None)` allowed, `Ok(Some(why))` denied, `Err` when
/// the server has no `ACL DRYRUN` (before Redis 7.0) or refused it.
pub(crate) fn dryrun_verdict(
    reply: Result<Value, redis::RedisError>,
) -> Result<Option<String>, String> {
    match reply {
        Ok(Value::Okay) => Ok(None),
        Ok(value) => match text(&value) {
            Some(answer) if answer == "OK" => Ok(None),
            Some(answer) => Ok(Some(answer)),
            None => Err(format!("unexpected ACL DRYRUN reply {value:?}")),
        },
        Err(err) => Err(err.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn versions_affected_and_fixed() {
        let redis = |v: &str| {
            ServerVersion::from_info(&format!(
                "# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n"
            ))
        };
        assert!(redis("7.0.15").rechecks_exec_acl_on_load());
        assert!(redis("8.4.1").rechecks_exec_acl_on_load());
        assert!(!redis("8.6.0").rechecks_exec_acl_on_load());
        assert!(!redis("9.0.1").rechecks_exec_acl_on_load());
        assert!(redis("weird").rechecks_exec_acl_on_load());
        assert_eq!(redis("7.0.15").to_string(), "Redis 7.0.15");
        let valkey = ServerVersion::from_info(
            "redis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:9.0.1\r\n",
        );
        assert_eq!(valkey.to_string(), "Valkey 9.0.1");
        assert!(
            valkey.rechecks_exec_acl_on_load(),
            "no Valkey release is known fixed"
        );
        assert!(ServerVersion::unknown().rechecks_exec_acl_on_load());
    }

    #[test]
    fn rules_from_resp2_and_redis6_replies() {
        let off = Value::Array(vec![
            bulk("flags"),
            Value::Array(vec![bulk("off"), bulk("sanitize-payload")]),
            bulk("passwords"),
            Value::Array(vec![]),
            bulk("commands"),
            bulk("-@all"),
            bulk("keys"),
            bulk(""),
            bulk("channels"),
            bulk(""),
            bulk("selectors"),
            Value::Array(vec![]),
        ]);
        let rules = Rules::parse(off).unwrap();
        assert!(rules.is_off());
        assert!(!rules.grants_everything());
        assert_eq!(
            rules.to_string(),
            "`user default off`: commands -@all, keys none, channels none"
        );
        let full = Value::Map(vec![
            (
                bulk("flags"),
                Value::Array(vec![bulk("on"), bulk("nopass")]),
            ),
            (bulk("commands"), bulk("+@all")),
            (bulk("keys"), bulk("~*")),
            (bulk("channels"), bulk("&*")),
        ]);
        assert!(Rules::parse(full).unwrap().grants_everything());
        let redis6 = Value::Array(vec![
            bulk("flags"),
            Value::Array(vec![
                bulk("on"),
                bulk("allkeys"),
                bulk("allchannels"),
                bulk("allcommands"),
            ]),
            bulk("commands"),
            bulk("+@all"),
            bulk("keys"),
            Value::Array(vec![bulk("*")]),
            bulk("channels"),
            Value::Array(vec![bulk("*")]),
        ]);
        assert!(Rules::parse(redis6).unwrap().grants_everything());
        let narrower = Value::Map(vec![
            (bulk("flags"), Value::Array(vec![bulk("on")])),
            (bulk("commands"), bulk("+@all -@dangerous")),
            (bulk("keys"), bulk("~*")),
            (bulk("channels"), bulk("&*")),
        ]);
        assert!(!Rules::parse(narrower).unwrap().grants_everything());
    }

    #[test]
    fn dryrun_answers() {
        assert_eq!(dryrun_verdict(Ok(Value::Okay)), Ok(None));
        assert_eq!(
            dryrun_verdict(Ok(bulk(
                "User default has no permissions to run the 'hset' command"
            ))),
            Ok(Some(
                "User default has no permissions to run the 'hset' command".to_owned()
            ))
        );
    }
}
