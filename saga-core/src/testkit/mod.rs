//! Test support for stores and engines (feature `testkit`).
//!
//! - [`conformance`]: the store conformance suite. Every [`SagaStore`](crate::SagaStore)
//!   implementation runs it through [`store_conformance_tests!`](crate::store_conformance_tests),
//!   which expands to one `#[tokio::test]` per case.

pub mod conformance;
