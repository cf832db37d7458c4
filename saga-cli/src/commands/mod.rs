//! The commands. Each one reads or acts on the store and returns a [`Report`] that
//! [`output::render`] turns into a table or a JSON document.

mod api;
mod list;
mod operator;
mod purge;
mod show;
mod signal;
mod stats;
mod token;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cli::{Cli, Command, TokenCommand};
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
    let retry_for = cli.global.retry_for;
    let retried = Arc::new(AtomicBool::new(false));
    let retry = connect::client_retry(retry_for, Arc::clone(&retried));
    run_with(cli, &retry).await.map_err(|err| {
        if retried.load(Ordering::Relaxed) {
            CliError::new(format!(
                "{err} (still failing after retrying for up to {}; --retry-for sets how long)",
                humantime::format_duration(retry_for)
            ))
        } else {
            err
        }
    })
}

async fn run_with(cli: Cli, retry: &saga_core::ClientRetry) -> Result<String, CliError> {
    let json = cli.global.json;
    // Commands that need no store come first: no Redis URL is asked for.
    if let Command::Token(TokenCommand::New { name, scopes }) = &cli.command {
        return emit(&token::new(name, scopes)?, json);
    }
    if let Command::Api(args) = &cli.command {
        return api::run(args, cli.global.retry_for, json).await;
    }
    let store = connect::store(&cli.global, retry).await?;
    match cli.command {
        Command::List(args) => emit(&list::run(store.as_ref(), &args).await?, json),
        Command::Show { id } => {
            let engine = connect::engine(Arc::clone(&store))?;
            emit(&show::run(store.as_ref(), &engine, &id).await?, json)
        }
        Command::Retry { id, reason } => {
            let engine = connect::engine(store)?;
            emit(&operator::retry(&engine, &id, &reason).await?, json)
        }
        Command::Cancel { id, reason } => {
            let engine = connect::engine(store)?;
            emit(&operator::cancel(&engine, &id, &reason).await?, json)
        }
        Command::Signal(args) => {
            let engine = connect::engine(store)?;
            emit(&signal::run(&engine, &args).await?, json)
        }
        Command::Abandon { id, reason } => {
            let engine = connect::engine(store)?;
            emit(&operator::abandon(&engine, &id, &reason).await?, json)
        }
        Command::Purge { older_than, limit } => {
            emit(&purge::run(store.as_ref(), older_than, limit).await?, json)
        }
        Command::Stats { failures } => emit(&stats::run(store.as_ref(), failures).await?, json),
        Command::Token(_) | Command::Api(_) => {
            Err(CliError::new("token and api commands need no store"))
        }
    }
}

fn emit<R: Report>(report: &R, json: bool) -> Result<String, CliError> {
    output::render(report, json)
}
