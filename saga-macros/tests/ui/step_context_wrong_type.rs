use saga_core::{HttpStatus, saga_step};

pub struct MyContext;

#[saga_step(pivot)]
pub async fn create_deal(_ctx: &MyContext, input: String) -> Result<String, HttpStatus> {
    Ok(input)
}

fn main() {}
