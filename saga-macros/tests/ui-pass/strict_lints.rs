//! Generated code compiles cleanly in a crate with strict lints.
#![deny(
    warnings,
    missing_docs,
    unreachable_pub,
    rust_2018_idioms,
    unused_qualifications
)]
#![deny(missing_debug_implementations, unused_results, trivial_casts)]

/// Steps of the deal flow.
pub mod deal {
    use std::time::Duration;

    use saga_core::{Classify, HttpStatus, Reconciled, StepContext};

    /// The CRM's errors.
    #[derive(Debug, Classify)]
    pub enum CrmError {
        /// Busy.
        #[classify(transient(retry_after = 0))]
        Busy(Option<Duration>),
        /// Whatever the status says.
        #[classify(delegate)]
        Http(HttpStatus),
        /// Rejected.
        #[classify(permanent)]
        Rejected,
    }

    impl std::fmt::Display for CrmError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("crm error")
        }
    }

    /// Opens a deal.
    #[saga_core::saga_step(
        compensate = delete_deal,
        compensate_on_failure,
        reconcile = find_deal,
        reconcile_compensation = deal_deleted,
        name = "open_deal",
        timeout = "10s",
        retry(max_attempts = 5, initial = "200ms", max = "5s", multiplier = 2.0, jitter = "full"),
        compensate_retry(max_attempts = 20, max_elapsed = "1h")
    )]
    pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<u64, CrmError> {
        Ok(input.len() as u64)
    }

    async fn delete_deal(
        _ctx: &StepContext,
        _input: String,
        _deal: Option<u64>,
    ) -> Result<(), CrmError> {
        Ok(())
    }

    async fn find_deal(_ctx: &StepContext, _input: &String) -> Result<Reconciled<u64>, CrmError> {
        Ok(Reconciled::Unknown)
    }

    async fn deal_deleted(
        _ctx: &StepContext,
        _input: &String,
        _deal: Option<&u64>,
    ) -> Result<Reconciled<()>, CrmError> {
        Ok(Reconciled::Unknown)
    }

    /// Sends the invitation.
    #[saga_core::saga_step(pivot, timeout = "none")]
    pub async fn notify(_ctx: &StepContext, _input: u64) -> Result<(), CrmError> {
        Ok(())
    }
}

fn main() {
    let _steps = (deal::CreateDeal, deal::Notify);
}
