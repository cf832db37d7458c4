//! The deal saga: create the deal in the CRM → update the portfolio valuation → notify the
//! investment committee → (when the request asks for a committee vote) wait for the
//! committee's `committee_approval` signal → write the audit-trail entry. A rejection or no
//! answer in time aborts the saga. Compensations, run in reverse: void the audit entry,
//! retract the committee notice, revert the portfolio, delete the deal.
//!
//! Every step has two reconciliation checks that ask the back office about an idempotency
//! key: `applied_by_key` for the forward effect, `undone_by_key` for its compensation (so an
//! undo applied on an attempt that timed out still ends the saga compensated, even when the
//! next attempts are refused).

use std::time::Duration;

use saga_core::{Saga, SagaContext, SagaError, SignalSpec, StepContext, saga_step};
use serde::{Deserialize, Serialize};

use crate::ledger::BookChange;
use crate::services::{Backoffice, ServiceError, applied_by_key, undone_by_key};

/// A deal to book.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DealRequest {
    /// Company id.
    pub company_id: String,
    /// Company name.
    pub company_name: String,
    /// Amount to invest, in millions.
    pub amount_musd: f64,
    /// The sourcing score that led here.
    pub score: u32,
    /// Under a compliance hold.
    pub watchlisted: bool,
    /// The investment committee must approve the deal (by the [`COMMITTEE_APPROVAL`]
    /// signal) before it is booked for good. `None`: no vote (deals submitted by the load
    /// tool and the HTTP API without this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committee: Option<CommitteeVote>,
}

/// The signal the committee answers a deal with: a [`CommitteeDecision`].
pub const COMMITTEE_APPROVAL: &str = "committee_approval";

/// How the committee votes on a deal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitteeVote {
    /// How long the deal waits for the committee's decision before it is withdrawn, in
    /// milliseconds (counted from the first time the saga waits).
    pub timeout_ms: u64,
}

/// The committee's answer, the payload of the [`COMMITTEE_APPROVAL`] signal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitteeDecision {
    /// `true`: go ahead; `false`: the deal is withdrawn (the saga compensates).
    pub approved: bool,
    /// Who decided.
    pub partner: String,
    /// Why, for the timeline.
    #[serde(default)]
    pub note: String,
}

/// A deal in the CRM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deal {
    /// CRM id.
    pub deal_id: String,
    /// The request.
    pub request: DealRequest,
}

/// The portfolio change, for reverting it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortfolioChange {
    /// Amount before.
    pub before_musd: f64,
    /// Amount after.
    pub after_musd: f64,
}

/// The saga's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DealOutcome {
    /// CRM id.
    pub deal_id: String,
    /// Audit entry id.
    pub audit_id: String,
}

/// Creates the deal in the CRM (idempotent by the step's key: the deal id derives from it).
#[saga_step(compensate = delete_deal, reconcile = applied_by_key, reconcile_compensation = undone_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
pub async fn create_deal(ctx: &StepContext, request: DealRequest) -> Result<Deal, ServiceError> {
    let office = Backoffice::of(ctx)?;
    // The key is a UUID string (ASCII, 36 characters), so its first 8 bytes are a char boundary.
    let deal_id = format!(
        "deal-{}",
        ctx.idempotency_key().get(..8).unwrap_or_default()
    );
    let change = BookChange::CreateDeal {
        summary: format!("CRM deal {deal_id} for {}", request.company_name),
        company_id: request.company_id.clone(),
        amount_musd: request.amount_musd,
        result: serde_json::to_value(Deal {
            deal_id: deal_id.clone(),
            request,
        })
        .map_err(|e| ServiceError::Corrupt(e.to_string()))?,
        deal_id,
    };
    office.effect(ctx, change).await
}

/// Deletes the deal from the CRM.
pub async fn delete_deal(
    ctx: &StepContext,
    request: DealRequest,
    deal: Deal,
) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    let change = BookChange::DeleteDeal {
        summary: format!(
            "CRM deal {} for {} deleted",
            deal.deal_id, request.company_name
        ),
        deal_id: deal.deal_id,
    };
    office.effect(ctx, change).await
}

/// Adds the deal to the portfolio book.
#[saga_step(compensate = revert_portfolio, reconcile = applied_by_key, reconcile_compensation = undone_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
pub async fn update_portfolio(
    ctx: &StepContext,
    deal: Deal,
) -> Result<PortfolioChange, ServiceError> {
    let office = Backoffice::of(ctx)?;
    let change = BookChange::AddToPortfolio {
        summary: format!(
            "portfolio {} +{}M",
            deal.request.company_name, deal.request.amount_musd
        ),
        company_id: deal.request.company_id,
        amount_musd: deal.request.amount_musd,
    };
    office.effect(ctx, change).await
}

/// Takes the deal back out of the portfolio book.
pub async fn revert_portfolio(
    ctx: &StepContext,
    deal: Deal,
    change: PortfolioChange,
) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    let change = BookChange::TakeFromPortfolio {
        summary: format!("portfolio {} reverted", deal.request.company_name),
        company_id: deal.request.company_id,
        amount_musd: change.after_musd - change.before_musd,
    };
    office.effect(ctx, change).await
}

/// Notifies the investment committee.
#[saga_step(compensate = send_retraction, reconcile = applied_by_key, reconcile_compensation = undone_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
pub async fn notify_committee(ctx: &StepContext, deal: Deal) -> Result<usize, ServiceError> {
    let office = Backoffice::of(ctx)?;
    let text = format!(
        "IC: new deal {} — {} ({}M)",
        deal.deal_id, deal.request.company_name, deal.request.amount_musd
    );
    office
        .effect(ctx, BookChange::NotifyCommittee { text })
        .await
}

/// Sends the committee a retraction of the notice.
pub async fn send_retraction(
    ctx: &StepContext,
    deal: Deal,
    message: usize,
) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    let text = format!("IC: RETRACTED notice #{message} for deal {}", deal.deal_id);
    office
        .effect(ctx, BookChange::RetractCommitteeNotice { text })
        .await
}

/// Writes the audit-trail entry. Compliance refuses watchlisted companies (permanent).
#[saga_step(compensate = void_audit_entry, reconcile = applied_by_key, reconcile_compensation = undone_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
pub async fn write_audit_entry(ctx: &StepContext, deal: Deal) -> Result<String, ServiceError> {
    let office = Backoffice::of(ctx)?;
    let change = BookChange::WriteAuditEntry {
        deal_id: deal.deal_id,
        company_name: deal.request.company_name,
        watchlisted: deal.request.watchlisted,
    };
    office.effect(ctx, change).await
}

/// Marks the audit entry void (audit trails are never deleted).
pub async fn void_audit_entry(
    ctx: &StepContext,
    deal: Deal,
    audit_id: String,
) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    let change = BookChange::VoidAuditEntry {
        summary: format!("audit entry {audit_id} for deal {} voided", deal.deal_id),
        audit_id,
    };
    office.effect(ctx, change).await
}

/// The deal saga: create the deal, update the portfolio, notify the committee, wait for its
/// approval when the request asks for a vote, write the audit entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct DealFlow;

impl Saga for DealFlow {
    type Input = DealRequest;
    type Output = DealOutcome;
    const NAME: &'static str = "deal_flow";
    const VERSION: u32 = 1;
    const SIGNALS: &'static [SignalSpec] =
        &[SignalSpec::of::<CommitteeDecision>(COMMITTEE_APPROVAL)];

    async fn run(
        &self,
        saga: &mut SagaContext,
        request: DealRequest,
    ) -> Result<DealOutcome, SagaError> {
        let vote = request.committee.clone();
        let deal = saga.run(CreateDeal, request).await?;
        saga.run(UpdatePortfolio, deal.clone()).await?;
        saga.run(NotifyCommittee, deal.clone()).await?;
        // Requests without a vote keep the journal of the saga before votes existed.
        if let Some(vote) = vote {
            let timeout = Duration::from_millis(vote.timeout_ms);
            match saga
                .wait_for_signal::<CommitteeDecision>(COMMITTEE_APPROVAL, timeout)
                .await?
            {
                Some(decision) if decision.approved => {}
                Some(decision) => {
                    return Err(SagaError::Aborted(format!(
                        "the investment committee rejected deal {} ({}: {})",
                        deal.deal_id, decision.partner, decision.note
                    )));
                }
                None => {
                    return Err(SagaError::Aborted(format!(
                        "no committee decision on deal {} within {timeout:?}: deal withdrawn",
                        deal.deal_id
                    )));
                }
            }
        }
        let audit_id = saga.run(WriteAuditEntry, deal.clone()).await?;
        Ok(DealOutcome {
            deal_id: deal.deal_id,
            audit_id,
        })
    }
}

#[cfg(test)]
mod tests {
    // Tests: a failed unwrap is a failed test, with the error in the message.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;
    use saga_core::{Engine, EventKind, HttpStatus, MemoryStore, Phase, SagaStatus, StartOptions};
    use serde_json::Value;

    use super::*;
    use crate::ledger::{MemoryOffice, OfficeState, OfficeStore};
    use crate::services::Directory;
    use crate::world::{Caller, Faults, World};

    /// The back office's books in memory, with a CRM whose first deal deletion goes through
    /// but never answers (the step times out), and which refuses every later call with 503.
    #[derive(Debug, Default)]
    struct FlakyCrm {
        inner: MemoryOffice,
        deletions: AtomicU32,
    }

    #[async_trait]
    impl OfficeStore for FlakyCrm {
        async fn apply_once(
            &self,
            caller: &Caller,
            change: &BookChange,
        ) -> Result<Value, ServiceError> {
            if !matches!(change, BookChange::DeleteDeal { .. }) {
                return self.inner.apply_once(caller, change).await;
            }
            if self.deletions.fetch_add(1, Ordering::SeqCst) == 0 {
                self.inner.apply_once(caller, change).await?;
                std::future::pending::<()>().await;
            }
            Err(ServiceError::Http(HttpStatus::new(503)))
        }

        async fn recorded(&self, key: &str) -> Result<Option<Value>, ServiceError> {
            self.inner.recorded(key).await
        }

        async fn snapshot(&self) -> Result<OfficeState, ServiceError> {
            self.inner.snapshot().await
        }
    }

    /// A deal deletion applied on an attempt that timed out is found by the compensation's
    /// check (the back office's record of the undo's key): the saga ends compensated, and
    /// the deal was deleted once.
    #[tokio::test]
    async fn a_deal_deletion_that_timed_out_is_reconciled() {
        let world = World::new(Faults {
            seed: 7,
            rate: 0.0,
            fail_at: None,
            throttle: None,
        });
        let crm = Arc::new(FlakyCrm::default());
        let office = Backoffice::new(world, Directory::generate(7, 3), crm.clone(), 100);
        let engine = Engine::builder(MemoryStore::new())
            .register(DealFlow)
            .resource(office)
            .build()
            .unwrap();
        let request = DealRequest {
            company_id: "c-002".into(),
            company_name: "Quanta Ledger 1".into(),
            amount_musd: 5.0,
            score: 90,
            watchlisted: true,
            committee: None,
        };
        let outcome = engine
            .execute::<DealFlow>(&request, StartOptions::key("watchlisted"))
            .await
            .unwrap();

        assert_eq!(
            outcome.status,
            SagaStatus::Compensated,
            "{:?}",
            outcome.failure
        );
        assert_eq!(crm.deletions.load(Ordering::SeqCst), 1, "not re-run");
        let state = crm.snapshot().await.unwrap();
        assert!(state.books.crm_deals.is_empty(), "the deal is gone");
        let deletions = state
            .ledger
            .entries
            .iter()
            .filter(|e| e.step == "create_deal" && e.phase == Phase::Compensate)
            .count();
        assert_eq!(deletions, 1);
        let history = engine.history(outcome.id).await.unwrap();
        let reconciled: Vec<u32> = history
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::StepCompensated {
                    position,
                    reconciled: true,
                    ..
                } => Some(*position),
                _ => None,
            })
            .collect();
        assert_eq!(reconciled, [0], "the CRM deletion was reconciled");
    }
}
