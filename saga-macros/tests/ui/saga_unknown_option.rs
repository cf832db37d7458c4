use saga_core::{Engine, MemoryStore, SagaContext, SagaError, saga};

#[saga(timeout = "10s", pivot)]
pub async fn deal_flow(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

// The mistakes are reported at the options: the fn and the saga type still exist, so their
// uses below compile.
pub fn engine() -> Result<Engine, saga_core::EngineError> {
    Engine::builder(MemoryStore::new()).register(DealFlow).build()
}

fn main() {}
