use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(pivot)]
pub async fn create_deal(_ctx: &StepContext, input: &str) -> Result<String, HttpStatus> {
    Ok(input.to_owned())
}

fn main() {}
