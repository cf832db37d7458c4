//! What the store keeps for signals: a per-saga inbox, deduplicated by key.
//!
//! A signal is stored outside the saga's state (which only its lease holder writes), in an
//! inbox the engine reads when the workflow waits for one: so a signal sent before the wait,
//! during it (the saga suspended or running), or while its coordinator restarts is never
//! lost, and the same key is kept once.

use serde::{Deserialize, Serialize};

use crate::{SagaStatus, Timestamp};

/// How many signals one saga's inbox holds at most; a delivery past it is
/// [`StoreError::InboxFull`](super::StoreError::InboxFull). Stores enforce it so that a client
/// in a loop cannot grow one saga without bound.
///
/// Signals whose name starts with [`ENGINE_SIGNAL_PREFIX`] are the engine's own (a child saga
/// waking its parent): they are delivered past the limit, which bounds what clients send.
pub const MAX_SIGNALS_PER_SAGA: usize = 1000;

/// The name prefix of the engine's own signals (clients cannot send them).
pub const ENGINE_SIGNAL_PREFIX: &str = "saga.";

/// A signal to deliver, for [`SagaStore::deliver_signal`](super::SagaStore::deliver_signal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalDelivery {
    /// The signal's name (what the workflow waits for).
    pub name: String,
    /// The sender's key: a second delivery of the same name and key is a duplicate.
    pub key: String,
    /// The encoded JSON payload.
    pub payload: String,
    /// When it was sent: a wait counts it only if it was sent by the wait's deadline.
    pub at: Timestamp,
    /// The encoded history event (`SignalReceived`) appended with it.
    pub event: String,
}

/// A signal in a saga's inbox, from [`SagaStore::signals`](super::SagaStore::signals).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSignal {
    /// Its place in the inbox: 1 for the first signal the saga received.
    pub sequence: u64,
    /// The signal's name.
    pub name: String,
    /// The sender's key.
    pub key: String,
    /// The encoded JSON payload, as delivered.
    pub payload: String,
    /// When it was sent.
    pub at: Timestamp,
}

/// What [`SagaStore::deliver_signal`](super::SagaStore::deliver_signal) did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryOutcome {
    /// Stored under this sequence number; the saga is due at once unless someone holds it
    /// (the holder sees the signal when it looks, and a wait it commits sees it too).
    Delivered {
        /// The signal's sequence number.
        sequence: u64,
    },
    /// The same name and key were delivered before, with the same payload: nothing written.
    Duplicate {
        /// The sequence number of the first delivery.
        sequence: u64,
    },
    /// The saga has ended: nothing written, nothing will read the signal.
    AlreadyFinished(SagaStatus),
}
