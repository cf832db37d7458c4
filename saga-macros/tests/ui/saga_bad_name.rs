use saga_core::{SagaContext, SagaError, saga};

#[saga(name = "")]
pub async fn name_empty(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

#[saga(name = " deal_flow")]
pub async fn name_padded(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

#[saga(name = deal_flow)]
pub async fn name_not_a_string(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

fn main() {}
