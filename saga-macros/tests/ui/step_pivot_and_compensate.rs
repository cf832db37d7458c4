use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(compensate = delete_deal, pivot)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<String, HttpStatus> {
    Ok(input)
}

pub async fn delete_deal(
    _ctx: &StepContext,
    _input: String,
    _deal: String,
) -> Result<(), HttpStatus> {
    Ok(())
}

fn main() {}
