use saga_core::{SagaContext, SagaError, saga};

#[saga(nmae = "deal_flow", verison = 2)]
pub async fn deal_flow(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

fn main() {}
