use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(compensate = delete_deal, compensate_on_failure)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<u64, HttpStatus> {
    Ok(input.len() as u64)
}

// With `compensate_on_failure` the output is `Option<u64>`: the forward action may have failed.
pub async fn delete_deal(_ctx: &StepContext, _input: String, _deal: u64) -> Result<(), HttpStatus> {
    Ok(())
}

fn main() {}
