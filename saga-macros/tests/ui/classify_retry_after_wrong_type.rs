use saga_core::Classify;

#[derive(Debug, Classify)]
pub enum CrmError {
    #[classify(transient(retry_after = wait))]
    RateLimited { wait: u64 },
}

fn main() {}
