use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(pivot)]
pub fn create_deal(_ctx: &StepContext, input: String) -> Result<String, HttpStatus> {
    Ok(input)
}

fn main() {}
