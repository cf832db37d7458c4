//! The ledger of every effect and compensation the simulated services applied, keyed by
//! idempotency key, and the store that keeps it together with the back office's books. The
//! services consult the ledger to answer a repeated key with the recorded result (as
//! Stripe-style APIs do), and the final check reads it to prove that no effect was applied
//! twice and that every compensated saga was fully undone.
//!
//! An effect is a [`BookChange`]: a description, as data, of what it does to which record of
//! the books. [`OfficeStore::apply_once`] applies it together with its recorded result and its
//! ledger entry in one atomic step, in memory ([`MemoryOffice`], via [`BookChange::apply`]) or
//! — with `--redis-url` — in Redis ([`crate::redis_office::RedisOffice`], via one Lua script
//! with the same semantics), so that the books survive a `kill -9` of the example and effects
//! on different records never wait for each other.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use saga_core::Phase;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::deal::PortfolioChange;
use crate::services::ServiceError;
use crate::sourcing::RecordWrite;
use crate::world::Caller;

/// One applied effect or compensation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

impl Entry {
    /// The entry of `caller`'s effect, number `seq`, described by `summary`.
    #[must_use]
    pub fn of(caller: &Caller, seq: u64, summary: String) -> Self {
        Self {
            seq,
            saga: caller.saga.clone(),
            position: caller.position,
            step: caller.step.clone(),
            phase: caller.phase,
            key: caller.key.clone(),
            summary,
        }
    }
}

/// The ledger's data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
        self.entries.push(Entry::of(caller, seq, summary));
        self.results.insert(caller.key.clone(), result);
    }
}

/// The back office's books.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OfficeState {
    /// The books.
    pub books: Books,
    /// The ledger.
    pub ledger: Ledger,
}

/// A portfolio position this close to zero is closed (removed from the book) rather than
/// kept as floating-point dust after a revert.
pub const CLOSED_POSITION_MUSD: f64 = 1e-9;

/// A change to the books, as data: which record an effect changes and how, what it returns
/// and how the ledger describes it. Data rather than a closure so that every office applies
/// it with the same semantics where the books live — [`BookChange::apply`] in process,
/// `examples/lua/office_apply.lua` inside Redis, one record at a time and atomically with the
/// ledger — instead of reading the books, changing them and writing them back under a lock.
///
/// Summaries and results that do not depend on the books are computed by the step and
/// carried as given (so that, for example, amounts are formatted by Rust in both offices);
/// the rest is computed by the office from the record it changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum BookChange {
    /// Books a CRM deal (replacing one with the same id). Result: `result`, as given.
    CreateDeal {
        /// CRM id.
        deal_id: String,
        /// The company.
        company_id: String,
        /// Amount, in millions.
        amount_musd: f64,
        /// The effect's result (it depends on nothing in the books). Carried as JSON text so
        /// that every office records exactly these bytes.
        #[serde(with = "json_text")]
        result: Value,
        /// For the ledger.
        summary: String,
    },
    /// Deletes a CRM deal; a deal that is not there stays absent. Result: `null`.
    DeleteDeal {
        /// CRM id.
        deal_id: String,
        /// For the ledger.
        summary: String,
    },
    /// Adds to a company's portfolio position (opening it at 0). Result: the
    /// [`PortfolioChange`] (amount before and after).
    AddToPortfolio {
        /// The company.
        company_id: String,
        /// Amount to add, in millions.
        amount_musd: f64,
        /// For the ledger.
        summary: String,
    },
    /// Takes an amount off a company's portfolio position, closing a position that reaches
    /// zero (within [`CLOSED_POSITION_MUSD`]). Result: `null`.
    TakeFromPortfolio {
        /// The company.
        company_id: String,
        /// Amount to take off, in millions.
        amount_musd: f64,
        /// For the ledger.
        summary: String,
    },
    /// Sends the investment committee a notice. Result: the notice's index among the
    /// committee's messages. Summary: the text.
    NotifyCommittee {
        /// The message.
        text: String,
    },
    /// Sends the investment committee a retraction. Result: `null`. Summary: the text.
    RetractCommitteeNotice {
        /// The message.
        text: String,
    },
    /// Writes audit entry `audit-<n>` (n = entries so far + 1) saying the deal was booked.
    /// Compliance refuses a watchlisted company ([`ServiceError::Rejected`], nothing
    /// written). Result: the audit id.
    WriteAuditEntry {
        /// The deal.
        deal_id: String,
        /// The company, for the refusal.
        company_name: String,
        /// Under a compliance hold.
        watchlisted: bool,
    },
    /// Marks an audit entry void; an entry that is not there is left alone. Result: `null`.
    VoidAuditEntry {
        /// The audit entry.
        audit_id: String,
        /// For the ledger.
        summary: String,
    },
    /// Creates version 1 of a deal record or writes the next version. Result: the
    /// [`RecordWrite`] (the score and version it replaced).
    UpsertDealRecord {
        /// Content key of the record.
        record_key: String,
        /// The company, for the ledger.
        company_id: String,
        /// The new score.
        score: u32,
    },
    /// Puts a deal record back to `previous`, or removes it when `previous` is `None`.
    /// Result: `null`.
    RestoreDealRecord {
        /// Content key of the record.
        record_key: String,
        /// Score and version to restore.
        previous: Option<(u32, u32)>,
        /// For the ledger.
        summary: String,
    },
    /// Sends the partners a message. Result: `null`. Summary: the text.
    MessagePartners {
        /// The message.
        text: String,
    },
}

/// A [`Value`] carried as a JSON string inside the change's own JSON.
mod json_text {
    use serde::de::Error as _;
    use serde::{Deserialize as _, Deserializer, Serializer};
    use serde_json::Value;

    pub(super) fn serialize<S: Serializer>(
        value: &Value,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Value, D::Error> {
        let text = String::deserialize(deserializer)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}

fn encode<T: Serialize>(result: &T) -> Result<Value, ServiceError> {
    serde_json::to_value(result).map_err(|e| ServiceError::Corrupt(e.to_string()))
}

impl BookChange {
    /// Applies the change to `books`; returns the effect's result and the ledger's summary.
    /// A change that fails has changed nothing.
    ///
    /// # Errors
    /// [`ServiceError::Rejected`] when a business rule refuses it (a watchlisted company's
    /// audit entry).
    pub fn apply(&self, books: &mut Books) -> Result<(Value, String), ServiceError> {
        match self {
            Self::CreateDeal {
                deal_id,
                company_id,
                amount_musd,
                result,
                summary,
            } => {
                books
                    .crm_deals
                    .insert(deal_id.clone(), (company_id.clone(), *amount_musd));
                Ok((result.clone(), summary.clone()))
            }
            Self::DeleteDeal { deal_id, summary } => {
                books.crm_deals.remove(deal_id);
                Ok((Value::Null, summary.clone()))
            }
            Self::AddToPortfolio {
                company_id,
                amount_musd,
                summary,
            } => Ok((
                books.add_to_portfolio(company_id, *amount_musd)?,
                summary.clone(),
            )),
            Self::TakeFromPortfolio {
                company_id,
                amount_musd,
                summary,
            } => {
                books.take_from_portfolio(company_id, *amount_musd);
                Ok((Value::Null, summary.clone()))
            }
            Self::NotifyCommittee { text } => {
                books.committee.push(text.clone());
                Ok((Value::from(books.committee.len() - 1), text.clone()))
            }
            Self::RetractCommitteeNotice { text } => {
                books.committee.push(text.clone());
                Ok((Value::Null, text.clone()))
            }
            Self::WriteAuditEntry {
                deal_id,
                company_name,
                watchlisted,
            } => books.write_audit_entry(deal_id, company_name, *watchlisted),
            Self::VoidAuditEntry { audit_id, summary } => {
                if let Some(entry) = books.audit.get_mut(audit_id) {
                    entry.1 = true;
                }
                Ok((Value::Null, summary.clone()))
            }
            Self::UpsertDealRecord {
                record_key,
                company_id,
                score,
            } => books.upsert_deal_record(record_key, company_id, *score),
            Self::RestoreDealRecord {
                record_key,
                previous,
                summary,
            } => {
                match previous {
                    Some(previous) => books.deal_records.insert(record_key.clone(), *previous),
                    None => books.deal_records.remove(record_key),
                };
                Ok((Value::Null, summary.clone()))
            }
            Self::MessagePartners { text } => {
                books.partners.push(text.clone());
                Ok((Value::Null, text.clone()))
            }
        }
    }
}

/// The changes of [`BookChange::apply`] that compute something from the record they change.
impl Books {
    /// Result: the [`PortfolioChange`].
    fn add_to_portfolio(
        &mut self,
        company_id: &str,
        amount_musd: f64,
    ) -> Result<Value, ServiceError> {
        let before = self.portfolio.get(company_id).copied().unwrap_or_default();
        let after = before + amount_musd;
        let result = encode(&PortfolioChange {
            before_musd: before,
            after_musd: after,
        })?;
        self.portfolio.insert(company_id.to_owned(), after);
        Ok(result)
    }

    fn take_from_portfolio(&mut self, company_id: &str, amount_musd: f64) {
        let before = self.portfolio.get(company_id).copied().unwrap_or_default();
        let after = before - amount_musd;
        if after.abs() < CLOSED_POSITION_MUSD {
            self.portfolio.remove(company_id);
        } else {
            self.portfolio.insert(company_id.to_owned(), after);
        }
    }

    /// Result: the audit id; summary: the entry written.
    fn write_audit_entry(
        &mut self,
        deal_id: &str,
        company_name: &str,
        watchlisted: bool,
    ) -> Result<(Value, String), ServiceError> {
        if watchlisted {
            return Err(ServiceError::Rejected(format!(
                "compliance hold on {company_name}: audit trail refuses the deal"
            )));
        }
        let audit_id = format!("audit-{}", self.audit.len() + 1);
        self.audit
            .insert(audit_id.clone(), (format!("deal {deal_id} booked"), false));
        let summary = format!("audit entry {audit_id} for deal {deal_id}");
        Ok((Value::String(audit_id), summary))
    }

    /// Result: the [`RecordWrite`]; summary: the record's new score and version.
    fn upsert_deal_record(
        &mut self,
        record_key: &str,
        company_id: &str,
        score: u32,
    ) -> Result<(Value, String), ServiceError> {
        let previous = self.deal_records.get(record_key).copied();
        let version = previous.map_or(1, |(_, v)| v + 1);
        let result = encode(&RecordWrite {
            record_key: record_key.to_owned(),
            previous,
        })?;
        self.deal_records
            .insert(record_key.to_owned(), (score, version));
        let summary = format!("deal record {company_id} score {score} (v{version})");
        Ok((result, summary))
    }
}

/// Where the office state lives. Each effect is applied exactly once per idempotency key,
/// atomically with its ledger entry.
#[async_trait]
pub trait OfficeStore: Send + Sync + std::fmt::Debug {
    /// Applies `change` unless `caller.key` already has a recorded result, in which case that
    /// result comes back (counted as a duplicate) and nothing changes. A rejected change
    /// records nothing.
    async fn apply_once(&self, caller: &Caller, change: &BookChange)
    -> Result<Value, ServiceError>;

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
    async fn apply_once(
        &self,
        caller: &Caller,
        change: &BookChange,
    ) -> Result<Value, ServiceError> {
        let mut state = self.lock();
        if let Some(previous) = state.ledger.replay(&caller.key) {
            return Ok(previous);
        }
        let (result, summary) = change.apply(&mut state.books)?;
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
