use saga_core::Classify;

#[derive(Debug, Classify)]
pub enum CrmError {
    #[classify(transient)]
    Busy,
    Rejected(String),
}

fn main() {}
