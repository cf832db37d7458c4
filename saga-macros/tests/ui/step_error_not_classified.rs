use saga_core::{StepContext, saga_step};

#[derive(Debug)]
pub struct PlainError;

impl std::fmt::Display for PlainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("plain")
    }
}

#[saga_step(pivot)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<String, PlainError> {
    Ok(input)
}

fn main() {}
