//! The deal saga: create the deal in the CRM → update the portfolio valuation → notify the
//! investment committee → write the audit-trail entry. Compensations, run in reverse: void the
//! audit entry, retract the committee notice, revert the portfolio, delete the deal.

use saga_core::{Saga, SagaContext, SagaError, StepContext, saga_step};
use serde::{Deserialize, Serialize};

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
    office
        .effect(ctx, move |books| {
            books.crm_deals.insert(
                deal_id.clone(),
                (request.company_id.clone(), request.amount_musd),
            );
            let summary = format!("CRM deal {deal_id} for {}", request.company_name);
            Ok((Deal { deal_id, request }, summary))
        })
        .await
}

/// Deletes the deal from the CRM.
pub async fn delete_deal(
    ctx: &StepContext,
    request: DealRequest,
    deal: Deal,
) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    office
        .effect(ctx, move |books| {
            books.crm_deals.remove(&deal.deal_id);
            Ok((
                (),
                format!(
                    "CRM deal {} for {} deleted",
                    deal.deal_id, request.company_name
                ),
            ))
        })
        .await
}

/// Adds the deal to the portfolio book.
#[saga_step(compensate = revert_portfolio, reconcile = applied_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
pub async fn update_portfolio(
    ctx: &StepContext,
    deal: Deal,
) -> Result<PortfolioChange, ServiceError> {
    let office = Backoffice::of(ctx)?;
    office
        .effect(ctx, move |books| {
            let entry = books
                .portfolio
                .entry(deal.request.company_id.clone())
                .or_default();
            let before = *entry;
            *entry += deal.request.amount_musd;
            let change = PortfolioChange {
                before_musd: before,
                after_musd: *entry,
            };
            Ok((
                change,
                format!(
                    "portfolio {} +{}M",
                    deal.request.company_name, deal.request.amount_musd
                ),
            ))
        })
        .await
}

/// Takes the deal back out of the portfolio book.
pub async fn revert_portfolio(
    ctx: &StepContext,
    deal: Deal,
    change: PortfolioChange,
) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    office
        .effect(ctx, move |books| {
            let entry = books
                .portfolio
                .entry(deal.request.company_id.clone())
                .or_default();
            *entry -= change.after_musd - change.before_musd;
            if entry.abs() < 1e-9 {
                books.portfolio.remove(&deal.request.company_id);
            }
            Ok((
                (),
                format!("portfolio {} reverted", deal.request.company_name),
            ))
        })
        .await
}

/// Notifies the investment committee.
#[saga_step(compensate = send_retraction, reconcile = applied_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
pub async fn notify_committee(ctx: &StepContext, deal: Deal) -> Result<usize, ServiceError> {
    let office = Backoffice::of(ctx)?;
    office
        .effect(ctx, move |books| {
            let text = format!(
                "IC: new deal {} — {} ({}M)",
                deal.deal_id, deal.request.company_name, deal.request.amount_musd
            );
            books.committee.push(text.clone());
            Ok((books.committee.len() - 1, text))
        })
        .await
}

/// Sends the committee a retraction of the notice.
pub async fn send_retraction(
    ctx: &StepContext,
    deal: Deal,
    message: usize,
) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    office
        .effect(ctx, move |books| {
            let text = format!("IC: RETRACTED notice #{message} for deal {}", deal.deal_id);
            books.committee.push(text.clone());
            Ok(((), text))
        })
        .await
}

/// Writes the audit-trail entry. Compliance refuses watchlisted companies (permanent).
#[saga_step(compensate = void_audit_entry, reconcile = applied_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
pub async fn write_audit_entry(ctx: &StepContext, deal: Deal) -> Result<String, ServiceError> {
    let office = Backoffice::of(ctx)?;
    office
        .effect(ctx, move |books| {
            if deal.request.watchlisted {
                return Err(ServiceError::Rejected(format!(
                    "compliance hold on {}: audit trail refuses the deal",
                    deal.request.company_name
                )));
            }
            let audit_id = format!("audit-{}", books.audit.len() + 1);
            books.audit.insert(
                audit_id.clone(),
                (format!("deal {} booked", deal.deal_id), false),
            );
            Ok((
                audit_id.clone(),
                format!("audit entry {audit_id} for deal {}", deal.deal_id),
            ))
        })
        .await
}

/// Marks the audit entry void (audit trails are never deleted).
pub async fn void_audit_entry(
    ctx: &StepContext,
    deal: Deal,
    audit_id: String,
) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    office
        .effect(ctx, move |books| {
            if let Some(entry) = books.audit.get_mut(&audit_id) {
                entry.1 = true;
            }
            Ok((
                (),
                format!("audit entry {audit_id} for deal {} voided", deal.deal_id),
            ))
        })
        .await
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
