use saga_core::saga;

#[saga]
pub struct DealFlow;

#[saga]
pub const DEAL_FLOW: &str = "deal_flow";

fn main() {}
