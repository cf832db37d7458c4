//! `#[saga_step]` and `#[derive(Classify)]` generate working code: every option reaches the
//! `Step` impl, and a saga built from generated steps compensates in reverse order.
#![deny(missing_docs, unreachable_pub, warnings)]

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use saga_core::{
    Classify, Compensation, Engine, ErrorClass, HttpStatus, Jitter, MemoryStore, Reconciled,
    Resources, RetryPolicy, Saga, SagaContext, SagaError, SagaStatus, StartOptions, Step,
    StepContext,
};

/// Steps and errors, public and documented under `deny(missing_docs)`.
pub mod steps {
    use super::*;
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
        /// Try again later.
        #[error("crm is busy")]
        #[classify(transient)]
        Busy,
        /// Try again after the hint.
        #[error("rate limited")]
        #[classify(transient(retry_after = wait))]
        RateLimited {
            /// The server's hint.
            wait: Option<Duration>,
        },
        /// Try again after the hint, in a tuple variant.
        #[error("throttled")]
        #[classify(transient(retry_after = 1))]
        Throttled(u32, Option<Duration>),
        /// Whatever the status says.
        #[error("crm answered {0}")]
        #[classify(delegate)]
        Http(HttpStatus),
        /// Whatever the missing resource says (permanent).
        #[error(transparent)]
        #[classify(delegate)]
        Missing {
            /// The lookup failure.
            source: saga_core::MissingResource,
        },
        /// Never worth retrying.
        #[error("rejected: {0}")]
        #[classify(permanent)]
        Rejected(String),
    }

    /// An error struct.
    #[derive(Debug, thiserror::Error, Classify)]
    #[error("audit store refused the entry")]
    #[classify(permanent)]
    pub struct AuditRefused;

    /// An error struct with a retry-after hint.
    #[derive(Debug, thiserror::Error, Classify)]
    #[error("slow down")]
    #[classify(transient(retry_after = 0))]
    pub struct SlowDown(pub Option<Duration>);

    /// A generic wrapper that delegates.
    #[derive(Debug, thiserror::Error, Classify)]
    #[error("wrapped: {0}")]
    #[classify(delegate)]
    pub struct Wrapped<E: std::error::Error>(pub E);

    /// An error enum with no variants.
    #[derive(Debug, thiserror::Error, Classify)]
    pub enum Never {}

    /// A deal to open.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct NewDeal {
        /// Who the deal is with.
        pub client: String,
    }

    /// An opened deal.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Deal {
        /// The CRM's id.
        pub id: u64,
        /// Who the deal is with.
        pub client: String,
    }

    fn ledger(ctx: &StepContext) -> Result<&Arc<Ledger>, CrmError> {
        ctx.resource::<Arc<Ledger>>()
            .map_err(|source| CrmError::Missing { source })
    }

    /// Opens the deal in the CRM.
    #[saga_core::saga_step(
        compensate = delete_deal,
        reconcile_compensation = deal_deleted,
        timeout = "10s",
        retry(max_attempts = 5, initial = "200ms", max = "5s")
    )]
    pub async fn create_deal(ctx: &StepContext, input: NewDeal) -> Result<Deal, CrmError> {
        ledger(ctx)?.record("create_deal");
        Ok(Deal {
            id: 7,
            client: input.client,
        })
    }

    async fn delete_deal(ctx: &StepContext, input: NewDeal, deal: Deal) -> Result<(), CrmError> {
        ledger(ctx)?.record(format!("delete_deal {} {}", deal.id, input.client));
        Ok(())
    }

    async fn deal_deleted(
        ctx: &StepContext,
        input: &NewDeal,
        deal: &Deal,
    ) -> Result<Reconciled<()>, CrmError> {
        ledger(ctx)?.record(format!("deal_deleted {} {}", deal.id, input.client));
        Ok(Reconciled::Applied(()))
    }

    /// Books a room; the booking may exist even when the call failed. Uses every option.
    #[saga_core::saga_step(
        compensate = release_room,
        compensate_on_failure,
        reconcile = find_booking,
        reconcile_compensation = room_released,
        name = "book_room",
        timeout = "none",
        retry(
            max_attempts = 3,
            initial = "1ms",
            max = "4ms",
            multiplier = 3.0,
            jitter = "none",
            max_elapsed = "1m"
        ),
        compensate_retry(max_attempts = 20, initial = "5ms", max = "1s", multiplier = 1.5,
                         jitter = "equal", max_elapsed = "10m")
    )]
    pub(crate) async fn book_committee_room(
        ctx: &StepContext,
        input: Deal,
    ) -> Result<u32, CrmError> {
        // Busy on the first attempt: the derived classification makes the engine retry.
        if ctx.attempt() == 1 {
            ledger(ctx)?.record("book_room busy");
            return Err(CrmError::Busy);
        }
        ledger(ctx)?.record(format!("book_room {}", input.id));
        Ok(101)
    }

    async fn release_room(
        ctx: &StepContext,
        input: Deal,
        room: Option<u32>,
    ) -> Result<(), CrmError> {
        ledger(ctx)?.record(format!("release_room {room:?} for {}", input.id));
        Ok(())
    }

    async fn find_booking(ctx: &StepContext, input: &Deal) -> Result<Reconciled<u32>, CrmError> {
        ledger(ctx)?.record(format!("find_booking {}", input.id));
        Ok(Reconciled::NotApplied)
    }

    async fn room_released(
        ctx: &StepContext,
        input: &Deal,
        room: Option<&u32>,
    ) -> Result<Reconciled<()>, CrmError> {
        ledger(ctx)?.record(format!("room_released {room:?} for {}", input.id));
        Ok(Reconciled::NotApplied)
    }

    /// Tells the committee: nothing to take back once sent, and no reason to stop the deal
    /// from being undone.
    #[saga_core::saga_step(no_compensation)]
    pub async fn notify_committee(ctx: &StepContext, input: u32) -> Result<(), CrmError> {
        ledger(ctx)?.record(format!("notify_committee {input}"));
        Ok(())
    }

    /// Reads the credit line: nothing to undo.
    #[saga_core::saga_step(no_compensation)]
    pub async fn check_credit(ctx: &StepContext, input: u64) -> Result<bool, CrmError> {
        ledger(ctx)?.record(format!("check_credit {input}"));
        Ok(true)
    }

    /// Signs the term sheet: the point of no return. Not part of the deal flow (what the
    /// engine does after a pivot is tested in saga-core).
    #[saga_core::saga_step(pivot)]
    pub async fn sign_term_sheet(ctx: &StepContext, input: u64) -> Result<(), CrmError> {
        ledger(ctx)?.record(format!("sign_term_sheet {input}"));
        Ok(())
    }

    /// Writes the audit entry; refused for good when the deal is flagged.
    #[saga_core::saga_step(compensate = unwrite_audit, compensate_on_failure)]
    pub async fn write_audit(ctx: &StepContext, input: bool) -> Result<(), CrmError> {
        let ledger = ledger(ctx)?;
        if input {
            ledger.record("write_audit refused");
            return Err(CrmError::Rejected("flagged".into()));
        }
        ledger.record("write_audit");
        Ok(())
    }

    async fn unwrite_audit(
        ctx: &StepContext,
        _input: bool,
        output: Option<()>,
    ) -> Result<(), CrmError> {
        ledger(ctx)?.record(format!("unwrite_audit {output:?}"));
        Ok(())
    }

    /// The deal flow: every step above, in order.
    #[derive(Debug)]
    pub struct DealFlow;

    impl Saga for DealFlow {
        type Input = (String, bool);
        type Output = u64;
        const NAME: &'static str = "deal_flow";

        async fn run(
            &self,
            saga: &mut SagaContext,
            (client, flagged): (String, bool),
        ) -> Result<u64, SagaError> {
            let deal = saga.run(CreateDeal, NewDeal { client }).await?;
            let room = saga.run(BookCommitteeRoom, deal.clone()).await?;
            saga.run(NotifyCommittee, room).await?;
            saga.run(CheckCredit, deal.id).await?;
            saga.run(WriteAudit, flagged).await?;
            Ok(deal.id)
        }
    }
}

use steps::*;

const fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

#[test]
fn options_reach_the_step_impl() {
    assert_eq!(CreateDeal::NAME, "create_deal");
    assert_eq!(CreateDeal::COMPENSATION, Compensation::OnSuccess);
    assert_eq!(CreateDeal.timeout(), Some(Duration::from_secs(10)));
    assert_eq!(
        CreateDeal.retry_policy(),
        RetryPolicy::default()
            .with_max_attempts(5)
            .with_initial_delay(ms(200))
            .with_max_delay(Duration::from_secs(5))
    );
    assert_eq!(CreateDeal.retry_policy().base_delay(1), ms(200));
    assert_eq!(
        CreateDeal.retry_policy().base_delay(20),
        Duration::from_secs(5)
    );

    assert_eq!(BookCommitteeRoom::NAME, "book_room");
    assert_eq!(BookCommitteeRoom::COMPENSATION, Compensation::Always);
    assert_eq!(BookCommitteeRoom.timeout(), None);
    let forward = BookCommitteeRoom.retry_policy();
    assert_eq!(forward.max_attempts(), 3);
    assert_eq!(forward.jitter(), Jitter::None);
    assert_eq!(forward.max_elapsed(), Some(Duration::from_secs(60)));
    assert_eq!(forward.base_delay(1), ms(1));
    // The multiplier is an `f32`: allow for rounding.
    assert!(forward.base_delay(2).abs_diff(ms(3)) < Duration::from_micros(1));
    assert_eq!(forward.base_delay(3), ms(4));
    let undo = BookCommitteeRoom.compensation_retry_policy();
    assert_eq!(
        undo,
        RetryPolicy::default()
            .with_max_attempts(20)
            .with_initial_delay(ms(5))
            .with_max_delay(Duration::from_secs(1))
            .with_multiplier(1.5)
            .with_jitter(Jitter::Equal)
            .with_max_elapsed(Duration::from_secs(600))
    );

    assert_eq!(NotifyCommittee::NAME, "notify_committee");
    assert_eq!(NotifyCommittee::COMPENSATION, Compensation::None);
    assert_eq!(CheckCredit::COMPENSATION, Compensation::None);
    assert_eq!(WriteAudit::COMPENSATION, Compensation::Always);
}

/// `pivot` and `no_compensation` both leave nothing to undo, but only a pivot is the point
/// of no return.
#[test]
fn pivot_is_not_no_compensation() {
    assert_eq!(<SignTermSheet as Step>::COMPENSATION, Compensation::Pivot);
    assert_eq!(<NotifyCommittee as Step>::COMPENSATION, Compensation::None);
    assert_eq!(<CheckCredit as Step>::COMPENSATION, Compensation::None);
}

/// Options left out keep the trait's defaults.
#[test]
fn defaults_are_the_traits() {
    struct ByHand;
    impl Step for ByHand {
        type Input = ();
        type Output = ();
        type Error = CrmError;
        const NAME: &'static str = "by_hand";
        const COMPENSATION: Compensation = Compensation::None;
        async fn forward(&self, _ctx: &StepContext, _input: ()) -> Result<(), CrmError> {
            Ok(())
        }
    }
    assert_eq!(NotifyCommittee.retry_policy(), ByHand.retry_policy());
    assert_eq!(
        NotifyCommittee.compensation_retry_policy(),
        ByHand.compensation_retry_policy()
    );
    assert_eq!(NotifyCommittee.timeout(), ByHand.timeout());
    // `compensate_retry(...)` starts from the trait's default compensation policy.
    assert_eq!(
        CreateDeal.compensation_retry_policy(),
        ByHand.compensation_retry_policy()
    );
    // The macro rejects a `max` below this default initial delay; keep the two in step.
    assert_eq!(RetryPolicy::default().base_delay(1), ms(100));
}

#[test]
fn derived_classification() {
    assert_eq!(CrmError::Busy.classify(), ErrorClass::TRANSIENT);
    assert_eq!(
        CrmError::RateLimited { wait: None }.classify(),
        ErrorClass::TRANSIENT
    );
    assert_eq!(
        CrmError::RateLimited {
            wait: Some(ms(250))
        }
        .classify(),
        ErrorClass::retry_after(ms(250))
    );
    assert_eq!(
        CrmError::Throttled(3, Some(ms(40))).classify(),
        ErrorClass::retry_after(ms(40))
    );
    assert_eq!(
        CrmError::Http(HttpStatus::new(503)).classify(),
        ErrorClass::TRANSIENT
    );
    assert_eq!(
        CrmError::Http(HttpStatus::new(404)).classify(),
        ErrorClass::Permanent
    );
    assert_eq!(
        CrmError::Missing {
            source: saga_core::MissingResource { type_name: "x" }
        }
        .classify(),
        ErrorClass::Permanent
    );
    assert_eq!(
        CrmError::Rejected("no".into()).classify(),
        ErrorClass::Permanent
    );
    assert_eq!(AuditRefused.classify(), ErrorClass::Permanent);
    assert_eq!(
        SlowDown(Some(ms(9))).classify(),
        ErrorClass::retry_after(ms(9))
    );
    assert_eq!(
        Wrapped(HttpStatus::new(429)).classify(),
        ErrorClass::TRANSIENT
    );
    assert_eq!(Wrapped(AuditRefused).classify(), ErrorClass::Permanent);
    let _: fn(&Never) -> ErrorClass = Never::classify;
}

fn engine(ledger: &Arc<Ledger>) -> Result<Engine, saga_core::EngineError> {
    Engine::builder(MemoryStore::new())
        .register(DealFlow)
        .resource(Arc::clone(ledger))
        .build()
}

#[tokio::test]
async fn the_original_fn_stays_callable() -> Result<(), CrmError> {
    let ledger = Arc::new(Ledger::default());
    let mut resources = Resources::default();
    resources.insert(Arc::clone(&ledger));
    let ctx = StepContext::standalone("create_deal", resources);
    let deal = create_deal(
        &ctx,
        NewDeal {
            client: "acme".into(),
        },
    )
    .await?;
    assert_eq!(
        deal,
        Deal {
            id: 7,
            client: "acme".into()
        }
    );
    // And through the step type.
    let deal = CreateDeal
        .forward(
            &ctx,
            NewDeal {
                client: "acme".into(),
            },
        )
        .await?;
    CreateDeal
        .compensate(
            &ctx,
            NewDeal {
                client: "acme".into(),
            },
            Some(deal),
        )
        .await?;
    CreateDeal
        .compensate(
            &ctx,
            NewDeal {
                client: "acme".into(),
            },
            None,
        )
        .await?;
    assert_eq!(
        BookCommitteeRoom.reconcile(&ctx, &deal_7()).await?,
        Reconciled::NotApplied
    );
    let new_deal = NewDeal {
        client: "acme".into(),
    };
    assert_eq!(
        CreateDeal
            .reconcile_compensation(&ctx, &new_deal, Some(&deal_7()))
            .await?,
        Reconciled::Applied(())
    );
    // Without an output an `OnSuccess` compensation undoes nothing: the check is not called.
    assert_eq!(
        CreateDeal
            .reconcile_compensation(&ctx, &new_deal, None)
            .await?,
        Reconciled::Unknown
    );
    // `compensate_on_failure`: the check gets the output as an `Option`.
    assert_eq!(
        BookCommitteeRoom
            .reconcile_compensation(&ctx, &deal_7(), None)
            .await?,
        Reconciled::NotApplied
    );
    // Not declared: the trait's default.
    assert_eq!(
        NotifyCommittee
            .reconcile_compensation(&ctx, &101, None)
            .await?,
        Reconciled::Unknown
    );
    assert_eq!(
        ledger.entries(),
        [
            "create_deal",
            "create_deal",
            "delete_deal 7 acme",
            "find_booking 7",
            "deal_deleted 7 acme",
            "room_released None for 7",
        ]
    );
    Ok(())
}

fn deal_7() -> Deal {
    Deal {
        id: 7,
        client: "acme".into(),
    }
}

#[tokio::test]
async fn completes_with_a_retried_step() -> Result<(), saga_core::EngineError> {
    let ledger = Arc::new(Ledger::default());
    let engine = engine(&ledger)?;
    let input = ("acme".to_owned(), false);
    let outcome = engine
        .execute::<DealFlow>(&input, StartOptions::key("deal-ok"))
        .await?;
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.output::<u64>()?, Some(7));
    assert_eq!(
        ledger.entries(),
        [
            "create_deal",
            "book_room busy",
            "book_room 7",
            "notify_committee 101",
            "check_credit 7",
            "write_audit",
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_permanent_failure_compensates_in_reverse_order() -> Result<(), saga_core::EngineError> {
    let ledger = Arc::new(Ledger::default());
    let engine = engine(&ledger)?;
    let input = ("acme".to_owned(), true);
    let outcome = engine
        .execute::<DealFlow>(&input, StartOptions::key("deal-flagged"))
        .await?;
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let entries = ledger.entries();
    assert_eq!(
        entries[..6],
        [
            "create_deal",
            "book_room busy",
            "book_room 7",
            "notify_committee 101",
            "check_credit 7",
            "write_audit refused",
        ]
    );
    // The failed step is `compensate_on_failure`: undone with no output. Then the completed
    // steps in reverse: the notification and the read-only step have nothing to undo.
    assert_eq!(
        entries[6..],
        [
            "unwrite_audit None",
            "release_room Some(101) for 7",
            "delete_deal 7 acme"
        ]
    );
    Ok(())
}
