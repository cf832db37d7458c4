use saga_core::{StepContext, saga_step};

#[saga_step(pivot)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Option<String> {
    Some(input)
}

fn main() {}
