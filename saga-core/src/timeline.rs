//! Human-readable rendering of a saga's history.
