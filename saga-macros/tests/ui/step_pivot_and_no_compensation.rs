use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(pivot, no_compensation)]
pub async fn sign_term_sheet(_ctx: &StepContext, input: String) -> Result<String, HttpStatus> {
    Ok(input)
}

fn main() {}
