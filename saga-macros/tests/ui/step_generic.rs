use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(pivot)]
pub async fn create_deal<T: ToString>(_ctx: &StepContext, input: T) -> Result<String, HttpStatus> {
    Ok(input.to_string())
}

fn main() {}
