//! `saga`: the operator command line for saga coordinators that keep their sagas in Redis.
//!
//! ```text
//! saga --redis-url redis://127.0.0.1:6379 list --status failed
//! saga show 6f1c...            # timeline, steps, lease
//! saga retry 6f1c... --reason "fixed the CRM credentials"
//! saga signal 6f1c... approval --payload '{"approved": true}' --key ticket-42
//! saga stats --json
//! saga token new intake --scopes start,read   # an API token and its config line (no Redis)
//! ```
//!
//! Every command prints one table (or, with `--json`, one JSON document) on stdout. A failure
//! prints one line on stderr and exits with status 1; an action the saga's state refuses (a
//! cancel once the saga is past its pivot, a signal to a saga that has ended) exits with
//! status 3 and changes nothing.

mod cli;
mod commands;
mod connect;
mod error;
mod output;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::execute(cli) {
        Ok(text) => {
            output::print(&text);
            ExitCode::SUCCESS
        }
        Err(err) => {
            output::print_error(&err);
            ExitCode::from(err.exit_code())
        }
    }
}
