use saga_core::Classify;

#[derive(Debug, Classify)]
pub enum CrmError {
    #[classify(delegate)]
    Io(String),
}

fn main() {}
