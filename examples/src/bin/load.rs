//! `deal-flow-load`: submits deal-flow sagas from a client-only process and waits for them
//! (see `saga_examples::load`). Exit status 0 only when every start was acknowledged, the
//! ledger check holds and every acknowledged saga ended; 1 otherwise; 2 when it cannot run.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use saga_examples::load::{self, LoadArgs};
use saga_examples::ops;

#[tokio::main]
async fn main() -> ExitCode {
    let args = LoadArgs::parse();
    ops::init_logs(args.log_format, "warn");
    match load::run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "deal-flow-load: {err}");
            ExitCode::from(2)
        }
    }
}
