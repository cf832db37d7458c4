use saga_core::{SagaContext, saga};

#[saga]
pub async fn deal_flow(_saga: &mut SagaContext, input: String) -> Option<String> {
    Some(input)
}

#[saga]
pub async fn quote_flow(_saga: &mut SagaContext, _input: String) {}

fn main() {}
