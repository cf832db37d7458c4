//! The deal saga: create the deal in the CRM → update the portfolio valuation → notify the
//! investment committee → write the audit-trail entry. Compensations, run in reverse: void the
//! audit entry, retract the committee notice, revert the portfolio, delete the deal.

use saga_core::{Saga, SagaContext, SagaError, StepContext, saga_step};
use serde::{Deserialize, Serialize};

use crate::ledger::BookChange;
use crate::services::{Backoffice, ServiceError, applied_by_key};

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
#[saga_step(compensate = delete_deal, reconcile = applied_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
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
#[saga_step(compensate = revert_portfolio, reconcile = applied_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
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
#[saga_step(compensate = send_retraction, reconcile = applied_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
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
#[saga_step(compensate = void_audit_entry, reconcile = applied_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
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

/// The deal saga.
#[derive(Clone, Copy, Debug, Default)]
pub struct DealFlow;

#[saga_core::async_trait]
impl Saga for DealFlow {
    type Input = DealRequest;
    type Output = DealOutcome;
    const NAME: &'static str = "deal_flow";

    async fn run(
        &self,
        saga: &mut SagaContext,
        request: DealRequest,
    ) -> Result<DealOutcome, SagaError> {
        let deal = saga.run(CreateDeal, request).await?;
        saga.run(UpdatePortfolio, deal.clone()).await?;
        saga.run(NotifyCommittee, deal.clone()).await?;
        let audit_id = saga.run(WriteAuditEntry, deal.clone()).await?;
        Ok(DealOutcome {
            deal_id: deal.deal_id,
            audit_id,
        })
    }
}
