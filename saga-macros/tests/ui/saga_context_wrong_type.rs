use saga_core::{SagaError, StepContext, saga};

#[saga]
pub async fn deal_flow(_saga: &mut StepContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

fn main() {}
