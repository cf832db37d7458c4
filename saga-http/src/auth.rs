//! Who may call the API: bearer tokens, the principals they name and the scopes they grant.
//!
//! Tokens are configured as SHA-256 hashes only (the server never holds a usable token), one
//! principal a line:
//!
//! ```text
//! # name      scopes              token hash
//! deal-intake start,read          sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
//! operations  read,operate,metrics sha256:…
//! ```
//!
//! A presented token is hashed and compared with every configured hash in constant time, so
//! neither the comparison nor the order of the lines tells an attacker anything. Generate a
//! token with [`GeneratedToken::new`] (or `saga token new` on the command line).

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq as _;

use crate::error::ApiError;

/// What a principal may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Scope {
    /// Read sagas: status, history, wait.
    Read,
    /// Start sagas.
    Start,
    /// Act on sagas: cancel (and later retry, abandon, signals).
    Operate,
    /// Scrape `/metrics` (unless metrics are public).
    Metrics,
}

impl Scope {
    /// Every scope, in the order they are documented.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Start, Scope::Operate, Scope::Metrics];

    /// The scope's name in token files: `read`, `start`, `operate`, `metrics`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Start => "start",
            Scope::Operate => "operate",
            Scope::Metrics => "metrics",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == text)
            .ok_or_else(|| {
                format!("unknown scope `{text}`; the scopes are read, start, operate and metrics")
            })
    }
}

/// Parses `read,start` into scopes.
///
/// # Errors
/// An empty list or an unknown scope name.
pub fn parse_scopes(text: &str) -> Result<BTreeSet<Scope>, String> {
    let scopes = text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(Scope::from_str)
        .collect::<Result<BTreeSet<_>, _>>()?;
    if scopes.is_empty() {
        return Err("no scopes given; name at least one of read, start, operate, metrics".into());
    }
    Ok(scopes)
}

/// An authenticated caller: a name (used in logs and to scope idempotency keys) and scopes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    name: String,
    scopes: BTreeSet<Scope>,
}

impl Principal {
    /// A principal named `name` with `scopes`.
    ///
    /// # Errors
    /// The name is empty, longer than 64 bytes, or has characters other than ASCII letters,
    /// digits, `.`, `_` and `-` (names become part of idempotency keys and log lines).
    pub fn new(name: &str, scopes: BTreeSet<Scope>) -> Result<Self, String> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(format!(
                "principal name `{name}` is not 1 to 64 ASCII letters, digits, `.`, `_` or `-`"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            scopes,
        })
    }

    /// The principal's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The scopes it was granted.
    #[must_use]
    pub fn scopes(&self) -> &BTreeSet<Scope> {
        &self.scopes
    }

    /// Whether it was granted `scope`.
    #[must_use]
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// The idempotency key under which this principal's `key` is stored: keys are scoped to
    /// the principal that used them, so one client can neither squat nor probe another's.
    #[must_use]
    pub fn scoped_key(&self, key: &str) -> String {
        // Names cannot contain `/`, so the split is unambiguous.
        format!("{}/{key}", self.name)
    }

    fn scope_list(&self) -> String {
        let names: Vec<&str> = self.scopes.iter().map(|s| s.as_str()).collect();
        names.join(",")
    }
}

/// A token configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenConfigError {
    /// The token file cannot be read.
    #[error("cannot read the API token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `name scopes sha256:<64 hex digits>`.
    #[error("API tokens, line {line}: {problem}")]
    Line {
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// No token is configured: nobody could call the API.
    #[error(
        "no API token is configured; add a line `name scopes sha256:<hash>` (generate one with `saga token new NAME --scopes read,start`), or disable authentication explicitly"
    )]
    Empty,
}

/// The configured tokens: their hashes and the principals they name.
#[derive(Clone)]
pub struct ApiTokens {
    entries: Vec<(TokenHash, Arc<Principal>)>,
}

type TokenHash = [u8; 32];

impl fmt::Debug for ApiTokens {
    // Names and scopes only: even hashes stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.entries
                    .iter()
                    .map(|(_, p)| format!("{} ({})", p.name, p.scope_list())),
            )
            .finish()
    }
}

impl ApiTokens {
    /// Parses a token configuration: one `name scopes sha256:<hex>` a line (the hash is
    /// `sha256sum` of the token, see [`hash_token`]), `#` comments and blank lines ignored;
    /// `;` also separates entries, so the whole configuration fits in one environment
    /// variable.
    ///
    /// # Errors
    /// A malformed line, a repeated name or hash, or no token at all.
    pub fn parse(text: &str) -> Result<Self, TokenConfigError> {
        let mut entries: Vec<(TokenHash, Arc<Principal>)> = Vec::new();
        let lines = text
            .lines()
            .enumerate()
            .flat_map(|(n, line)| line.split(';').map(move |entry| (n + 1, entry)));
        for (line, entry) in lines {
            let entry = entry.split('#').next().unwrap_or_default().trim();
            if entry.is_empty() {
                continue;
            }
            let bad = |problem: String| TokenConfigError::Line { line, problem };
            let fields: Vec<&str> = entry.split_whitespace().collect();
            let [name, scopes, hash] = fields[..] else {
                return Err(bad(format!(
                    "expected `name scopes sha256:<hash>`, found {} field(s)",
                    fields.len()
                )));
            };
            let principal =
                Principal::new(name, parse_scopes(scopes).map_err(&bad)?).map_err(&bad)?;
            let hash = parse_hash(hash).map_err(&bad)?;
            if entries.iter().any(|(_, p)| p.name == principal.name) {
                return Err(bad(format!("principal `{name}` is configured twice")));
            }
            if entries.iter().any(|(h, _)| h == &hash) {
                return Err(bad(format!(
                    "principal `{name}` has the same token as another principal; give each its own"
                )));
            }
            entries.push((hash, Arc::new(principal)));
        }
        if entries.is_empty() {
            return Err(TokenConfigError::Empty);
        }
        Ok(Self { entries })
    }

    /// Reads and parses a token file.
    ///
    /// # Errors
    /// The file cannot be read, or [`ApiTokens::parse`] refuses it.
    pub fn from_file(path: &Path) -> Result<Self, TokenConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The principal `token` belongs to. Every configured hash is compared, in constant
    /// time, whatever matches.
    #[must_use]
    pub fn authenticate(&self, token: &str) -> Option<Arc<Principal>> {
        let presented = sha256(token.as_bytes());
        let mut found = None;
        for (hash, principal) in &self.entries {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(principal.clone());
            }
        }
        found
    }

    /// The configured principals.
    pub fn principals(&self) -> impl Iterator<Item = &Principal> {
        self.entries.iter().map(|(_, p)| p.as_ref())
    }
}

fn parse_hash(text: &str) -> Result<TokenHash, String> {
    let Some(hex) = text.strip_prefix("sha256:") else {
        return Err(
            "the token must be given as its hash `sha256:<64 hex digits>` (never the token itself)"
                .into(),
        );
    };
    let bytes = hex.as_bytes();
    if bytes.len() != 64 || !bytes.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!(
            "`sha256:{hex}` is not 64 hex digits (a SHA-256 hash)"
        ));
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(bytes.chunks_exact(2)) {
        let high = hex_value(pair[0]);
        let low = hex_value(pair[1]);
        *byte = (high << 4) | low;
    }
    Ok(hash)
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        // Callers check `is_ascii_hexdigit` first.
        _ => 0,
    }
}

fn sha256(bytes: &[u8]) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// The hash of `token` as it is written in a token file: `sha256:<hex>`.
#[must_use]
pub fn hash_token(token: &str) -> String {
    let hash = sha256(token.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A fresh random token (256 bits from the operating system's generator) and the line that
/// configures it.
#[derive(Clone)]
pub struct GeneratedToken {
    /// The token to give the client (`saga_` and 64 hex digits). Shown once; only its hash
    /// is configured on the server.
    pub token: String,
    /// The token file line: `name scopes sha256:<hash>`.
    pub config_line: String,
}

impl fmt::Debug for GeneratedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The line carries the hash: keep both out of logs.
        f.debug_struct("GeneratedToken").finish_non_exhaustive()
    }
}

impl GeneratedToken {
    /// A token for `principal`.
    ///
    /// # Errors
    /// The operating system's random generator failed.
    pub fn new(principal: &Principal) -> Result<Self, String> {
        use ring::rand::SecureRandom as _;
        let mut secret = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| "the operating system's random generator failed".to_owned())?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let token = format!("saga_{hex}");
        let config_line = format!(
            "{} {} {}",
            principal.name,
            principal.scope_list(),
            hash_token(&token)
        );
        Ok(Self { token, config_line })
    }
}

/// How the API authenticates its callers.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Auth {
    /// Bearer tokens: every route but `/healthz` (and `/readyz`, `/metrics` where configured
    /// public) needs a token with the route's scope.
    Tokens(Arc<ApiTokens>),
    /// No authentication: anyone who reaches the port may do anything. Only for development
    /// on a loopback address (see [`check_exposure`]).
    Disabled,
}

impl Auth {
    /// Authentication with `tokens`.
    #[must_use]
    pub fn tokens(tokens: ApiTokens) -> Self {
        Auth::Tokens(Arc::new(tokens))
    }

    /// Whether callers must authenticate.
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        matches!(self, Auth::Tokens(_))
    }
}

/// Serving without authentication on an address other hosts can reach.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to serve the HTTP API without authentication on {addr}, which is not a loopback address: anyone who reaches it could start, read and cancel every saga. Configure API tokens, bind 127.0.0.1, or (only behind a proxy that authenticates) insist explicitly"
)]
pub struct ExposureError {
    /// The address.
    pub addr: SocketAddr,
}

/// Checks that an API without authentication listens on a loopback address only, unless the
/// operator insists (`allow_public`), in which case it logs a loud warning.
///
/// # Errors
/// [`ExposureError`] for authentication disabled on a non-loopback address without
/// `allow_public`.
pub fn check_exposure(
    auth: &Auth,
    addr: SocketAddr,
    allow_public: bool,
) -> Result<(), ExposureError> {
    if auth.is_enabled() {
        return Ok(());
    }
    if addr.ip().is_loopback() {
        tracing::warn!(%addr, "HTTP API authentication is disabled (loopback address only)");
        return Ok(());
    }
    if allow_public {
        tracing::error!(
            %addr,
            "HTTP API authentication is DISABLED on a non-loopback address: anyone who reaches {addr} can start, read and cancel every saga"
        );
        return Ok(());
    }
    Err(ExposureError { addr })
}

/// The principal a request was authenticated as, in the request's extensions; absent when
/// authentication is disabled.
#[derive(Clone, Debug)]
pub(crate) struct Caller(pub(crate) Arc<Principal>);

/// What a route needs: the auth mode and the scope.
#[derive(Clone)]
pub(crate) struct Requirement {
    pub(crate) auth: Auth,
    pub(crate) scope: Scope,
}

/// Middleware: lets the request through when it carries a token with the route's scope.
pub(crate) async fn require_scope(
    State(requirement): State<Requirement>,
    mut request: Request,
    next: Next,
) -> Response {
    let Auth::Tokens(tokens) = &requirement.auth else {
        return next.run(request).await;
    };
    let scope = requirement.scope;
    let principal = match bearer_token(&request) {
        Err(problem) => return unauthenticated(problem, "invalid_request"),
        Ok(None) => {
            return unauthenticated(
                format!(
                    "this route needs an API token with the `{scope}` scope: send `Authorization: Bearer <token>`"
                ),
                "",
            );
        }
        Ok(Some(token)) => match tokens.authenticate(token) {
            Some(principal) => principal,
            None => {
                return unauthenticated(
                    "the API token is not valid (unknown or revoked)".to_owned(),
                    "invalid_token",
                );
            }
        },
    };
    if !principal.may(scope) {
        metrics::counter!(crate::metrics::HTTP_AUTH_FAILURES_TOTAL, "reason" => "forbidden")
            .increment(1);
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "principal `{}` may not do this: the route needs the `{scope}` scope and the token grants {}",
                principal.name,
                principal.scope_list()
            ),
        )
        .with("principal", principal.name.clone())
        .with("required_scope", scope.as_str())
        .into_response();
    }
    request.extensions_mut().insert(Caller(principal));
    next.run(request).await
}

fn bearer_token(request: &Request) -> Result<Option<&str>, String> {
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("send the Authorization header once".into());
    }
    let text = value
        .to_str()
        .map_err(|_| "the Authorization header is not visible ASCII".to_owned())?;
    let (kind, token) = text.split_once(' ').unwrap_or((text, ""));
    if !kind.eq_ignore_ascii_case("bearer") {
        return Err("the Authorization header must be `Bearer <token>`".into());
    }
    let token = token.trim();
    if token.is_empty() {
        return Err("the Authorization header has no token after `Bearer`".into());
    }
    Ok(Some(token))
}

fn unauthenticated(message: String, oauth_error: &str) -> Response {
    let reason = if oauth_error.is_empty() {
        "missing"
    } else {
        oauth_error
    };
    metrics::counter!(crate::metrics::HTTP_AUTH_FAILURES_TOTAL, "reason" => reason.to_owned())
        .increment(1);
    let code = if oauth_error == "invalid_token" {
        "bad_token"
    } else {
        "unauthenticated"
    };
    let challenge = if oauth_error.is_empty() {
        "Bearer realm=\"saga\"".to_owned()
    } else {
        format!("Bearer realm=\"saga\", error=\"{oauth_error}\"")
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn principal(name: &str, scopes: &str) -> Principal {
        Principal::new(name, parse_scopes(scopes).unwrap()).unwrap()
    }

    #[test]
    fn a_generated_token_authenticates_as_its_principal_only() {
        let intake = GeneratedToken::new(&principal("intake", "start,read")).unwrap();
        let ops = GeneratedToken::new(&principal("ops", "operate")).unwrap();
        let config = format!(
            "# tokens\n{}\n\n{}  # ops team\n",
            intake.config_line, ops.config_line
        );
        let tokens = ApiTokens::parse(&config).unwrap();
        let found = tokens.authenticate(&intake.token).unwrap();
        assert_eq!(found.name(), "intake");
        assert!(found.may(Scope::Start) && found.may(Scope::Read) && !found.may(Scope::Operate));
        assert_eq!(tokens.authenticate(&ops.token).unwrap().name(), "ops");
        assert!(tokens.authenticate("saga_0000").is_none());
        assert!(tokens.authenticate("").is_none());
        // Neither the token nor its hash reaches Debug output.
        let debug = format!("{tokens:?} {intake:?}");
        assert!(!debug.contains(&intake.token) && !debug.contains("sha256"));
        assert_ne!(intake.token, ops.token);
    }

    #[test]
    fn semicolons_separate_entries_in_one_line() {
        let a = hash_token("a-token");
        let b = hash_token("b-token");
        let tokens = ApiTokens::parse(&format!("a read {a}; b start {b}")).unwrap();
        assert_eq!(tokens.authenticate("b-token").unwrap().name(), "b");
    }

    #[test]
    fn bad_configurations_are_refused_with_the_line() {
        let hash = hash_token("x");
        let cases = [
            ("", "no API token"),
            ("# only a comment", "no API token"),
            ("a read", "found 2 field(s)"),
            ("a read plain-token", "never the token itself"),
            ("a read sha256:abc", "not 64 hex digits"),
            (&format!("a write {hash}"), "unknown scope `write`"),
            (&format!("a , {hash}"), "no scopes"),
            (&format!("a/b read {hash}"), "principal name"),
            (
                &format!("a read {hash}\na start {}", hash_token("y")),
                "configured twice",
            ),
            (&format!("a read {hash}\nb start {hash}"), "same token"),
        ];
        for (config, expected) in cases {
            let err = ApiTokens::parse(config).unwrap_err().to_string();
            assert!(err.contains(expected), "{config:?}: {err}");
        }
        let err = ApiTokens::parse(&format!("a read {hash}\nb read sha256:zz")).unwrap_err();
        assert!(err.to_string().starts_with("API tokens, line 2:"), "{err}");
    }

    #[test]
    fn hashes_match_the_sha256_of_the_token() {
        // `printf %s password | sha256sum`
        assert_eq!(
            hash_token("password"),
            "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
        let upper = "sha256:5E884898DA28047151D0E56F8DC6292773603D0D6AABBDD62A11EF721D1542D8";
        let tokens = ApiTokens::parse(&format!("a read {upper}")).unwrap();
        assert!(tokens.authenticate("password").is_some());
    }

    #[test]
    fn exposure_without_auth_is_loopback_only_unless_insisted() {
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let v6_loopback: SocketAddr = "[::1]:8080".parse().unwrap();
        assert!(check_exposure(&Auth::Disabled, loopback, false).is_ok());
        assert!(check_exposure(&Auth::Disabled, v6_loopback, false).is_ok());
        let err = check_exposure(&Auth::Disabled, public, false).unwrap_err();
        assert!(err.to_string().contains("0.0.0.0:8080"));
        assert!(check_exposure(&Auth::Disabled, public, true).is_ok());
        let tokens = ApiTokens::parse(&format!("a read {}", hash_token("t"))).unwrap();
        assert!(check_exposure(&Auth::tokens(tokens), public, false).is_ok());
    }

    #[test]
    fn scoped_keys_differ_between_principals() {
        let a = principal("a", "start");
        let b = principal("b", "start");
        assert_ne!(a.scoped_key("order-1"), b.scoped_key("order-1"));
        assert_eq!(a.scoped_key("order-1"), "a/order-1");
    }
}
