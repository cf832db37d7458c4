use saga_core::{HttpStatus, Reconciled, StepContext, saga_step};

#[saga_step(compensate = delete_deal, reconcile_compensation = deal_deleted)]
pub async fn create_deal(_ctx: &StepContext, input: String) -> Result<u64, HttpStatus> {
    Ok(input.len() as u64)
}

async fn delete_deal(_ctx: &StepContext, _input: String, _deal: u64) -> Result<(), HttpStatus> {
    Ok(())
}

// Should take `deal: &u64` (the compensation's output, by reference).
async fn deal_deleted(
    _ctx: &StepContext,
    _input: &String,
    _deal: u64,
) -> Result<Reconciled<()>, HttpStatus> {
    Ok(Reconciled::Unknown)
}

fn main() {}
