//! The sourcing saga: search the directory for a company matching the criteria, pull its
//! financials from a rate-limited third-party API, score it, create or update its deal record
//! (keyed by company id and search date, so a re-run updates instead of duplicating), and
//! notify the partners of a high score.

use saga_core::{SagaContext, SagaError, StepContext, content_key, saga_step};
use serde::{Deserialize, Serialize};

use crate::ledger::BookChange;
use crate::services::{Backoffice, Company, ServiceError, applied_by_key};

/// Scores at or above this are "high" and go on to a deal.
pub const HIGH_SCORE: u32 = 60;

/// What to source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourcingRequest {
    /// The company to evaluate.
    pub company_id: String,
    /// Sectors the fund invests in.
    pub sectors: Vec<String>,
    /// The search date (part of the record key).
    pub search_date: String,
}

/// Financial data from the third-party API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Financials {
    /// Annual recurring revenue, in millions.
    pub arr_musd: f64,
    /// Year-on-year growth.
    pub growth: f64,
}

/// A score with its inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// The company.
    pub company: Company,
    /// 0..=100.
    pub score: u32,
    /// The search date.
    pub search_date: String,
}

/// The deal record write and what it replaced, so that it can be undone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordWrite {
    /// Content key: company id + search date.
    pub record_key: String,
    /// The score and version before this write (`None`: the record is new).
    pub previous: Option<(u32, u32)>,
}

/// The sourcing saga's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourcingOutcome {
    /// The company, when it matched the criteria.
    pub company: Option<Company>,
    /// Its score.
    pub score: u32,
    /// `score >= HIGH_SCORE`.
    pub high: bool,
}

/// Looks the company up and checks it against the criteria (read-only).
#[saga_step(
    no_compensation,
    timeout = "250ms",
    retry(max_attempts = 5, initial = "20ms", max = "400ms")
)]
pub async fn search_companies(
    ctx: &StepContext,
    request: SourcingRequest,
) -> Result<Option<Company>, ServiceError> {
    let office = Backoffice::of(ctx)?;
    office
        .read(ctx, |office| {
            Ok(office
                .directory
                .get(&request.company_id)
                .filter(|company| request.sectors.contains(&company.sector))
                .cloned())
        })
        .await
}

/// Pulls financials from the rate-limited data API (read-only; 429s carry a retry-after).
#[saga_step(
    no_compensation,
    timeout = "250ms",
    retry(max_attempts = 10, initial = "25ms", max = "1s")
)]
pub async fn pull_financials(
    ctx: &StepContext,
    company: Company,
) -> Result<Financials, ServiceError> {
    let office = Backoffice::of(ctx)?;
    office.rate_limit()?;
    office
        .read(ctx, |_| {
            Ok(Financials {
                arr_musd: company.arr_musd,
                growth: company.growth,
            })
        })
        .await
}

/// Scores a company from its financials (pure computation).
#[saga_step(no_compensation, timeout = "100ms", retry(max_attempts = 2))]
pub async fn score_company(
    ctx: &StepContext,
    input: (Company, Financials, String),
) -> Result<Scored, ServiceError> {
    let _ = ctx;
    let (company, financials, search_date) = input;
    let raw = financials.arr_musd.min(40.0) + financials.growth.min(1.5) * 40.0;
    let score = raw.round().clamp(0.0, 100.0) as u32;
    Ok(Scored {
        company,
        score,
        search_date,
    })
}

/// Creates or updates the deal record keyed by company id + search date.
#[saga_step(compensate = restore_deal_record, reconcile = applied_by_key, timeout = "250ms", retry(max_attempts = 5, initial = "20ms", max = "400ms"))]
pub async fn upsert_deal_record(
    ctx: &StepContext,
    scored: Scored,
) -> Result<RecordWrite, ServiceError> {
    let office = Backoffice::of(ctx)?;
    let change = BookChange::UpsertDealRecord {
        record_key: content_key(&["deal-record", &scored.company.id, &scored.search_date]),
        company_id: scored.company.id,
        score: scored.score,
    };
    office.effect(ctx, change).await
}

/// Undoes a deal record write: restores the previous version or removes a new record.
pub async fn restore_deal_record(
    ctx: &StepContext,
    scored: Scored,
    write: RecordWrite,
) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    let change = BookChange::RestoreDealRecord {
        record_key: write.record_key,
        previous: write.previous,
        summary: format!("deal record {} restored", scored.company.id),
    };
    office.effect(ctx, change).await
}

/// Tells the partners about a high score. A sent message cannot be unsent; the step is the
/// saga's last, so nothing after it can fail.
#[saga_step(
    no_compensation,
    timeout = "250ms",
    retry(max_attempts = 6, initial = "20ms", max = "400ms")
)]
pub async fn notify_partners(ctx: &StepContext, scored: Scored) -> Result<(), ServiceError> {
    let office = Backoffice::of(ctx)?;
    let text = format!(
        "{} scored {} — worth a look",
        scored.company.name, scored.score
    );
    office
        .effect(ctx, BookChange::MessagePartners { text })
        .await
}

/// The sourcing saga: search, pull financials, score.
#[saga_core::saga(name = "sourcing", version = 1)]
pub async fn sourcing(
    saga: &mut SagaContext,
    request: SourcingRequest,
) -> Result<SourcingOutcome, SagaError> {
    let search_date = request.search_date.clone();
    let Some(company) = saga.run(SearchCompanies, request).await? else {
        return Ok(SourcingOutcome {
            company: None,
            score: 0,
            high: false,
        });
    };
    let financials = saga.run(PullFinancials, company.clone()).await?;
    let scored = saga
        .run(ScoreCompany, (company.clone(), financials, search_date))
        .await?;
    saga.run(UpsertDealRecord, scored.clone()).await?;
    let high = scored.score >= HIGH_SCORE;
    if high {
        saga.run(NotifyPartners, scored.clone()).await?;
    }
    Ok(SourcingOutcome {
        company: Some(company),
        score: scored.score,
        high,
    })
}
