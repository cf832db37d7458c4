use saga_core::{SagaContext, saga};

// Every mistake is reported at once.
#[saga(version = 0, nmae = "x")]
pub fn deal_flow<T>(_saga: &SagaContext, _input: &T) -> Option<T> {
    None
}

fn main() {}
