//! The sourcing saga, over a batch of companies: search the directory for the companies that
//! match the criteria, pull each one's data from a Crunchbase-like and a PitchBook-like API
//! (both rate-limited; a bounded fan-out of parallel branches over the companies), score
//! them, create or update their deal records (keyed by company id and search date, so a re-run
//! updates instead of duplicating), start one child deal saga per high score, tell the
//! partners about each high score (a durable sleep spacing the messages), and wait for the
//! deals' outcomes. If the saga compensates after its deals started, the deals are undone too.

use std::time::Duration;

use saga_core::{
    Branch, Outcome, Saga, SagaContext, SagaError, StepContext, content_key, saga_step,
};
use serde::{Deserialize, Serialize};

use crate::deal::{CommitteeVote, DealFlow, DealRequest};
use crate::ledger::BookChange;
use crate::services::{Backoffice, Company, DataSource, ServiceError, applied_by_key};

/// Scores at or above this are "high" and go on to a deal.
pub const HIGH_SCORE: u32 = 60;

/// Branches of one parallel block at once: the market-data APIs are rate-limited.
pub const FAN_OUT: usize = 4;

/// What to source: a batch of companies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourcingRequest {
    /// The companies to evaluate.
    pub company_ids: Vec<String>,
    /// Sectors the fund invests in.
    pub sectors: Vec<String>,
    /// The search date (part of the record key).
    pub search_date: String,
    /// The committee vote each deal of this batch waits for (`None`: deals need no vote).
    pub committee: Option<CommitteeVote>,
    /// The pause between two messages to the partners, in milliseconds.
    pub partner_spacing_ms: u64,
}

/// One company to look up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompanyQuery {
    /// The company to evaluate.
    pub company_id: String,
    /// Sectors the fund invests in.
    pub sectors: Vec<String>,
}

/// One provider's data point about a company.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarketData {
    /// Where it came from.
    pub source: DataSource,
    /// Crunchbase: year-on-year growth; PitchBook: annual recurring revenue, in millions.
    pub value: f64,
}

/// Financial data, combined from both providers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Financials {
    /// Annual recurring revenue, in millions.
    pub arr_musd: f64,
    /// Year-on-year growth.
    pub growth: f64,
}

impl Financials {
    /// The financials in one company's pulls (missing data counts as 0).
    #[must_use]
    pub fn from_pulls(pulls: &[MarketData]) -> Self {
        let of = |source| {
            pulls
                .iter()
                .find(|d| d.source == source)
                .map_or(0.0, |d| d.value)
        };
        Self {
            arr_musd: of(DataSource::PitchBook),
            growth: of(DataSource::Crunchbase),
        }
    }
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

/// How one company of the batch ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompanyOutcome {
    /// The company id.
    pub company_id: String,
    /// Its score.
    pub score: u32,
    /// For a high score: how its deal saga ended (`completed`, `compensated`, `failed`).
    pub deal: Option<String>,
}

/// The sourcing saga's result: the companies that matched the criteria.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourcingOutcome {
    /// Every matched company, in the request's order.
    pub companies: Vec<CompanyOutcome>,
}

/// Looks the company up and checks it against the criteria (read-only).
#[saga_step(
    no_compensation,
    timeout = "250ms",
    retry(max_attempts = 5, initial = "20ms", max = "400ms")
)]
pub async fn search_companies(
    ctx: &StepContext,
    request: CompanyQuery,
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

/// Pulls one provider's data about a company (read-only; 429s carry a retry-after).
#[saga_step(
    no_compensation,
    timeout = "250ms",
    retry(max_attempts = 10, initial = "25ms", max = "1s")
)]
pub async fn pull_market_data(
    ctx: &StepContext,
    input: (Company, DataSource),
) -> Result<MarketData, ServiceError> {
    let (company, source) = input;
    let office = Backoffice::of(ctx)?;
    office.rate_limit(source)?;
    office
        .read(ctx, |_| {
            Ok(MarketData {
                source,
                value: match source {
                    DataSource::Crunchbase => company.growth,
                    DataSource::PitchBook => company.arr_musd,
                },
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

/// Tells the partners about a high score. A sent message cannot be unsent (it has no
/// compensation).
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

/// The sourcing saga over a batch of companies.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sourcing;

impl Saga for Sourcing {
    type Input = SourcingRequest;
    type Output = SourcingOutcome;
    const NAME: &'static str = "sourcing";
    // v2: a batch with parallel pulls and child deal sagas (v1 sourced one company).
    const VERSION: u32 = 2;

    async fn run(
        &self,
        saga: &mut SagaContext,
        request: SourcingRequest,
    ) -> Result<SourcingOutcome, SagaError> {
        let SourcingRequest {
            company_ids,
            sectors,
            search_date,
            committee,
            partner_spacing_ms,
        } = request;
        let queries: Vec<CompanyQuery> = company_ids
            .into_iter()
            .map(|company_id| CompanyQuery {
                company_id,
                sectors: sectors.clone(),
            })
            .collect();
        let found = saga
            .map(FAN_OUT, queries, |q| Branch::new(SearchCompanies, q))
            .await?;
        let companies: Vec<Company> = found.into_iter().flatten().collect();
        if companies.is_empty() {
            return Ok(SourcingOutcome {
                companies: Vec::new(),
            });
        }
        let pulls = companies
            .iter()
            .flat_map(|c| DataSource::ALL.map(|source| (c.clone(), source)));
        let data = saga
            .map(FAN_OUT, pulls, |pull| Branch::new(PullMarketData, pull))
            .await?;
        // Outputs come in item order: each company's pulls are adjacent.
        let inputs = companies
            .iter()
            .zip(data.chunks(DataSource::ALL.len()))
            .map(|(company, pulls)| {
                (
                    company.clone(),
                    Financials::from_pulls(pulls),
                    search_date.clone(),
                )
            });
        let scored = saga
            .map(FAN_OUT, inputs, |input| Branch::new(ScoreCompany, input))
            .await?;
        saga.map(FAN_OUT, scored.clone(), |s| {
            Branch::new(UpsertDealRecord, s)
        })
        .await?;
        let high: Vec<&Scored> = scored.iter().filter(|s| s.score >= HIGH_SCORE).collect();
        let mut deals = Vec::with_capacity(high.len());
        for s in &high {
            deals.push(
                saga.start_child(DealFlow, deal_request(s, committee.clone()))
                    .await?,
            );
        }
        for (i, s) in high.iter().enumerate() {
            if i > 0 {
                // Partners get one message at a time, not a burst.
                saga.sleep(Duration::from_millis(partner_spacing_ms))
                    .await?;
            }
            saga.run(NotifyPartners, (*s).clone()).await?;
        }
        let mut ended = Vec::with_capacity(deals.len());
        for deal in &deals {
            let status = match saga.child_outcome(deal).await? {
                Outcome::Completed(_) => "completed",
                Outcome::Compensated { .. } => "compensated",
                _ => "failed",
            };
            ended.push(status.to_owned());
        }
        let mut ended = ended.into_iter();
        let companies = scored
            .iter()
            .map(|s| CompanyOutcome {
                company_id: s.company.id.clone(),
                score: s.score,
                deal: (s.score >= HIGH_SCORE).then(|| ended.next()).flatten(),
            })
            .collect();
        Ok(SourcingOutcome { companies })
    }
}

/// The deal a high score leads to.
#[must_use]
pub fn deal_request(scored: &Scored, committee: Option<CommitteeVote>) -> DealRequest {
    DealRequest {
        company_id: scored.company.id.clone(),
        company_name: scored.company.name.clone(),
        amount_musd: (f64::from(scored.score) / 10.0).round(),
        score: scored.score,
        watchlisted: scored.company.watchlisted,
        committee,
    }
}
