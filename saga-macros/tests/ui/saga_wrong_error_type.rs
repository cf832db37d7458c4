use saga_core::{SagaContext, saga};

#[derive(Debug)]
pub struct DealError;

#[saga]
pub async fn deal_flow(_saga: &mut SagaContext, input: String) -> Result<String, DealError> {
    Ok(input)
}

fn main() {}
