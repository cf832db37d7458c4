//! The ledger of every effect and compensation the simulated services applied, keyed by
//! idempotency key, and the store that keeps it together with the back office's books. The
//! services consult the ledger to answer a repeated key with the recorded result (as
//! Stripe-style APIs do), and the final check reads it to prove that no effect was applied
//! twice and that every compensated saga was fully undone.
//!
//! The books and the ledger change together in one atomic transaction
//! ([`OfficeStore::transact`]), in memory or — with `--redis-url` — in Redis, so that they
//! survive a `kill -9` of the example.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use saga_core::Phase;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::services::ServiceError;
use crate::world::Caller;

/// One applied effect or compensation.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// The ledger's data.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// Every entry, in order of application.
    pub entries: Vec<Entry>,
    /// The recorded result of each idempotency key.
    pub results: HashMap<String, Value>,
    /// Calls that repeated a key and got the recorded result back.
    pub duplicates: u64,
}

impl Ledger {
    /// The recorded result of `key`, counting the lookup as a suppressed duplicate.
    pub fn replay(&mut self, key: &str) -> Option<Value> {
        let found = self.results.get(key).cloned();
        if found.is_some() {
            self.duplicates += 1;
        }
        found
    }

    /// Records an applied effect and its result.
    pub fn record(&mut self, caller: &Caller, summary: String, result: Value) {
        let seq = self.entries.len() as u64;
        self.entries.push(Entry {
            seq,
            saga: caller.saga.clone(),
            position: caller.position,
            step: caller.step.clone(),
            phase: caller.phase,
            key: caller.key.clone(),
            summary,
        });
        self.results.insert(caller.key.clone(), result);
    }
}

/// The back office's books.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Books {
    /// Sourcing records by content key (company + search date): score and version.
    pub deal_records: BTreeMap<String, (u32, u32)>,
    /// CRM deals by deal id: company id and amount.
    pub crm_deals: BTreeMap<String, (String, f64)>,
    /// Portfolio: invested amount per company.
    pub portfolio: BTreeMap<String, f64>,
    /// Messages to the investment committee (including retractions).
    pub committee: Vec<String>,
    /// Messages to partners.
    pub partners: Vec<String>,
    /// Audit entries by id: text and whether voided.
    pub audit: BTreeMap<String, (String, bool)>,
}

/// Everything the back office keeps: books and ledger.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OfficeState {
    /// The books.
    pub books: Books,
    /// The ledger.
    pub ledger: Ledger,
}

/// A change to the books: returns the effect's result and a summary for the ledger. A change
/// that fails must fail before it mutates anything (every change in this example checks
/// first, then writes).
pub type BookChange = Box<dyn FnOnce(&mut Books) -> Result<(Value, String), ServiceError> + Send>;

/// Where the office state lives. Each effect is applied exactly once per idempotency key,
/// atomically with its ledger entry.
#[async_trait]
pub trait OfficeStore: Send + Sync + std::fmt::Debug {
    /// Applies `change` unless `caller.key` already has a recorded result, in which case that
    /// result comes back (counted as a duplicate) and nothing changes.
    async fn apply_once(&self, caller: &Caller, change: BookChange) -> Result<Value, ServiceError>;

    /// The recorded result of `key`, if its effect was applied (not counted as a duplicate).
    async fn recorded(&self, key: &str) -> Result<Option<Value>, ServiceError>;

    /// A copy of the whole state.
    async fn snapshot(&self) -> Result<OfficeState, ServiceError>;
}

/// The office state in process memory.
#[derive(Debug, Default)]
pub struct MemoryOffice {
    state: Mutex<OfficeState>,
}

impl MemoryOffice {
    fn lock(&self) -> std::sync::MutexGuard<'_, OfficeState> {
        // Poisoning only follows a panic inside a change, which the example treats as a bug.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl OfficeStore for MemoryOffice {
    async fn apply_once(&self, caller: &Caller, change: BookChange) -> Result<Value, ServiceError> {
        let mut state = self.lock();
        if let Some(previous) = state.ledger.replay(&caller.key) {
            return Ok(previous);
        }
        let (result, summary) = change(&mut state.books)?;
        state.ledger.record(caller, summary, result.clone());
        Ok(result)
    }

    async fn recorded(&self, key: &str) -> Result<Option<Value>, ServiceError> {
        Ok(self.lock().ledger.results.get(key).cloned())
    }

    async fn snapshot(&self) -> Result<OfficeState, ServiceError> {
        Ok(self.lock().clone())
    }
}
