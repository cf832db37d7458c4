//! `saga token new`: a fresh API token for the HTTP API and the line that configures it.
//! Needs no store: the token is shown once, and only its hash goes into the server's file.

use saga_http::{GeneratedToken, Principal};
use serde::Serialize;

use crate::error::CliError;
use crate::output::Report;

/// A new token and its configuration line.
#[derive(Serialize)]
pub(crate) struct TokenReport {
    /// The principal's name.
    principal: String,
    /// The scopes granted.
    scopes: Vec<String>,
    /// The bearer token, for the client only (shown once).
    token: String,
    /// The line for the server's token file (`--api-tokens-file`): name, scopes, hash.
    config_line: String,
}

// Output only: the token is the whole point of the report, so it has no Debug form that
// could leak it into a log by accident.
impl std::fmt::Debug for TokenReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReport")
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

/// Makes a token for `name` with `scopes` (`read,start,...`).
pub(crate) fn new(name: &str, scopes: &str) -> Result<TokenReport, CliError> {
    let scopes =
        saga_http::parse_scopes(scopes).map_err(|err| CliError::new(format!("--scopes: {err}")))?;
    let principal = Principal::new(name, scopes).map_err(CliError::new)?;
    let generated = GeneratedToken::new(&principal).map_err(CliError::new)?;
    Ok(TokenReport {
        principal: principal.name().to_owned(),
        scopes: principal
            .scopes()
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect(),
        token: generated.token,
        config_line: generated.config_line,
    })
}

impl Report for TokenReport {
    fn text(&self) -> String {
        // The token alone on the first line, so `head -1` hands it to a client; the line for
        // the server after it, as a comment a token file would ignore.
        format!("{}\n# config: {}\n", self.token, self.config_line)
    }
}
