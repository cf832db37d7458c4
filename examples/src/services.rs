//! The simulated back office: company directory, two market-data APIs (Crunchbase-like and
//! PitchBook-like, each rate-limited on its own), deal records, CRM, portfolio book, investment committee, partners' inbox and audit trail.
//! Every mutating call is idempotent by the caller's key: a repeated key gets the recorded
//! result and changes nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::{Classify, HttpStatus, MissingResource, Reconciled, StepContext};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ledger::{BookChange, OfficeStore};
use crate::world::{Caller, World};

/// What a simulated service can answer.
#[derive(Debug, thiserror::Error, Classify)]
pub enum ServiceError {
    /// An HTTP error status (429 and 5xx transient, other 4xx permanent).
    #[error("{0}")]
    #[classify(delegate)]
    Http(HttpStatus),
    /// A business rule refused the request.
    #[error("rejected: {0}")]
    #[classify(permanent)]
    Rejected(String),
    /// The step could not reach its service.
    #[error(transparent)]
    #[classify(delegate)]
    Missing(#[from] MissingResource),
    /// The back office's own storage (Redis, in `--redis-url` mode) is unreachable.
    #[error("back office storage unavailable: {0}")]
    #[classify(transient)]
    Unavailable(String),
    /// The service's recorded result could not be read back.
    #[error("corrupt service record: {0}")]
    #[classify(permanent)]
    Corrupt(String),
}

/// A company in the directory.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Company {
    /// Directory id, e.g. `c-003`.
    pub id: String,
    /// Name.
    pub name: String,
    /// Sector.
    pub sector: String,
    /// Under a compliance hold: the audit trail refuses its deals.
    pub watchlisted: bool,
    /// Annual recurring revenue, in millions.
    pub arr_musd: f64,
    /// Year-on-year growth (0.5 = 50 %).
    pub growth: f64,
}

/// The deterministic company directory of a run.
#[derive(Clone, Debug)]
pub struct Directory {
    companies: Vec<Company>,
}

const NAMES: [&str; 12] = [
    "Helix Robotics",
    "Northwind Bio",
    "Quanta Ledger",
    "Arbor Health",
    "Lumen Grid",
    "Cobalt AI",
    "Tidewater Labs",
    "Fathom Data",
    "Juniper Pay",
    "Orbital Freight",
    "Sable Security",
    "Kite Energy",
];
const SECTORS: [&str; 3] = ["fintech", "ai", "climate"];

impl Directory {
    /// `count` companies drawn from `seed`. Company 2 is always watchlisted with strong
    /// numbers, so a default run shows a compensated deal.
    #[must_use]
    pub fn generate(seed: u64, count: usize) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let companies = (0..count)
            .map(|i| {
                let watchlisted = i == 2;
                Company {
                    id: format!("c-{i:03}"),
                    name: format!("{} {}", NAMES[i % NAMES.len()], i / NAMES.len() + 1),
                    sector: SECTORS[i % SECTORS.len()].to_owned(),
                    watchlisted,
                    arr_musd: if watchlisted {
                        42.0
                    } else {
                        (rng.f64() * 40.0 + 2.0).round()
                    },
                    growth: if watchlisted {
                        1.4
                    } else {
                        (rng.f64() * 1.5 * 100.0).round() / 100.0
                    },
                }
            })
            .collect();
        Self { companies }
    }

    /// Every company.
    #[must_use]
    pub fn companies(&self) -> &[Company] {
        &self.companies
    }

    /// One company by id.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&Company> {
        self.companies.iter().find(|c| c.id == id)
    }
}

/// A third-party market-data provider, each with its own rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// Crunchbase-like: funding rounds and headcount, from which the growth rate.
    Crunchbase,
    /// PitchBook-like: financials, from which the annual recurring revenue.
    PitchBook,
}

impl DataSource {
    /// Both providers, in the order a company's pulls are made.
    pub const ALL: [DataSource; 2] = [DataSource::Crunchbase, DataSource::PitchBook];

    fn index(self) -> usize {
        match self {
            DataSource::Crunchbase => 0,
            DataSource::PitchBook => 1,
        }
    }
}

/// A token bucket for one market-data API.
#[derive(Debug)]
struct RateLimiter {
    capacity: u32,
    window: Duration,
    window_start: tokio::time::Instant,
    used: u32,
}

/// The simulated services, registered on the engine as one resource.
#[derive(Clone, Debug)]
pub struct Backoffice {
    /// Faults, crash switch and ledger.
    pub world: World,
    /// The directory.
    pub directory: Arc<Directory>,
    /// Books and ledger.
    pub state: Arc<dyn OfficeStore>,
    /// One bucket per [`DataSource`], by [`DataSource::index`].
    limiters: Arc<[Mutex<RateLimiter>; 2]>,
}

impl Backoffice {
    /// A back office over `world` and `directory`, with each market-data API limited to
    /// `per_window` calls per 250 ms.
    #[must_use]
    pub fn new(
        world: World,
        directory: Directory,
        state: Arc<dyn OfficeStore>,
        per_window: u32,
    ) -> Self {
        Self {
            world,
            directory: Arc::new(directory),
            state,
            limiters: Arc::new(std::array::from_fn(|_| {
                Mutex::new(RateLimiter {
                    capacity: per_window,
                    window: Duration::from_millis(250),
                    window_start: tokio::time::Instant::now(),
                    used: 0,
                })
            })),
        }
    }

    /// The back office registered on the engine.
    ///
    /// # Errors
    /// [`ServiceError::Missing`] when it was not registered.
    pub fn of(ctx: &StepContext) -> Result<&Backoffice, ServiceError> {
        Ok(ctx.resource::<Backoffice>()?)
    }

    /// A read-only call: latency and faults, no ledger entry.
    ///
    /// # Errors
    /// The injected fault.
    pub async fn read<T>(
        &self,
        ctx: &StepContext,
        read: impl FnOnce(&Self) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let caller = Caller::of(ctx);
        if self.world.call(&caller).await? {
            self.world.lose_response().await;
        }
        read(self)
    }

    /// Charges one call against `source`'s rate limit.
    ///
    /// # Errors
    /// 429 with the time until the window resets.
    pub fn rate_limit(&self, source: DataSource) -> Result<(), ServiceError> {
        let mut limiter = self.limiters[source.index()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        if now.duration_since(limiter.window_start) >= limiter.window {
            limiter.window_start = now;
            limiter.used = 0;
        }
        if limiter.used >= limiter.capacity {
            let left = limiter
                .window
                .saturating_sub(now.duration_since(limiter.window_start));
            // Retry-After is whole milliseconds, rounded up so that a retry is never early.
            let wait = Duration::from_millis(
                u64::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u64::MAX),
            );
            return Err(ServiceError::Http(
                HttpStatus::new(429).with_retry_after(wait.max(Duration::from_millis(10))),
            ));
        }
        limiter.used += 1;
        Ok(())
    }

    /// A mutating call, exactly once per idempotency key: faults first; then, unless the key
    /// was seen before (in which case the recorded result comes back), `change` is applied to
    /// the books and recorded in the ledger, and its result decoded as `T`. The crash switch
    /// may stop the process right after the effect, before the caller hears of it.
    ///
    /// # Errors
    /// The injected fault, or the change's rejection (which records nothing).
    pub async fn effect<T: DeserializeOwned>(
        &self,
        ctx: &StepContext,
        change: BookChange,
    ) -> Result<T, ServiceError> {
        let caller = Caller::of(ctx);
        let lose_response = self.world.call(&caller).await?;
        let value = self.state.apply_once(&caller, &change).await?;
        let result =
            serde_json::from_value(value).map_err(|e| ServiceError::Corrupt(e.to_string()))?;
        self.world.crash.after_effect().await;
        if lose_response {
            self.world.lose_response().await;
        }
        Ok(result)
    }

    /// Whether the effect with the caller's idempotency key was applied, and its result: the
    /// back office's answer to "did my request with this key go through?".
    ///
    /// # Errors
    /// The injected fault.
    pub async fn lookup<T: DeserializeOwned>(
        &self,
        ctx: &StepContext,
    ) -> Result<Reconciled<T>, ServiceError> {
        let caller = Caller::of(ctx);
        self.world.crash.gate().await;
        let recorded = self
            .state
            .recorded(&caller.key)
            .await?
            .unwrap_or(Value::Null);
        match recorded {
            Value::Null => Ok(Reconciled::NotApplied),
            value => serde_json::from_value(value)
                .map(Reconciled::Applied)
                .map_err(|e| ServiceError::Corrupt(e.to_string())),
        }
    }

    /// Whether the compensation with the caller's idempotency key (the compensation's own
    /// key) was applied: the back office records every key it carried out, an undo's with a
    /// `null` result, so here any record means "applied".
    ///
    /// # Errors
    /// The back office's storage is unreachable.
    pub async fn undo_lookup(&self, ctx: &StepContext) -> Result<Reconciled<()>, ServiceError> {
        self.world.crash.gate().await;
        Ok(match self.state.recorded(ctx.idempotency_key()).await? {
            Some(_) => Reconciled::Applied(()),
            None => Reconciled::NotApplied,
        })
    }
}

/// The reconciliation check of every compensation: asks the back office whether the undo
/// with this compensation's idempotency key was applied, so that an undo applied on an
/// attempt that timed out is not taken for a failure when the next attempts are refused.
///
/// # Errors
/// The back office is missing or unreachable.
pub async fn undone_by_key<I, O>(
    ctx: &StepContext,
    input: &I,
    output: &O,
) -> Result<Reconciled<()>, ServiceError> {
    let _ = (input, output);
    Backoffice::of(ctx)?.undo_lookup(ctx).await
}

/// The reconciliation check of every mutating step: asks the back office whether the effect
/// with this step's idempotency key was applied.
///
/// # Errors
/// The back office is missing or its record is corrupt.
pub async fn applied_by_key<I, T: DeserializeOwned>(
    ctx: &StepContext,
    input: &I,
) -> Result<Reconciled<T>, ServiceError> {
    let _ = input;
    Backoffice::of(ctx)?.lookup(ctx).await
}
