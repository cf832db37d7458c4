//! The client load: a steady stream of deal sagas started through a client-only engine
//! (it runs no workers), each with an idempotency key, every k-th delivered twice, with the
//! client retry policy so that starts ride out the faults. A start that returned is
//! acknowledged: its saga must end.

use std::time::Duration;

use saga_core::{Engine, SagaId, StartOptions, content_key};
use saga_examples::deal::DealFlow;
use saga_examples::load::deal_request;
use serde::Serialize;
use tokio::task::JoinSet;

/// What the load does.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Seed of the deals.
    pub seed: u64,
    /// Starts per second.
    pub rate: f64,
    /// How long starts are submitted.
    pub duration: Duration,
    /// Every n-th start is delivered twice (0: never).
    pub duplicate_every: usize,
    /// Share of watchlisted deals (their sagas compensate).
    pub watchlist_rate: f64,
}

/// What the starts acknowledged.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadOutcome {
    /// Starts submitted (first deliveries).
    pub submitted: usize,
    /// Sagas whose start returned: every one must end.
    #[serde(skip)]
    pub acknowledged: Vec<SagaId>,
    /// Second deliveries answered with the first one's saga.
    pub duplicate_starts: u64,
    /// Second deliveries answered with another saga, or as a new one: each breaks
    /// idempotent start.
    pub duplicate_mismatches: Vec<String>,
    /// Starts that still failed after the client retries (not acknowledged).
    pub start_errors: usize,
    /// The first few of their errors.
    pub start_error_samples: Vec<String>,
}

/// Runs the load for `config.duration` and waits for every start in flight.
pub async fn run(engine: Engine, config: LoadConfig) -> LoadOutcome {
    let period = Duration::from_secs_f64(1.0 / config.rate.max(0.1));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let began = tokio::time::Instant::now();
    let mut starts = JoinSet::new();
    let mut index = 0_usize;
    loop {
        ticks.tick().await;
        if began.elapsed() >= config.duration {
            break;
        }
        let engine = engine.clone();
        let request = deal_request(config.seed, index, config.watchlist_rate);
        let key = content_key(&["saga-chaos", &config.seed.to_string(), &index.to_string()]);
        let twice = config.duplicate_every > 0 && index.is_multiple_of(config.duplicate_every);
        starts.spawn(async move {
            let first = engine
                .start_with::<DealFlow>(&request, StartOptions::key(key.clone()))
                .await?;
            let second = if twice {
                Some(
                    engine
                        .start_with::<DealFlow>(&request, StartOptions::key(key))
                        .await,
                )
            } else {
                None
            };
            Ok::<_, saga_core::EngineError>((index, first.id, second))
        });
        index += 1;
    }
    let mut outcome = LoadOutcome {
        submitted: index,
        ..LoadOutcome::default()
    };
    while let Some(joined) = starts.join_next().await {
        match joined {
            Ok(Ok((index, id, second))) => {
                outcome.acknowledged.push(id);
                match second {
                    Some(Ok(again)) if again.id == id && !again.created => {
                        outcome.duplicate_starts += 1;
                    }
                    Some(Ok(again)) => outcome.duplicate_mismatches.push(format!(
                        "start #{index}: first delivery made saga {id}, the second answered saga {} (created: {})",
                        again.id, again.created
                    )),
                    // The first delivery was acknowledged; the second one's failure is a
                    // failed start like any other.
                    Some(Err(err)) => record_error(&mut outcome, format!("second start #{index}: {err}")),
                    None => {}
                }
            }
            Ok(Err(err)) => record_error(&mut outcome, err.to_string()),
            Err(err) => record_error(&mut outcome, format!("start task failed: {err}")),
        }
    }
    outcome
}

fn record_error(outcome: &mut LoadOutcome, error: String) {
    outcome.start_errors += 1;
    if outcome.start_error_samples.len() < 5 {
        outcome.start_error_samples.push(error);
    }
}
