use saga_core::saga_step;

#[saga_step(pivot)]
pub struct CreateDeal;

fn main() {}
