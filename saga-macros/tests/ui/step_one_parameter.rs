use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(pivot)]
pub async fn create_deal(_ctx: &StepContext) -> Result<String, HttpStatus> {
    Ok(String::new())
}

fn main() {}
