use saga_core::{HttpStatus, Saga, SagaContext, SagaError, StepContext, saga_step};

#[saga_step(pivot, bogus)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<String, HttpStatus> {
    Ok(input)
}

// The mistake is reported once, at the option: the fn and the step type still exist, so
// their uses below compile.
pub struct Flow;

impl Saga for Flow {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "flow";

    async fn run(&self, saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
        saga.run(CreateDeal, input).await
    }
}

fn main() {}
