use std::time::Duration;

use saga_core::Classify;

#[derive(Debug, Classify)]
pub enum CrmError {
    #[classify(transient(retry_after = retry_in))]
    RateLimited { wait: Option<Duration> },
}

fn main() {}
