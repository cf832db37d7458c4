use saga_core::{SagaContext, SagaError, saga};

#[saga(version = 0)]
pub async fn version_zero(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

#[saga(version = -1)]
pub async fn version_negative(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

#[saga(version = "2")]
pub async fn version_string(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

#[saga(version = 1.5)]
pub async fn version_fraction(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

#[saga(version = 4294967296)]
pub async fn version_too_large(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

#[saga(version = 2u64)]
pub async fn version_suffixed(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

#[saga(version)]
pub async fn version_missing(_saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
    Ok(input)
}

fn main() {}
