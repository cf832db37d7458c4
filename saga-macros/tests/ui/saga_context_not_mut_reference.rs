use saga_core::{SagaContext, SagaError, saga};

#[saga]
pub async fn deal_flow(_saga: &SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

#[saga]
pub async fn quote_flow(_saga: SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

fn main() {}
