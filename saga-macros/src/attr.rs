//! Parsing and checking the options of `#[saga_step(...)]`.
//!
//! Parsing recovers from every mistake it can: a bad option is reported and left out, and the
//! remaining options still take effect, so the generated step type exists and one mistake does
//! not cascade into errors wherever the step is used.

use std::collections::HashSet;
use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{Expr, ExprLit, ExprPath, ExprUnary, Lit, LitStr, Path, Token, UnOp};

/// The options of `#[saga_step]`, in the order the docs list them.
const OPTIONS: &str = "compensate, compensate_on_failure, pivot, no_compensation, name, timeout, \
                       retry, compensate_retry, reconcile, reconcile_compensation";

/// The keys of `retry(...)` and `compensate_retry(...)`.
const RETRY_KEYS: &str = "max_attempts, initial, max, multiplier, jitter, max_elapsed";

/// `RetryPolicy::default()`'s initial delay. Needed to reject a `max` that the policy would
/// silently raise to it; saga-macros' `expand` test checks that the two agree.
const DEFAULT_INITIAL_DELAY: Duration = Duration::from_millis(100);

/// Collects errors so that all of them are reported at once.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn into_error(self) -> Option<syn::Error> {
        self.0
    }
}

/// What undoes the step.
pub(crate) enum Compensation {
    /// `compensate = path`, with `compensate_on_failure` when `always`.
    Undo { path: Path, always: bool },
    /// `pivot`: the point of no return.
    Pivot,
    /// `no_compensation`: nothing to undo.
    Nothing,
}

/// `timeout = "..."`.
#[derive(Clone, Copy)]
pub(crate) enum Timeout {
    /// `"none"`.
    Off,
    /// A duration above zero.
    After(Duration),
}

/// `jitter = "..."`.
#[derive(Clone, Copy)]
pub(crate) enum Jitter {
    Full,
    Equal,
    None,
}

/// The keys of `retry(...)` or `compensate_retry(...)` that were given.
#[derive(Default)]
pub(crate) struct RetryArgs {
    pub(crate) max_attempts: Option<u32>,
    pub(crate) initial: Option<Duration>,
    pub(crate) max: Option<Duration>,
    pub(crate) multiplier: Option<f32>,
    pub(crate) jitter: Option<Jitter>,
    pub(crate) max_elapsed: Option<Duration>,
}

/// The parsed options.
#[derive(Default)]
pub(crate) struct StepArgs {
    /// `None` when no compensation option was given.
    pub(crate) compensation: Option<Compensation>,
    pub(crate) name: Option<LitStr>,
    pub(crate) timeout: Option<Timeout>,
    pub(crate) retry: Option<RetryArgs>,
    pub(crate) compensate_retry: Option<RetryArgs>,
    pub(crate) reconcile: Option<Path>,
    pub(crate) reconcile_compensation: Option<Path>,
    /// The options did not parse to the end, or one was unknown (perhaps a misspelled
    /// compensation option), or a compensation option was given with a bad value: the
    /// "missing compensation" error would only repeat a mistake already reported.
    pub(crate) skip_missing_check: bool,
}

/// Every option as written, before the combination checks.
#[derive(Default)]
struct Raw {
    seen: HashSet<String>,
    unknown: bool,
    compensate: Option<Path>,
    on_failure: Option<Path>,
    pivot: Option<Path>,
    no_compensation: Option<Path>,
    name: Option<LitStr>,
    timeout: Option<Timeout>,
    retry: Option<RetryArgs>,
    compensate_retry: Option<(Path, RetryArgs)>,
    reconcile: Option<Path>,
    reconcile_compensation: Option<Path>,
}

/// Parses the attribute's arguments. Returns what could be understood and every error found.
pub(crate) fn parse_step_args(args: TokenStream) -> (StepArgs, Errors) {
    let mut raw = Raw::default();
    let mut errors = Errors::default();
    let parsed = syn::meta::parser(|meta| parse_option(&meta, &mut raw, &mut errors)).parse2(args);
    let incomplete = match parsed {
        Ok(()) => false,
        Err(error) => {
            errors.push(error);
            true
        }
    };
    let stated = ["compensate", "pivot", "no_compensation"]
        .iter()
        .any(|key| raw.seen.contains(*key));
    let skip_missing_check = incomplete || raw.unknown || stated;
    let mut args = combine(raw, &mut errors);
    args.skip_missing_check = skip_missing_check;
    (args, errors)
}

fn parse_option(meta: &ParseNestedMeta<'_>, raw: &mut Raw, errors: &mut Errors) -> syn::Result<()> {
    let key = path_key(&meta.path);
    let known = [
        "compensate",
        "compensate_on_failure",
        "pivot",
        "no_compensation",
        "name",
        "timeout",
        "retry",
        "compensate_retry",
        "reconcile",
        "reconcile_compensation",
    ];
    if !known.contains(&key.as_str()) {
        raw.unknown = true;
        errors.push(unknown(
            &meta.path, &key, "option", &known, "options", OPTIONS,
        ));
        return skip_value(meta);
    }
    if !raw.seen.insert(key.clone()) {
        errors.push(syn::Error::new_spanned(
            &meta.path,
            format!("duplicate option `{key}`; each option may be given once"),
        ));
        // Parse the value anyway to reach the next option, and keep the first one.
        let mut ignored = Raw::default();
        return parse_option(meta, &mut ignored, &mut Errors::default());
    }
    match key.as_str() {
        "compensate" => {
            raw.compensate = path_value(meta, &key, "compensate = delete_deal", errors)?;
        }
        "reconcile" => {
            raw.reconcile = path_value(meta, &key, "reconcile = check_deal", errors)?;
        }
        "reconcile_compensation" => {
            raw.reconcile_compensation = path_value(
                meta,
                &key,
                "reconcile_compensation = check_deal_deleted",
                errors,
            )?;
        }
        "compensate_on_failure" => raw.on_failure = flag(meta, &key, errors)?,
        "pivot" => raw.pivot = flag(meta, &key, errors)?,
        "no_compensation" => raw.no_compensation = flag(meta, &key, errors)?,
        "name" => {
            let Some(expr) = expr_value(meta, &key, "name = \"create_deal\"", errors)? else {
                return Ok(());
            };
            match expr {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(name),
                    ..
                }) if name.value().trim().is_empty() => {
                    errors.push(syn::Error::new_spanned(
                        &name,
                        "the step name must not be empty; it identifies the step in the journal",
                    ));
                }
                Expr::Lit(ExprLit {
                    lit: Lit::Str(name),
                    ..
                }) => raw.name = Some(name),
                other => errors.push(syn::Error::new_spanned(
                    other,
                    "expected a string literal: `name = \"create_deal\"`",
                )),
            }
        }
        "timeout" => {
            let example = "timeout = \"10s\"` or `timeout = \"none\"";
            let Some(expr) = expr_value(meta, &key, example, errors)? else {
                return Ok(());
            };
            raw.timeout = timeout_value(&expr, errors);
        }
        // "retry" | "compensate_retry"
        _ => {
            if !meta.input.peek(syn::token::Paren) {
                errors.push(syn::Error::new_spanned(
                    &meta.path,
                    format!(
                        "`{key}` takes a list of settings: `{key}(max_attempts = 5, initial = \
                         \"200ms\", max = \"5s\")`; supported keys are: {RETRY_KEYS}"
                    ),
                ));
                return skip_value(meta);
            }
            let retry = parse_retry(meta, &key, errors)?;
            if key == "retry" {
                raw.retry = Some(retry);
            } else {
                raw.compensate_retry = Some((meta.path.clone(), retry));
            }
        }
    }
    Ok(())
}

/// Applies the rules that involve several options.
fn combine(raw: Raw, errors: &mut Errors) -> StepArgs {
    if let (Some(_), Some(second)) = (&raw.pivot, &raw.no_compensation) {
        errors.push(syn::Error::new_spanned(
            second,
            "choose one of `pivot` and `no_compensation`: `pivot` marks the point of no return \
             (once it has succeeded the saga only goes forward, and nothing is compensated \
             after a later failure), `no_compensation` a step with nothing to undo that leaves \
             the compensation of the other steps as it is",
        ));
    }
    // The marker that counts when both were given (and reported): `pivot`.
    let (marker, nothing) = match (&raw.pivot, &raw.no_compensation) {
        (Some(pivot), _) => (Some(pivot), Some(Compensation::Pivot)),
        (None, Some(no_compensation)) => (Some(no_compensation), Some(Compensation::Nothing)),
        (None, None) => (None, None),
    };
    let mut compensation = nothing;
    if let Some(path) = &raw.compensate {
        if let Some(marker) = marker {
            let why = if raw.pivot.is_some() {
                "a pivot is the point of no return and has nothing to undo; remove `pivot`, \
                 or `compensate` if the step cannot be undone"
            } else {
                "a step either has a compensation or has nothing to undo; remove one of them"
            };
            errors.push(syn::Error::new_spanned(
                marker,
                format!("`{}` contradicts `compensate`: {why}", path_key(marker)),
            ));
        }
        compensation = Some(Compensation::Undo {
            path: path.clone(),
            always: raw.on_failure.is_some(),
        });
    }
    // A `compensate` with a bad value was reported already.
    if !raw.seen.contains("compensate") {
        // Why the option has nothing to work on, when the step says it has no compensation.
        let without = match (&raw.pivot, &raw.no_compensation) {
            (Some(_), _) => {
                "; a `pivot` step (the point of no return) has no compensation: remove the option"
            }
            (None, Some(_)) => "; a `no_compensation` step has no compensation: remove the option",
            (None, None) => "",
        };
        if let Some(flag) = &raw.on_failure {
            errors.push(syn::Error::new_spanned(
                flag,
                format!(
                    "`compensate_on_failure` needs `compensate = <async fn>`: it makes that \
                     compensation run also when the forward action fails{without}"
                ),
            ));
        }
        if let Some((path, _)) = &raw.compensate_retry {
            errors.push(syn::Error::new_spanned(
                path,
                format!(
                    "`compensate_retry` needs `compensate = <async fn>`: a step without a \
                     compensation has nothing to retry{without}"
                ),
            ));
        }
        if let Some(path) = &raw.reconcile_compensation {
            errors.push(syn::Error::new_spanned(
                path,
                format!(
                    "`reconcile_compensation` needs `compensate = <async fn>`: it checks \
                     whether that compensation's undo was applied{without}"
                ),
            ));
        }
    }
    StepArgs {
        compensation,
        name: raw.name,
        timeout: raw.timeout,
        retry: raw.retry,
        compensate_retry: raw.compensate_retry.map(|(_, retry)| retry),
        reconcile: raw.reconcile,
        reconcile_compensation: raw.reconcile_compensation,
        skip_missing_check: false,
    }
}

fn parse_retry(
    meta: &ParseNestedMeta<'_>,
    option: &str,
    errors: &mut Errors,
) -> syn::Result<RetryArgs> {
    let mut retry = RetryArgs::default();
    let mut seen = HashSet::new();
    let mut max_span = None;
    let known = [
        "max_attempts",
        "initial",
        "max",
        "multiplier",
        "jitter",
        "max_elapsed",
    ];
    let mut any_key = false;
    meta.parse_nested_meta(|inner| {
        any_key = true;
        let key = path_key(&inner.path);
        if !known.contains(&key.as_str()) {
            let what = format!("`{option}` key");
            errors.push(unknown(
                &inner.path,
                &key,
                &what,
                &known,
                "keys",
                RETRY_KEYS,
            ));
            return skip_value(&inner);
        }
        let example = match key.as_str() {
            "max_attempts" => "max_attempts = 5",
            "initial" => "initial = \"200ms\"",
            "max" => "max = \"5s\"",
            "multiplier" => "multiplier = 2.0",
            "jitter" => "jitter = \"full\"",
            _ => "max_elapsed = \"1m\"",
        };
        let Some(expr) = expr_value(&inner, &key, example, errors)? else {
            return Ok(());
        };
        if !seen.insert(key.clone()) {
            errors.push(syn::Error::new_spanned(
                &inner.path,
                format!("duplicate key `{key}` in `{option}(...)`; each key may be given once"),
            ));
            return Ok(());
        }
        match key.as_str() {
            "max_attempts" => retry.max_attempts = attempts_value(&expr, errors),
            "multiplier" => retry.multiplier = multiplier_value(&expr, errors),
            "jitter" => retry.jitter = jitter_value(&expr, errors),
            "initial" => retry.initial = duration_value(&expr, &key, true, errors),
            "max" => {
                max_span = Some(span_of(&expr));
                retry.max = duration_value(&expr, &key, true, errors);
            }
            // "max_elapsed"
            _ => retry.max_elapsed = duration_value(&expr, &key, false, errors),
        }
        Ok(())
    })?;
    if !any_key {
        errors.push(syn::Error::new_spanned(
            &meta.path,
            format!("`{option}()` sets nothing; give at least one of: {RETRY_KEYS}"),
        ));
    }
    match (retry.initial, retry.max, max_span) {
        (Some(initial), Some(max), Some(span)) if max < initial => {
            errors.push(syn::Error::new(
                span,
                format!(
                    "`max` ({}) is below `initial` ({}); the cap must be at least the first delay",
                    humantime::format_duration(max),
                    humantime::format_duration(initial)
                ),
            ));
            retry.max = None;
        }
        (None, Some(max), Some(span)) if max < DEFAULT_INITIAL_DELAY => {
            errors.push(syn::Error::new(
                span,
                format!(
                    "`max` ({}) is below the default initial delay ({}); set `initial` too",
                    humantime::format_duration(max),
                    humantime::format_duration(DEFAULT_INITIAL_DELAY)
                ),
            ));
            retry.max = None;
        }
        _ => {}
    }
    Ok(retry)
}

/// The option's name as written: a single identifier, or the whole path.
pub(crate) fn path_key(path: &Path) -> String {
    match path.get_ident() {
        Some(ident) => ident.to_string(),
        None => quote::quote!(#path).to_string().replace(' ', ""),
    }
}

fn span_of<T: quote::ToTokens>(tokens: &T) -> Span {
    tokens
        .to_token_stream()
        .into_iter()
        .next()
        .map_or_else(Span::call_site, |token| token.span())
}

pub(crate) fn unknown(
    path: &Path,
    key: &str,
    what: &str,
    known: &[&str],
    plural: &str,
    list: &str,
) -> syn::Error {
    let suggestion = known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| format!(" (did you mean `{candidate}`?)"))
        .unwrap_or_default();
    syn::Error::new_spanned(
        path,
        format!("unknown {what} `{key}`{suggestion}; supported {plural} are: {list}"),
    )
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Consumes whatever follows an option that is being rejected, to reach the next one.
pub(crate) fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.value()?.parse::<Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        meta.input.parse::<proc_macro2::TokenTree>()?;
    }
    Ok(())
}

fn flag(meta: &ParseNestedMeta<'_>, key: &str, errors: &mut Errors) -> syn::Result<Option<Path>> {
    if meta.input.peek(Token![=]) || meta.input.peek(syn::token::Paren) {
        errors.push(syn::Error::new_spanned(
            &meta.path,
            format!("`{key}` is a flag and takes no value: write just `{key}`"),
        ));
        skip_value(meta)?;
        return Ok(None);
    }
    Ok(Some(meta.path.clone()))
}

/// The expression after `key =`, or `None` (with an error) when there is no `=`.
pub(crate) fn expr_value(
    meta: &ParseNestedMeta<'_>,
    key: &str,
    example: &str,
    errors: &mut Errors,
) -> syn::Result<Option<Expr>> {
    if !meta.input.peek(Token![=]) {
        errors.push(syn::Error::new_spanned(
            &meta.path,
            format!("`{key}` needs a value: `{example}`"),
        ));
        skip_value(meta)?;
        return Ok(None);
    }
    Ok(Some(meta.value()?.parse()?))
}

fn path_value(
    meta: &ParseNestedMeta<'_>,
    key: &str,
    example: &str,
    errors: &mut Errors,
) -> syn::Result<Option<Path>> {
    let Some(expr) = expr_value(meta, key, example, errors)? else {
        return Ok(None);
    };
    match expr {
        Expr::Path(ExprPath {
            qself: None,
            path,
            attrs,
        }) if attrs.is_empty() => Ok(Some(path)),
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => {
            errors.push(syn::Error::new_spanned(
                &lit,
                format!(
                    "expected the path of an async fn, not a string: `{key} = {}`",
                    lit.value()
                ),
            ));
            Ok(None)
        }
        other => {
            errors.push(syn::Error::new_spanned(
                other,
                format!("expected the path of an async fn: `{example}`"),
            ));
            Ok(None)
        }
    }
}

fn timeout_value(expr: &Expr, errors: &mut Errors) -> Option<Timeout> {
    if let Expr::Lit(ExprLit {
        lit: Lit::Str(lit), ..
    }) = expr
        && lit.value() == "none"
    {
        return Some(Timeout::Off);
    }
    let duration = duration_value(expr, "timeout", false, errors)?;
    Some(Timeout::After(duration))
}

/// A humantime duration string; zero is refused unless `zero_ok`.
fn duration_value(expr: &Expr, key: &str, zero_ok: bool, errors: &mut Errors) -> Option<Duration> {
    let none_hint = if key == "timeout" {
        ", or \"none\" for no timeout"
    } else {
        ""
    };
    let Expr::Lit(ExprLit {
        lit: Lit::Str(lit), ..
    }) = expr
    else {
        errors.push(syn::Error::new_spanned(
            expr,
            format!(
                "expected a duration string such as \"200ms\", \"10s\" or \"1m 30s\"{none_hint}"
            ),
        ));
        return None;
    };
    match humantime::parse_duration(&lit.value()) {
        Ok(duration) if duration.is_zero() && !zero_ok => {
            errors.push(syn::Error::new_spanned(
                lit,
                format!("`{key}` must be greater than zero{none_hint}"),
            ));
            None
        }
        Ok(duration) => Some(duration),
        Err(error) => {
            errors.push(syn::Error::new_spanned(
                lit,
                format!(
                    "invalid duration {:?} for `{key}`: {error}; expected a duration such as \
                     \"200ms\", \"10s\" or \"1m 30s\"{none_hint}",
                    lit.value()
                ),
            ));
            None
        }
    }
}

fn attempts_value(expr: &Expr, errors: &mut Errors) -> Option<u32> {
    let message = "`max_attempts` must be an integer of at least 1 (1 means no retry)";
    let attempts = match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => lit.base10_parse::<u32>().ok(),
        _ => None,
    };
    match attempts {
        Some(attempts) if attempts >= 1 => Some(attempts),
        _ => {
            errors.push(syn::Error::new_spanned(expr, message));
            None
        }
    }
}

fn multiplier_value(expr: &Expr, errors: &mut Errors) -> Option<f32> {
    fn number(expr: &Expr) -> Option<f64> {
        match expr {
            Expr::Lit(ExprLit {
                lit: Lit::Float(lit),
                ..
            }) => lit.base10_parse().ok(),
            Expr::Lit(ExprLit {
                lit: Lit::Int(lit), ..
            }) => lit.base10_parse().ok(),
            Expr::Unary(ExprUnary {
                op: UnOp::Neg(_),
                expr,
                ..
            }) => number(expr).map(|n| -n),
            _ => None,
        }
    }
    // The policy stores an `f32`; a value that is finite as `f64` may not be as `f32`.
    #[allow(clippy::cast_possible_truncation)]
    let multiplier = number(expr).map(|n| n as f32);
    match multiplier {
        Some(multiplier) if multiplier.is_finite() && multiplier >= 1.0 => Some(multiplier),
        Some(multiplier) => {
            errors.push(syn::Error::new_spanned(
                expr,
                format!(
                    "`multiplier` must be a finite number of at least 1.0 (delays never \
                     shrink), got {multiplier}"
                ),
            ));
            None
        }
        None => {
            errors.push(syn::Error::new_spanned(
                expr,
                "`multiplier` must be a number of at least 1.0, such as `2.0`",
            ));
            None
        }
    }
}

fn jitter_value(expr: &Expr, errors: &mut Errors) -> Option<Jitter> {
    let jitter = match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => match lit.value().as_str() {
            "full" => Some(Jitter::Full),
            "equal" => Some(Jitter::Equal),
            "none" => Some(Jitter::None),
            _ => None,
        },
        _ => None,
    };
    if jitter.is_none() {
        errors.push(syn::Error::new_spanned(
            expr,
            "`jitter` must be one of \"full\", \"equal\" or \"none\"",
        ));
    }
    jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names() {
        assert_eq!(edit_distance("compensate", "compensate"), 0);
        assert_eq!(edit_distance("compenstae", "compensate"), 2);
        assert_eq!(edit_distance("timout", "timeout"), 1);
    }

    #[test]
    fn parses_every_option() {
        let (args, errors) = parse_step_args(quote::quote!(
            compensate = undo,
            compensate_on_failure,
            name = "x",
            timeout = "none",
            retry(
                max_attempts = 2,
                initial = "1s",
                max = "2s",
                multiplier = 3,
                jitter = "equal",
                max_elapsed = "1m"
            ),
            compensate_retry(max_attempts = 9),
            reconcile = check,
            reconcile_compensation = check_undo,
        ));
        assert!(errors.into_error().is_none());
        assert!(matches!(
            args.compensation,
            Some(Compensation::Undo { always: true, .. })
        ));
        assert!(matches!(args.timeout, Some(Timeout::Off)));
        let retry = args.retry.unwrap_or_default();
        assert_eq!(retry.max_attempts, Some(2));
        assert_eq!(retry.multiplier, Some(3.0));
        assert_eq!(retry.max_elapsed, Some(Duration::from_secs(60)));
        assert!(args.reconcile.is_some());
        assert!(args.reconcile_compensation.is_some());
    }

    #[test]
    fn pivot_and_no_compensation_differ() {
        let (args, errors) = parse_step_args(quote::quote!(pivot));
        assert!(errors.into_error().is_none());
        assert!(matches!(args.compensation, Some(Compensation::Pivot)));
        let (args, errors) = parse_step_args(quote::quote!(no_compensation));
        assert!(errors.into_error().is_none());
        assert!(matches!(args.compensation, Some(Compensation::Nothing)));
        let (_, errors) = parse_step_args(quote::quote!(pivot, no_compensation));
        let message = errors.into_error().map(|error| error.to_string());
        assert!(message.is_some_and(|message| message.starts_with("choose one")));
    }

    #[test]
    fn reports_every_mistake_at_once() {
        let (_, errors) = parse_step_args(quote::quote!(
            bogus,
            pivot,
            name = "",
            timeout = "soon",
            retry(max_attempts = 0)
        ));
        let count = errors
            .into_error()
            .map_or(0, |error| error.into_iter().count());
        assert_eq!(count, 4);
    }
}
