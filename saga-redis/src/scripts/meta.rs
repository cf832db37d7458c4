//! `meta.lua`: records the partition count and key layout version on first use.

use std::sync::LazyLock;

use redis::Script;
use saga_core::StoreError;

use super::call::{Answer, Call, ReplyCode, with_prelude};
use crate::connection::Connection;
use crate::keys::{KeyLayout, LAYOUT_VERSION};

static SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("meta.lua")));

/// What the meta key records: (partition count, layout version).
pub(crate) async fn record(conn: &Connection, keys: &KeyLayout) -> Result<(u64, u64), StoreError> {
    Call::new("meta", &SCRIPT)
        .key(keys.meta())
        .arg(keys.partitions())
        .arg(LAYOUT_VERSION)
        .run(conn, None, |code, reply| match code {
            ReplyCode::Ok => Ok(Answer::Read((reply.uint()?, reply.uint()?))),
            _ => Ok(Answer::Refused),
        })
        .await
}
