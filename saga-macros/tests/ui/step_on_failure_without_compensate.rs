use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(pivot, compensate_on_failure)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<String, HttpStatus> {
    Ok(input)
}

fn main() {}
