use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(pivot, reconcile = find_deal)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<u64, HttpStatus> {
    Ok(input.len() as u64)
}

// Should return `Result<Reconciled<u64>, HttpStatus>`.
pub async fn find_deal(_ctx: &StepContext, _input: &String) -> Result<Option<u64>, HttpStatus> {
    Ok(None)
}

fn main() {}
