use saga_core::{SagaContext, SagaError, saga};

#[saga]
pub async fn deal_flow<T: ToString>(_saga: &mut SagaContext, input: T) -> Result<String, SagaError> {
    Ok(input.to_string())
}

#[saga]
pub async fn quote_flow(_saga: &mut SagaContext, input: String) -> Result<String, SagaError>
where
    String: Clone,
{
    Ok(input)
}

fn main() {}
