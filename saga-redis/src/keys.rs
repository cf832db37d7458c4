//! The key layout: partitions, hash tags and key names.
//!
//! Every key of a saga lives in one partition, chosen from the saga id; every key of a
//! partition carries the partition's hash tag (`{p07}`), so each Lua script touches keys of
//! one Redis Cluster slot, and the partitions spread over the cluster's nodes. User-supplied
//! strings (saga type names, idempotency and guard keys) never appear in key names: they are
//! replaced by UUID v5 values derived from them. The full table is in `docs/ARCHITECTURE.md`
//! ("Redis layout").

use saga_core::{SagaId, SagaStatus};
use uuid::Uuid;

/// The version of this key layout, recorded in the meta key.
pub(crate) const LAYOUT_VERSION: u32 = 1;

/// Namespace of the UUID v5 values that stand for user strings in key names.
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x3b0f_6a52_9d1e_4c7a_8e25_71d4_c0a9_5f13);

/// Names every key of one deployment (one key prefix and partition count).
///
/// Exposed for operators and tests that inspect the raw data; the store itself is the only
/// writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLayout {
    prefix: String,
    partitions: u16,
}

impl KeyLayout {
    pub(crate) fn new(prefix: String, partitions: u16) -> Self {
        Self { prefix, partitions }
    }

    /// The key prefix (default `saga`).
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The partition count.
    #[must_use]
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The partition of a saga: its id as a 128-bit integer, modulo the partition count.
    #[must_use]
    pub fn partition_of(&self, id: SagaId) -> u16 {
        self.partition_of_uuid(id.0)
    }

    fn partition_of_uuid(&self, uuid: Uuid) -> u16 {
        // The remainder is below `partitions`, a u16.
        u16::try_from(uuid.as_u128() % u128::from(self.partitions.max(1))).unwrap_or(0)
    }

    /// The common start of every key of partition `p`: `<prefix>:{pNN}:`.
    #[must_use]
    pub fn partition_base(&self, p: u16) -> String {
        format!("{}:{{p{p:02}}}:", self.prefix)
    }

    /// The pub/sub channel on which the scripts announce that work may be waiting (a saga
    /// created, released, cancelled, finished, made due at once or reopened by an operator):
    /// `<prefix>:wake`. A channel, not a key: it belongs to no slot.
    #[must_use]
    pub fn wake_channel(&self) -> String {
        format!("{}:wake", self.prefix)
    }

    /// The meta hash (partition count, layout version). Not in any partition.
    #[must_use]
    pub fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }

    /// The saga hash: `<prefix>:{pNN}:saga:<id>`.
    #[must_use]
    pub fn saga(&self, id: SagaId) -> String {
        format!("{}saga:{id}", self.partition_base(self.partition_of(id)))
    }

    /// The saga's event list: `<prefix>:{pNN}:events:<id>`.
    #[must_use]
    pub fn events(&self, id: SagaId) -> String {
        format!("{}events:{id}", self.partition_base(self.partition_of(id)))
    }

    /// The saga's signal inbox: `<prefix>:{pNN}:signals:<id>`, a list of encoded signals,
    /// oldest first; a signal's sequence number is its position plus one (append only).
    #[must_use]
    pub fn signals(&self, id: SagaId) -> String {
        format!("{}signals:{id}", self.partition_base(self.partition_of(id)))
    }

    /// The saga's delivered signal keys: `<prefix>:{pNN}:signal_keys:<id>`, a hash from
    /// `<byte length of the name>:<name><key>` to the sequence number of the first delivery
    /// (the length prefix keeps every (name, key) pair distinct, whatever bytes they hold).
    #[must_use]
    pub fn signal_keys(&self, id: SagaId) -> String {
        format!(
            "{}signal_keys:{id}",
            self.partition_base(self.partition_of(id))
        )
    }

    /// The partition's due set (id → due time in ms; a leased saga is due at its expiry).
    #[must_use]
    pub fn due(&self, p: u16) -> String {
        format!("{}due", self.partition_base(p))
    }

    /// The partition's index of every saga id (lexicographic).
    #[must_use]
    pub fn ids(&self, p: u16) -> String {
        format!("{}ids", self.partition_base(p))
    }

    /// The partition's index of the sagas in `status` (lexicographic by id).
    #[must_use]
    pub fn status(&self, p: u16, status: SagaStatus) -> String {
        format!("{}status:{}", self.partition_base(p), status.as_str())
    }

    /// The partition's five status indexes, in [`SagaStatus::ALL`] order.
    pub(crate) fn statuses(&self, p: u16) -> [String; 5] {
        SagaStatus::ALL.map(|status| self.status(p, status))
    }

    /// The partition's index of the sagas of one type (lexicographic by id); the type name is
    /// replaced by [`type_key`](Self::type_key).
    #[must_use]
    pub fn type_index(&self, p: u16, saga_type: &str) -> String {
        format!(
            "{}type:{}",
            self.partition_base(p),
            Self::type_key(saga_type)
        )
    }

    /// The partition's finished sagas, scored by their last write (for purge).
    #[must_use]
    pub fn terminal(&self, p: u16) -> String {
        format!("{}terminal", self.partition_base(p))
    }

    /// The partition's quarantine hash (id → reason).
    #[must_use]
    pub fn quarantine(&self, p: u16) -> String {
        format!("{}quarantine", self.partition_base(p))
    }

    /// The idempotency record of a guard key: `<prefix>:{pNN}:guard:<UUID v5 of the key>`,
    /// in the partition of that UUID.
    #[must_use]
    pub fn guard(&self, key: &str) -> String {
        let hashed = Uuid::new_v5(&KEY_NAMESPACE, format!("guard\0{key}").as_bytes());
        format!(
            "{}guard:{hashed}",
            self.partition_base(self.partition_of_uuid(hashed))
        )
    }

    /// The UUID v5 that stands for a saga type name in key names.
    #[must_use]
    pub fn type_key(saga_type: &str) -> Uuid {
        Uuid::new_v5(&KEY_NAMESPACE, format!("type\0{saga_type}").as_bytes())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_saga_shares_its_partition_tag() {
        let layout = KeyLayout::new("saga".into(), 16);
        let id: SagaId = "6f1c2a3b-1111-4222-8333-444455556666".parse().unwrap();
        let p = layout.partition_of(id);
        let tag = format!("{{p{p:02}}}");
        for key in [
            layout.saga(id),
            layout.events(id),
            layout.signals(id),
            layout.signal_keys(id),
            layout.due(p),
            layout.ids(p),
            layout.status(p, SagaStatus::Failed),
            layout.type_index(p, "deal {flow}"),
            layout.terminal(p),
            layout.quarantine(p),
        ] {
            assert!(
                key.starts_with(&format!("saga:{tag}:")),
                "{key} must start with the partition base"
            );
        }
    }

    #[test]
    fn user_strings_never_appear_in_key_names() {
        let layout = KeyLayout::new("saga".into(), 16);
        let key = layout.guard("charge:{company-123}");
        assert!(!key.contains("company"), "{key}");
        assert_eq!(
            key.matches('{').count(),
            1,
            "only the partition tag has braces: {key}"
        );
        let index = layout.type_index(3, "deal {flow}");
        assert!(!index.contains("deal"), "{index}");
    }

    #[test]
    fn partitions_spread_and_are_stable() {
        let layout = KeyLayout::new("saga".into(), 16);
        let mut seen = std::collections::BTreeSet::new();
        for n in 0u128..64 {
            let id = SagaId(Uuid::from_u128(n));
            assert_eq!(layout.partition_of(id), u16::try_from(n % 16).unwrap());
            seen.insert(layout.partition_of(id));
        }
        assert_eq!(seen.len(), 16);
    }
}
