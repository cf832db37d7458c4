use saga_core::Classify;

#[derive(Debug, Classify)]
pub enum CrmError {
    #[classify(transient, permanent)]
    Busy,
}

fn main() {}
