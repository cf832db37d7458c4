use saga_core::Classify;

#[derive(Debug, Classify)]
pub struct Rejected {
    pub reason: String,
}

fn main() {}
