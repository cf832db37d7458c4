use saga_core::{HttpStatus, StepContext, saga_step};

#[saga_step(pivot, retry(initial = "2s", max = "500ms"))]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<String, HttpStatus> {
    Ok(input)
}

fn main() {}
