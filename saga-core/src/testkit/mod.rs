//! Test support for stores and engines (feature `testkit`).
