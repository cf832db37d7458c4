use saga_core::{SagaContext, SagaError, saga};

#[saga]
pub async fn deal_flow(_saga: &mut SagaContext, input: &str) -> Result<String, SagaError> {
    Ok(input.to_owned())
}

fn main() {}
