use saga_core::{SagaContext, SagaError, saga};

#[saga(name = "deal_flow", version = 2, name = "deals", version = 3)]
pub async fn deal_flow(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

fn main() {}
