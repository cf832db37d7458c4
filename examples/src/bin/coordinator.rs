//! `deal-flow-coordinator`: a long-running coordinator process of the deal-flow example (see
//! `saga_examples::coordinator`). Exit status 0 after a graceful shutdown on SIGINT/SIGTERM,
//! 2 when it cannot start.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use saga_examples::coordinator::{self, CoordinatorArgs};
use saga_examples::ops;

#[tokio::main]
async fn main() -> ExitCode {
    let args = CoordinatorArgs::parse();
    ops::init_logs(args.log_format, "info");
    match coordinator::run(args).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "deal-flow-coordinator could not run");
            let _ = writeln!(std::io::stderr(), "deal-flow-coordinator: {err}");
            ExitCode::from(2)
        }
    }
}
