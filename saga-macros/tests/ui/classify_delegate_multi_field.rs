use saga_core::{Classify, HttpStatus};

#[derive(Debug, Classify)]
pub enum CrmError {
    #[classify(delegate)]
    Http(HttpStatus, String),
}

fn main() {}
