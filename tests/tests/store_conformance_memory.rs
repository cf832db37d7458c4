//! The store conformance suite against the in-memory store.

use std::sync::Arc;

use saga_core::MemoryStore;
use saga_core::store::DEFAULT_MAX_PAYLOAD;

saga_core::store_conformance_tests! {
    store: async { Arc::new(MemoryStore::new()) },
    max_payload: DEFAULT_MAX_PAYLOAD,
}

/// The same suite with a small payload limit, so the size cases check that the limit is the
/// store's configured one rather than a constant.
mod small_payload_limit {
    use std::sync::Arc;

    use saga_core::MemoryStore;

    const LIMIT: usize = 1024;

    saga_core::store_conformance_tests! {
        store: async { Arc::new(MemoryStore::new().with_max_payload(LIMIT)) },
        max_payload: LIMIT,
    }
}
