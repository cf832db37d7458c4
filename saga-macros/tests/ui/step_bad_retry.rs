use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(pivot, retry(max_attempts = 0, multiplier = 0.5))]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<String, HttpStatus> {
    Ok(input)
}

fn main() {}
