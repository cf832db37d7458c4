use saga_core::{SagaContext, SagaError, saga};

#[saga]
pub fn deal_flow(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

fn main() {}
