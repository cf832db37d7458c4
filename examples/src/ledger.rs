//! The ledger of every effect and compensation the simulated services applied, keyed by
//! idempotency key. The services consult it to answer a repeated key with the recorded
//! result (as Stripe-style APIs do), and the final check reads it to prove that no effect was
//! applied twice and that every compensated saga was fully undone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use saga_core::Phase;
use serde_json::Value;

use crate::world::Caller;

/// One applied effect or compensation.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Global order of application.
    pub seq: u64,
    /// The saga.
    pub saga: String,
    /// Journal position of the step.
    pub position: u32,
    /// Step name.
    pub step: String,
    /// Forward effect or compensation.
    pub phase: Phase,
    /// The idempotency key it was applied under.
    pub key: String,
    /// What was done, for people.
    pub summary: String,
}

#[derive(Debug, Default)]
struct Inner {
    entries: Vec<Entry>,
    results: HashMap<String, Value>,
    duplicates: u64,
}

/// The shared ledger. Cloning gives another handle to the same ledger.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    inner: Arc<Mutex<Inner>>,
}

/// A locked ledger, for applying an effect atomically with its record.
pub struct LedgerGuard<'a> {
    inner: MutexGuard<'a, Inner>,
}

impl Ledger {
    /// Locks the ledger.
    pub fn lock(&self) -> LedgerGuard<'_> {
        // Poisoning only follows a panic in a service closure, which the example treats as a
        // bug; the data is still consistent because every write is a single push or insert.
        LedgerGuard { inner: self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner) }
    }

    /// Every entry, in order of application.
    #[must_use]
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().inner.entries.clone()
    }

    /// How many calls repeated an idempotency key and got the recorded result back.
    #[must_use]
    pub fn duplicates(&self) -> u64 {
        self.lock().inner.duplicates
    }
}

impl LedgerGuard<'_> {
    /// The recorded result of `key`, counting the lookup as a suppressed duplicate.
    pub fn replay(&mut self, key: &str) -> Option<Value> {
        let found = self.inner.results.get(key).cloned();
        if found.is_some() {
            self.inner.duplicates += 1;
        }
        found
    }

    /// The recorded result of `key`, without counting a duplicate.
    #[must_use]
    pub fn peek(&self, key: &str) -> Option<Value> {
        self.inner.results.get(key).cloned()
    }

    /// Records an applied effect and its result.
    pub fn record(&mut self, caller: &Caller, summary: String, result: Value) {
        let seq = self.inner.entries.len() as u64;
        self.inner.entries.push(Entry {
            seq,
            saga: caller.saga.clone(),
            position: caller.position,
            step: caller.step.clone(),
            phase: caller.phase,
            key: caller.key.clone(),
            summary,
        });
        self.inner.results.insert(caller.key.clone(), result);
    }
}
