use saga_core::{SagaContext, SagaError, saga};

pub struct Flows;

impl Flows {
    #[saga]
    pub async fn deal_flow(
        &self,
        _saga: &mut SagaContext,
        input: String,
    ) -> Result<String, SagaError> {
        Ok(input)
    }
}

fn main() {}
