//! Integration tests of the saga workspace.
