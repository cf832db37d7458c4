use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(compensate = delete_deal)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<u64, HttpStatus> {
    Ok(input.len() as u64)
}

pub async fn delete_deal(
    _ctx: &StepContext,
    _input: String,
    _deal: u64,
) -> Result<(), std::io::Error> {
    Ok(())
}

fn main() {}
