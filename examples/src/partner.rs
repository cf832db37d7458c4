//! The simulated investment-committee partner: watches the store for deals whose committee
//! notice went out and that wait for a decision, and answers each with the
//! `committee_approval` signal after a delay. Decisions and delays are drawn from the run's
//! seed and the company id, so a run is reproducible; the signal's key is derived from the
//! deal saga, so a partner restarted after a crash that answers again changes nothing.

use std::collections::HashSet;
use std::time::Duration;

use saga_core::{Engine, EngineError, SagaId, SagaStatus, StepStatus};
use tokio::task::JoinSet;

use crate::deal::{COMMITTEE_APPROVAL, CommitteeDecision, DealFlow, DealRequest};

/// How often the partner looks for deals that wait for a decision.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Who answers, in turn.
const PARTNERS: [&str; 3] = ["A. Rivera", "M. Okafor", "J. Lindqvist"];

/// The partner's answer to one deal and how long it thinks first.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// The decision to send.
    pub decision: CommitteeDecision,
    /// How long after seeing the deal it is sent.
    pub delay: Duration,
}

/// The answer for `company_id` under `seed`: about four deals in five are approved, after
/// 150 ms to 1.2 s.
#[must_use]
pub fn answer(seed: u64, company_id: &str) -> Answer {
    let mut hash = seed ^ 0x5bd1_e995_7f4a_7c15;
    for byte in company_id.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = fastrand::Rng::with_seed(hash);
    let approved = rng.u8(0..100) >= 20;
    let partner = PARTNERS[rng.usize(0..PARTNERS.len())];
    Answer {
        decision: CommitteeDecision {
            approved,
            partner: partner.to_owned(),
            note: if approved {
                "approved at the Monday meeting".into()
            } else {
                "pass: valuation too rich".into()
            },
        },
        delay: Duration::from_millis(rng.u64(150..=1200)),
    }
}

/// Runs the partner until it is dropped (or its task aborted).
pub async fn run(engine: Engine, seed: u64) {
    let mut handled: HashSet<SagaId> = HashSet::new();
    let mut sends = JoinSet::new();
    loop {
        match waiting_deals(&engine, &handled).await {
            Ok(deals) => {
                for (id, request) in deals {
                    handled.insert(id);
                    let engine = engine.clone();
                    let answer = answer(seed, &request.company_id);
                    sends.spawn(async move {
                        // The partner's think time, simulated.
                        tokio::time::sleep(answer.delay).await;
                        send(&engine, id, &answer.decision).await;
                    });
                }
            }
            Err(err) => tracing::warn!(error = %err, "partner could not look for deals"),
        }
        while sends.try_join_next().is_some() {}
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

async fn send(engine: &Engine, id: SagaId, decision: &CommitteeDecision) {
    let key = format!("partner-{id}");
    match engine.signal(id, COMMITTEE_APPROVAL, decision, &key).await {
        Ok(_) => {}
        // The deal gave up waiting (timed out, or was undone by its sourcing saga).
        Err(EngineError::WrongStatus { .. }) => {}
        Err(err) => tracing::warn!(deal = %id, error = %err, "partner could not answer a deal"),
    }
}

/// The running deal sagas not handled yet whose committee notice went out and that ask for
/// a vote.
async fn waiting_deals(
    engine: &Engine,
    handled: &HashSet<SagaId>,
) -> Result<Vec<(SagaId, DealRequest)>, EngineError> {
    let mut out = Vec::new();
    for (id, status, saga_type) in crate::scenario::all_sagas(engine).await? {
        if status != SagaStatus::Running
            || saga_type != <DealFlow as saga_core::Saga>::NAME
            || handled.contains(&id)
        {
            continue;
        }
        let state = engine.state(id).await?;
        let noticed = state
            .journal
            .iter()
            .any(|r| r.name == "notify_committee" && r.status == StepStatus::Succeeded);
        let Ok(request) = serde_json::from_value::<DealRequest>(state.input) else {
            continue;
        };
        if noticed && request.committee.is_some() {
            out.push((id, request));
        }
    }
    Ok(out)
}
