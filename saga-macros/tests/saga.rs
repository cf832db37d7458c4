//! `#[saga]` generates a working saga type: registered on the engine it runs `#[saga_step]`
//! steps to completion, is compensated after a failure or an abort, and carries its name and
//! version.
#![deny(missing_docs, unreachable_pub, warnings)]
#![warn(clippy::pedantic)]

use std::sync::{Arc, Mutex, PoisonError};

use saga_core::{
    CompensationReason, Engine, EngineError, MemoryStore, Saga, SagaStatus, StartOptions,
};

/// Steps and workflows, public and documented under `deny(missing_docs)`.
// The fns stand in for real calls, which would await; what the generated code awaits is
// still checked.
#[allow(clippy::unused_async)]
pub mod deal {
    use super::{Arc, Mutex, PoisonError};
    use saga_core::{Classify, SagaContext, SagaError, StepContext, saga, saga_step};
    use serde::{Deserialize, Serialize};

    /// What each step did, in order, for the test to inspect.
    #[derive(Debug, Default)]
    pub struct Ledger(Mutex<Vec<String>>);

    impl Ledger {
        /// Records one entry.
        pub fn record(&self, entry: impl Into<String>) {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(entry.into());
        }

        /// Everything recorded so far.
        pub fn entries(&self) -> Vec<String> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    /// The CRM's errors.
    #[derive(Debug, thiserror::Error, Classify)]
    pub enum CrmError {
        /// The ledger is not registered.
        #[error(transparent)]
        #[classify(delegate)]
        Missing(#[from] saga_core::MissingResource),
        /// Never worth retrying.
        #[error("rejected: {0}")]
        #[classify(permanent)]
        Rejected(String),
    }

    fn ledger(ctx: &StepContext) -> Result<&Arc<Ledger>, CrmError> {
        Ok(ctx.resource::<Arc<Ledger>>()?)
    }

    /// A deal to open.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct DealRequest {
        /// Who the deal is with.
        pub client: String,
        /// The budget to reserve for it.
        pub amount: u64,
    }

    /// What the deal flow produced.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct DealOutcome {
        /// The CRM's deal id.
        pub deal: u64,
        /// The budget reservation.
        pub reservation: u64,
    }

    /// Reserves the budget.
    ///
    /// # Errors
    /// When the ledger is missing.
    #[saga_step(compensate = release_budget)]
    pub async fn reserve_budget(ctx: &StepContext, input: u64) -> Result<u64, CrmError> {
        ledger(ctx)?.record(format!("reserve_budget {input}"));
        Ok(input + 1000)
    }

    async fn release_budget(
        ctx: &StepContext,
        _input: u64,
        reservation: u64,
    ) -> Result<(), CrmError> {
        ledger(ctx)?.record(format!("release_budget {reservation}"));
        Ok(())
    }

    /// Opens the deal in the CRM.
    ///
    /// # Errors
    /// When the ledger is missing.
    #[saga_step(compensate = delete_deal)]
    pub async fn create_deal(ctx: &StepContext, input: String) -> Result<u64, CrmError> {
        ledger(ctx)?.record(format!("create_deal {input}"));
        Ok(7)
    }

    async fn delete_deal(ctx: &StepContext, _input: String, deal: u64) -> Result<(), CrmError> {
        ledger(ctx)?.record(format!("delete_deal {deal}"));
        Ok(())
    }

    /// Reads the client's credit line: nothing to undo.
    ///
    /// # Errors
    /// When the ledger is missing.
    #[saga_step(no_compensation)]
    pub async fn check_credit(ctx: &StepContext, input: String) -> Result<bool, CrmError> {
        ledger(ctx)?.record(format!("check_credit {input}"));
        Ok(input != "overdrawn")
    }

    /// Tells the committee; refused for good when the client is flagged.
    ///
    /// # Errors
    /// When the ledger is missing, or the client is flagged.
    #[saga_step(no_compensation)]
    pub async fn notify_committee(ctx: &StepContext, input: String) -> Result<(), CrmError> {
        let ledger = ledger(ctx)?;
        if input == "flagged" {
            ledger.record("notify_committee refused");
            return Err(CrmError::Rejected(input));
        }
        ledger.record(format!("notify_committee {input}"));
        Ok(())
    }

    /// Opens a deal: reserves its budget, creates it, checks the client's credit and tells the
    /// committee.
    ///
    /// # Errors
    /// The saga errors of its steps, and an abort when the credit check fails.
    #[saga(name = "deal_flow", version = 2)]
    pub async fn deal_flow(
        saga: &mut SagaContext,
        input: DealRequest,
    ) -> Result<DealOutcome, SagaError> {
        let reservation = saga.run(ReserveBudget, input.amount).await?;
        let deal = saga.run(CreateDeal, input.client.clone()).await?;
        // The workflow fn of another saga stays callable, here as part of this one.
        if !credit_check(saga, (input.client.clone(), "new deal".to_owned())).await? {
            return Err(SagaError::Aborted(format!(
                "client {} has no credit",
                input.client
            )));
        }
        saga.run(NotifyCommittee, input.client).await?;
        Ok(DealOutcome { deal, reservation })
    }

    /// Checks a client's credit, with the default name and version and a pattern for its
    /// input.
    ///
    /// # Errors
    /// The saga errors of its step.
    #[saga]
    pub async fn credit_check(
        saga: &mut SagaContext,
        (client, _reason): (String, String),
    ) -> Result<bool, SagaError> {
        saga.run(CheckCredit, client).await
    }

    /// Only a name; the saga type is as visible as its fn.
    #[saga(name = "audit")]
    pub(crate) async fn audit_trail(_saga: &mut SagaContext, input: u32) -> Result<u32, SagaError> {
        Ok(input)
    }

    // The attribute comes first, so the macro sees the `cfg`: were it not copied to the saga
    // type, that type would call a fn that does not exist and this file would not compile.
    /// Never compiled.
    #[saga]
    #[cfg(any())]
    pub async fn never_compiled(_saga: &mut SagaContext, input: u32) -> Result<u32, SagaError> {
        Ok(input)
    }
}

use deal::*;

fn engine(ledger: &Arc<Ledger>) -> Result<Engine, EngineError> {
    Engine::builder(MemoryStore::new())
        .register(DealFlow)
        .register(CreditCheck)
        .resource(Arc::clone(ledger))
        .build()
}

fn request(client: &str) -> DealRequest {
    DealRequest {
        client: client.to_owned(),
        amount: 5,
    }
}

#[test]
fn name_and_version() {
    assert_eq!(DealFlow::NAME, "deal_flow");
    assert_eq!(DealFlow::VERSION, 2);
    // The defaults: the fn's name, version 1.
    assert_eq!(CreditCheck::NAME, "credit_check");
    assert_eq!(CreditCheck::VERSION, 1);
    assert_eq!(AuditTrail::NAME, "audit");
    assert_eq!(AuditTrail::VERSION, 1);
    // A unit struct deriving `Clone, Copy, Debug, Default`.
    let flow = DealFlow;
    let copied = flow;
    assert_eq!(
        format!("{:?}", (flow, copied, DealFlow)),
        "(DealFlow, DealFlow, DealFlow)"
    );
}

#[tokio::test]
async fn runs_to_completion() -> Result<(), EngineError> {
    let ledger = Arc::new(Ledger::default());
    let engine = engine(&ledger)?;
    let outcome = engine
        .execute::<DealFlow>(&request("acme"), StartOptions::key("deal-acme"))
        .await?;
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(
        outcome.output::<DealOutcome>()?,
        Some(DealOutcome {
            deal: 7,
            reservation: 1005
        })
    );
    assert_eq!(
        ledger.entries(),
        [
            "reserve_budget 5",
            "create_deal acme",
            "check_credit acme",
            "notify_committee acme",
        ]
    );
    // Stored under the name and version the attribute gave.
    let state = engine.state(outcome.id).await?;
    assert_eq!(state.saga_type, "deal_flow");
    assert_eq!(state.version, 2);
    Ok(())
}

#[tokio::test]
async fn a_failed_step_compensates_in_reverse_order() -> Result<(), EngineError> {
    let ledger = Arc::new(Ledger::default());
    let engine = engine(&ledger)?;
    let outcome = engine
        .execute::<DealFlow>(&request("flagged"), StartOptions::key("deal-flagged"))
        .await?;
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(matches!(
        outcome.compensation_reason,
        Some(CompensationReason::StepFailed { ref step, .. }) if step == "notify_committee"
    ));
    assert_eq!(
        ledger.entries(),
        [
            "reserve_budget 5",
            "create_deal flagged",
            "check_credit flagged",
            "notify_committee refused",
            "delete_deal 7",
            "release_budget 1005",
        ]
    );
    Ok(())
}

#[tokio::test]
async fn an_abort_by_the_workflow_compensates() -> Result<(), EngineError> {
    let ledger = Arc::new(Ledger::default());
    let engine = engine(&ledger)?;
    let outcome = engine
        .execute::<DealFlow>(&request("overdrawn"), StartOptions::key("deal-overdrawn"))
        .await?;
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(matches!(
        outcome.compensation_reason,
        Some(CompensationReason::Aborted { ref message })
            if message.ends_with("client overdrawn has no credit")
    ));
    assert_eq!(
        ledger.entries(),
        [
            "reserve_budget 5",
            "create_deal overdrawn",
            "check_credit overdrawn",
            "delete_deal 7",
            "release_budget 1005",
        ]
    );
    Ok(())
}

#[tokio::test]
async fn default_name_and_version_are_stored() -> Result<(), EngineError> {
    let ledger = Arc::new(Ledger::default());
    let engine = engine(&ledger)?;
    let input = ("acme".to_owned(), "renewal".to_owned());
    let outcome = engine
        .execute::<CreditCheck>(&input, StartOptions::key("credit-acme"))
        .await?;
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.output::<bool>()?, Some(true));
    let state = engine.state(outcome.id).await?;
    assert_eq!(
        (state.saga_type.as_str(), state.version),
        ("credit_check", 1)
    );
    assert_eq!(ledger.entries(), ["check_credit acme"]);
    Ok(())
}
