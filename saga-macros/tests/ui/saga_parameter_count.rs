use saga_core::{SagaContext, SagaError, saga};

#[saga]
pub async fn deal_flow(_saga: &mut SagaContext) -> Result<String, SagaError> {
    Ok(String::new())
}

#[saga]
pub async fn quote_flow(
    _saga: &mut SagaContext,
    input: String,
    _extra: u32,
) -> Result<String, SagaError> {
    Ok(input)
}

fn main() {}
