use saga_core::{HttpStatus, StepContext, saga_step};

pub struct Crm;

impl Crm {
    #[saga_step(pivot)]
    pub async fn create_deal(
        &self,
        _ctx: &StepContext,
        input: String,
    ) -> Result<String, HttpStatus> {
        Ok(input)
    }
}

fn main() {}
