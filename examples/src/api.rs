//! The coordinator's HTTP API flags: who may call it (tokens), how it is exposed (HTTPS,
//! probes) and how connections are bounded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use saga_core::Engine;
use saga_http::{ApiTokens, Auth, HttpApi, PrometheusHandle, ServeConfig, TlsConfig};

use crate::ops::BoxError;

/// HTTP API security and limits.
#[derive(Clone, Debug, clap::Args)]
pub struct ApiArgs {
    /// A file of API tokens, one principal a line: `name scopes sha256:<hash>` (scopes from
    /// read, start, operate, metrics; make a token with `saga token new NAME --scopes ...`).
    #[arg(long, env = "SAGA_API_TOKENS_FILE", hide_env_values = true)]
    pub api_tokens_file: Option<PathBuf>,
    /// The same lines in one value (`;` separates entries), for environments without files.
    #[arg(
        long,
        env = "SAGA_API_TOKENS",
        hide_env_values = true,
        conflicts_with = "api_tokens_file"
    )]
    pub api_tokens: Option<String>,
    /// Serve the API without authentication: anyone who reaches it may start, read and
    /// cancel every saga. Allowed on a loopback address only (see the next flag).
    #[arg(long, env = "SAGA_NO_AUTH", hide_env_values = true)]
    pub no_auth: bool,
    /// With --no-auth, serve on a non-loopback address anyway (only behind a proxy that
    /// authenticates every request).
    #[arg(
        long,
        env = "SAGA_NO_AUTH_ON_PUBLIC_ADDRESS",
        hide_env_values = true,
        requires = "no_auth"
    )]
    pub no_auth_on_public_address: bool,
    /// Serve `/metrics` without a token (default: it needs the `metrics` scope).
    #[arg(long, env = "SAGA_PUBLIC_METRICS", hide_env_values = true)]
    pub public_metrics: bool,
    /// Require a token with the `metrics` scope on `/readyz` (default: it is open, as
    /// orchestrators' probes rarely send one). `/healthz` is always open.
    #[arg(long, env = "SAGA_PRIVATE_READYZ", hide_env_values = true)]
    pub private_readyz: bool,
    /// Serve HTTPS with this PEM certificate chain (leaf first); needs --http-tls-key.
    #[arg(
        long,
        env = "SAGA_HTTP_TLS_CERT",
        hide_env_values = true,
        requires = "http_tls_key"
    )]
    pub http_tls_cert: Option<PathBuf>,
    /// The PEM private key of --http-tls-cert.
    #[arg(
        long,
        env = "SAGA_HTTP_TLS_KEY",
        hide_env_values = true,
        requires = "http_tls_cert"
    )]
    pub http_tls_key: Option<PathBuf>,
    /// The most HTTP connections served at once; beyond it a few more answer only
    /// `/healthz` and `/readyz`, and the rest are closed at once.
    #[arg(
        long,
        env = "SAGA_HTTP_MAX_CONNECTIONS",
        hide_env_values = true,
        default_value_t = 1024
    )]
    pub http_max_connections: usize,
    /// How long a client has to send a request's headers (and, on a new connection, to
    /// start sending them).
    #[arg(long, env = "SAGA_HTTP_HEADER_TIMEOUT", hide_env_values = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,
    /// How long a kept-alive connection may stay idle between requests.
    #[arg(long, env = "SAGA_HTTP_IDLE_TIMEOUT", hide_env_values = true, default_value = "60s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,
    /// How long a request may take, body upload included (a wait gets its own maximum on
    /// top).
    #[arg(long, env = "SAGA_HTTP_REQUEST_TIMEOUT", hide_env_values = true, default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_request_timeout: Duration,
}

impl ApiArgs {
    /// Who may call the API, from the flags.
    ///
    /// # Errors
    /// No tokens and no --no-auth, both, or an unusable token file.
    pub fn auth(&self) -> Result<Auth, BoxError> {
        let tokens = match (&self.api_tokens_file, &self.api_tokens) {
            (Some(path), _) => Some(ApiTokens::from_file(path)?),
            (None, Some(text)) => Some(ApiTokens::parse(text)?),
            (None, None) => None,
        };
        match (tokens, self.no_auth) {
            (Some(tokens), false) => Ok(Auth::tokens(tokens)),
            (None, true) => Ok(Auth::Disabled),
            (Some(_), true) => Err("--no-auth contradicts the API tokens given; drop one".into()),
            (None, false) => Err(
                "the HTTP API needs API tokens: give --api-tokens-file (make a token with `saga token new NAME --scopes read,start`), or --no-auth for a development server on a loopback address, or --http-addr off"
                    .into(),
            ),
        }
    }

    /// Connection limits and HTTPS, from the flags.
    ///
    /// # Errors
    /// The certificate or key cannot be used.
    pub fn serve_config(&self) -> Result<ServeConfig, BoxError> {
        let mut config = ServeConfig::default()
            .max_connections(self.http_max_connections)
            .header_read_timeout(self.http_header_timeout)
            .idle_timeout(self.http_idle_timeout);
        if let (Some(cert), Some(key)) = (&self.http_tls_cert, &self.http_tls_key) {
            config = config.tls(TlsConfig::from_pem_files(cert, key)?);
        }
        Ok(config)
    }

    /// Everything the API needs that can be refused before the store is touched: who may
    /// call it (checked against the address it will listen on) and its limits.
    ///
    /// # Errors
    /// See [`ApiArgs::auth`] and [`ApiArgs::serve_config`]; authentication disabled on a
    /// non-loopback address without --no-auth-on-public-address.
    pub fn prepare(&self, addr: SocketAddr) -> Result<(Auth, ServeConfig), BoxError> {
        let auth = self.auth()?;
        saga_http::check_exposure(&auth, addr, self.no_auth_on_public_address)?;
        if let Auth::Tokens(tokens) = &auth {
            let names: Vec<&str> = tokens
                .principals()
                .map(saga_http::Principal::name)
                .collect();
            tracing::info!(principals = ?names, "HTTP API authenticates with bearer tokens");
        }
        Ok((auth, self.serve_config()?))
    }

    /// The API on `engine` for callers authenticated by `auth` (from [`ApiArgs::prepare`]).
    #[must_use]
    pub fn api(&self, engine: Engine, metrics: PrometheusHandle, auth: Auth) -> HttpApi {
        HttpApi::new(engine, auth)
            .metrics(metrics)
            .request_timeout(self.http_request_timeout)
            .public_metrics(self.public_metrics)
            .public_readyz(!self.private_readyz)
    }

    /// `https` or `http`.
    #[must_use]
    pub fn scheme(&self) -> &'static str {
        if self.http_tls_cert.is_some() {
            "https"
        } else {
            "http"
        }
    }
}
