//! The commands. Each one reads or acts on the store and returns a [`Report`] that
//! [`output::render`] turns into a table or a JSON document.

mod list;
mod operator;
mod purge;
mod show;
mod stats;

use crate::cli::{Cli, Command};
use crate::connect;
use crate::error::CliError;
use crate::output::{self, Report};

/// Runs the command line to its printed output.
pub(crate) fn execute(cli: Cli) -> Result<String, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| CliError::new(format!("cannot start the async runtime: {err}")))?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<String, CliError> {
    let json = cli.global.json;
    let store = connect::store(&cli.global).await?;
    match cli.command {
        Command::List(args) => emit(&list::run(&store, &args).await?, json),
        Command::Show { id } => {
            let engine = connect::engine(store.clone())?;
            emit(&show::run(&store, &engine, &id).await?, json)
        }
        Command::Retry { id, reason } => {
            let engine = connect::engine(store)?;
            emit(&operator::retry(&engine, &id, &reason).await?, json)
        }
        Command::Cancel { id, reason } => {
            let engine = connect::engine(store)?;
            emit(&operator::cancel(&engine, &id, &reason).await?, json)
        }
        Command::Abandon { id, reason } => {
            let engine = connect::engine(store)?;
            emit(&operator::abandon(&engine, &id, &reason).await?, json)
        }
        Command::Purge { older_than, limit } => {
            emit(&purge::run(&store, older_than, limit).await?, json)
        }
        Command::Stats { failures } => emit(&stats::run(&store, failures).await?, json),
    }
}

fn emit<R: Report>(report: &R, json: bool) -> Result<String, CliError> {
    output::render(report, json)
}
