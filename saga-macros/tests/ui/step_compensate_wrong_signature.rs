use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(compensate = delete_deal)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<u64, HttpStatus> {
    Ok(input.len() as u64)
}

// Forgot the input parameter: a compensation takes (ctx, input, output).
pub async fn delete_deal(_ctx: &StepContext, _deal: u64) -> Result<(), HttpStatus> {
    Ok(())
}

fn main() {}
