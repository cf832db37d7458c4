//! The Lua scripts, one per transition, loaded once.
//!
//! Each script is `lua/prelude.lua` (shared helpers) followed by its own file; the text is
//! fixed at compile time (`include_str!`) and hashed once. [`redis::Script::invoke_async`]
//! sends `EVALSHA` and falls back to loading the script on `NOSCRIPT` (after a restart, a
//! failover or `SCRIPT FLUSH`), so the caller never sees the cache being empty.

use std::sync::LazyLock;

use redis::Script;

const PRELUDE: &str = include_str!("../lua/prelude.lua");

/// Every script of the store.
pub(crate) struct Scripts {
    pub(crate) meta: Script,
    pub(crate) create: Script,
    pub(crate) load: Script,
    pub(crate) events: Script,
    pub(crate) claim: Script,
    pub(crate) claim_due: Script,
    pub(crate) renew: Script,
    pub(crate) release: Script,
    pub(crate) commit: Script,
    pub(crate) request_cancel: Script,
    pub(crate) quarantine: Script,
    pub(crate) operator_transition: Script,
    pub(crate) guard_claim: Script,
    pub(crate) guard_complete: Script,
    pub(crate) guard_release: Script,
    pub(crate) list: Script,
    pub(crate) purge: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// The scripts, built (and hashed) on first use.
pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    meta: script(include_str!("../lua/meta.lua")),
    create: script(include_str!("../lua/create.lua")),
    load: script(include_str!("../lua/load.lua")),
    events: script(include_str!("../lua/events.lua")),
    claim: script(include_str!("../lua/claim.lua")),
    claim_due: script(include_str!("../lua/claim_due.lua")),
    renew: script(include_str!("../lua/renew.lua")),
    release: script(include_str!("../lua/release.lua")),
    commit: script(include_str!("../lua/commit.lua")),
    request_cancel: script(include_str!("../lua/request_cancel.lua")),
    quarantine: script(include_str!("../lua/quarantine.lua")),
    operator_transition: script(include_str!("../lua/operator_transition.lua")),
    guard_claim: script(include_str!("../lua/guard_claim.lua")),
    guard_complete: script(include_str!("../lua/guard_complete.lua")),
    guard_release: script(include_str!("../lua/guard_release.lua")),
    list: script(include_str!("../lua/list.lua")),
    purge: script(include_str!("../lua/purge.lua")),
});
