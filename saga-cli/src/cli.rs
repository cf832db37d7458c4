//! The command line: global flags and subcommands (clap derive).

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use saga_core::SagaStatus;

/// Operator commands for sagas stored in Redis.
#[derive(Debug, Parser)]
#[command(name = "saga", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Where the sagas are stored.
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags every command takes (before or after the subcommand).
#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// Redis URL: `redis://[user:password@]host[:port][/db]`, or `rediss://...` for TLS
    /// (required).
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
    /// Read the Redis URL from this file (its first line) instead, so that a password never
    /// reaches the command line (`ps`).
    #[arg(
        long,
        env = "REDIS_URL_FILE",
        global = true,
        hide_env_values = true,
        conflicts_with = "redis_url"
    )]
    pub(crate) redis_url_file: Option<std::path::PathBuf>,
    /// For rediss:// URLs: trust only the CA certificate(s) in this PEM file instead of the
    /// system's root certificates (a private CA).
    #[arg(long, env = "REDIS_CA_FILE", global = true, hide_env_values = true)]
    pub(crate) redis_ca_file: Option<std::path::PathBuf>,
    /// For rediss:// to a server that asks for client certificates (mutual TLS): this
    /// certificate (PEM file), with --redis-client-key.
    #[arg(
        long,
        env = "REDIS_CLIENT_CERT",
        global = true,
        hide_env_values = true,
        requires = "redis_client_key"
    )]
    pub(crate) redis_client_cert: Option<std::path::PathBuf>,
    /// The private key (PEM file) of --redis-client-cert.
    #[arg(
        long,
        env = "REDIS_CLIENT_KEY",
        global = true,
        hide_env_values = true,
        requires = "redis_client_cert"
    )]
    pub(crate) redis_client_key: Option<std::path::PathBuf>,
    /// Key prefix the coordinators were configured with.
    #[arg(long, default_value = saga_redis::DEFAULT_PREFIX, global = true)]
    pub(crate) key_prefix: String,
    /// Partition count the coordinators were configured with (fixed at deployment).
    #[arg(long, default_value_t = saga_redis::DEFAULT_PARTITIONS, global = true)]
    pub(crate) partitions: u16,
    /// Print one machine-readable JSON document instead of a table.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// How long to keep retrying while Redis is unreachable or briefly unavailable (a
    /// restart, a failover, `CLIENT PAUSE`), from the start of the command, e.g. `30s`, `2m`;
    /// `0s` fails at the first error. Errors a retry cannot fix (a refused password or
    /// permission, an unknown saga) fail at once.
    #[arg(long, default_value = "30s", value_parser = parse_duration, global = true)]
    pub(crate) retry_for: Duration,
}

/// The operator commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List sagas, ordered by id, optionally filtered by status and type.
    List(ListArgs),
    /// Show one saga: status, steps, lease, and its history as a timeline.
    Show {
        /// The saga id (a UUID).
        id: String,
    },
    /// Try a failed (or quarantined) saga again: it resumes where it stopped.
    Retry {
        /// The saga id (a UUID).
        id: String,
        /// Why (recorded in the saga's history).
        #[arg(long, default_value = "retried by an operator (saga-cli)")]
        reason: String,
    },
    /// Ask a running saga to stop and compensate its completed steps.
    Cancel {
        /// The saga id (a UUID).
        id: String,
        /// Why (recorded in the saga's history).
        #[arg(long, default_value = "cancelled by an operator (saga-cli)")]
        reason: String,
    },
    /// Send a signal to a saga, for its workflow's `wait_for_signal(NAME)` (now or later).
    Signal(SignalArgs),
    /// Stop a saga for good WITHOUT compensating what remains (it ends failed/abandoned).
    Abandon {
        /// The saga id (a UUID).
        id: String,
        /// Why (required; recorded in the saga's history).
        #[arg(long)]
        reason: String,
    },
    /// Delete terminal sagas (completed, compensated, failed) last written long enough ago.
    Purge {
        /// Minimum age since the last write, e.g. `7d`, `12h`, `30m`, `0s`.
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
        /// Delete at most this many sagas.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
    },
    /// Counts by status and the most common reasons of recent failures.
    Stats {
        /// How many of the most recently failed sagas to read for failure reasons.
        #[arg(long, default_value_t = 50)]
        failures: usize,
    },
    /// API tokens for the coordinators' HTTP API (needs no Redis).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Submit and follow sagas through the coordinators' HTTP API with a token (needs no
    /// Redis). The token comes from --api-token-file or SAGA_API_TOKEN, never the command
    /// line.
    Api(ApiArgs),
}

/// `saga api ...`: where the API is and how to authenticate.
#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// The coordinators' HTTP API: `http://host:port` or `https://host:port` (required).
    #[arg(long, env = "SAGA_API_URL", global = true, hide_env_values = true)]
    pub(crate) api_url: Option<String>,
    /// A file whose first line is the bearer token (or set SAGA_API_TOKEN).
    #[arg(
        long,
        env = "SAGA_API_TOKEN_FILE",
        global = true,
        hide_env_values = true
    )]
    pub(crate) api_token_file: Option<std::path::PathBuf>,
    /// For https: trust only the CA certificate(s) in this PEM file instead of the
    /// system's (a private CA).
    #[arg(long, env = "SAGA_API_CA_FILE", global = true, hide_env_values = true)]
    pub(crate) api_ca_file: Option<std::path::PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: ApiCommand,
}

/// `saga api start|status|wait|cancel|signal`.
#[derive(Debug, Subcommand)]
pub(crate) enum ApiCommand {
    /// Start a saga of a registered type (needs the `start` scope).
    Start {
        /// The saga type, e.g. `deal_flow`.
        saga_type: String,
        /// The input as JSON, e.g. `'{"company_id": "C-1"}'`.
        #[arg(long)]
        input: String,
        /// An idempotency key: the same key (from the same principal) starts the saga once.
        #[arg(long)]
        key: Option<String>,
    },
    /// A saga's status, output and steps (needs `read`).
    Status {
        /// The saga id (a UUID).
        id: String,
    },
    /// Wait for a saga to end (needs `read`).
    Wait {
        /// The saga id (a UUID).
        id: String,
        /// How long to wait, e.g. `30s`, `2m` (the server may shorten it to its maximum).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Ask a running saga to stop and compensate (needs `operate`).
    Cancel {
        /// The saga id (a UUID).
        id: String,
        /// Why (recorded in the saga's history).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Send a signal to a saga (needs `operate`).
    Signal(SignalArgs),
}

/// `saga signal` and `saga api signal`: which saga, which signal, its payload and key.
#[derive(Debug, Args)]
pub(crate) struct SignalArgs {
    /// The saga id (a UUID).
    pub(crate) id: String,
    /// The signal's name, as the workflow waits for it, e.g. `approval`.
    pub(crate) name: String,
    /// The payload as JSON, e.g. `'{"approved": true}'` (default `null`).
    #[arg(long, conflicts_with = "payload_file")]
    pub(crate) payload: Option<String>,
    /// Read the JSON payload from this file instead.
    #[arg(long, value_name = "PATH")]
    pub(crate) payload_file: Option<std::path::PathBuf>,
    /// The signal's key (required): the same key twice delivers once, so a command repeated
    /// after a lost answer does not signal twice. Use a new key for a new signal.
    #[arg(long)]
    pub(crate) key: String,
}

/// `saga token ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Make a random 256-bit token for a principal: prints the token (give it to the client,
    /// it is shown once) and the line for the server's --api-tokens-file (its hash only).
    New {
        /// The principal's name (letters, digits, `.`, `_`, `-`): it appears in logs and
        /// scopes the principal's idempotency keys.
        name: String,
        /// What it may do, comma-separated: read, start, operate, metrics.
        #[arg(long)]
        scopes: String,
    },
}

/// Filters and paging of `saga list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only sagas with this status (running, compensating, completed, compensated, failed).
    #[arg(long)]
    pub(crate) status: Option<SagaStatus>,
    /// Only sagas of this registered type.
    #[arg(long = "type", value_name = "TYPE")]
    pub(crate) saga_type: Option<String>,
    /// At most this many rows.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) limit: u64,
    /// Continue after this id (the `next` of the previous page).
    #[arg(long, value_name = "ID")]
    pub(crate) after: Option<String>,
}

fn parse_duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}
