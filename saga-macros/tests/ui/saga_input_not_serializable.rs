use saga_core::{SagaContext, SagaError, saga};

pub struct DealRequest;

#[saga]
pub async fn deal_flow(_saga: &mut SagaContext, _input: DealRequest) -> Result<u64, SagaError> {
    Ok(7)
}

fn main() {}
