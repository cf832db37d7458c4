//! Parsing and checking the options of `#[saga(...)]`.
//!
//! As for `#[saga_step]`, a bad option is reported and left out, and the others still take
//! effect, so that the saga type exists and one mistake does not cascade.

use std::collections::HashSet;

use proc_macro2::TokenStream;
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{Expr, ExprLit, ExprUnary, Lit, LitInt, LitStr, UnOp};

use crate::attr::{Errors, expr_value, path_key, skip_value, unknown};

/// The options of `#[saga]`, in the order the docs list them.
const OPTIONS: &str = "name, version";
const KNOWN: [&str; 2] = ["name", "version"];

/// The parsed options; `None` when not given (or given with a bad value, reported).
#[derive(Default)]
pub(crate) struct SagaArgs {
    pub(crate) name: Option<LitStr>,
    pub(crate) version: Option<u32>,
}

/// Parses the attribute's arguments. Returns what could be understood and every error found.
pub(crate) fn parse_saga_args(args: TokenStream) -> (SagaArgs, Errors) {
    let mut parsed = SagaArgs::default();
    let mut seen = HashSet::new();
    let mut errors = Errors::default();
    let result = syn::meta::parser(|meta| parse_option(&meta, &mut parsed, &mut seen, &mut errors))
        .parse2(args);
    if let Err(error) = result {
        errors.push(error);
    }
    (parsed, errors)
}

fn parse_option(
    meta: &ParseNestedMeta<'_>,
    args: &mut SagaArgs,
    seen: &mut HashSet<String>,
    errors: &mut Errors,
) -> syn::Result<()> {
    let key = path_key(&meta.path);
    if !KNOWN.contains(&key.as_str()) {
        errors.push(unknown(
            &meta.path, &key, "option", &KNOWN, "options", OPTIONS,
        ));
        return skip_value(meta);
    }
    let example = if key == "name" {
        "name = \"deal_flow\""
    } else {
        "version = 2"
    };
    let Some(expr) = expr_value(meta, &key, example, errors)? else {
        return Ok(());
    };
    if !seen.insert(key.clone()) {
        errors.push(syn::Error::new_spanned(
            &meta.path,
            format!("duplicate option `{key}`; each option may be given once"),
        ));
        return Ok(());
    }
    if key == "name" {
        args.name = name_value(&expr, errors);
    } else {
        args.version = version_value(&expr, errors);
    }
    Ok(())
}

fn name_value(expr: &Expr, errors: &mut Errors) -> Option<LitStr> {
    let Expr::Lit(ExprLit {
        lit: Lit::Str(name),
        ..
    }) = expr
    else {
        errors.push(syn::Error::new_spanned(
            expr,
            "expected a string literal: `name = \"deal_flow\"`",
        ));
        return None;
    };
    let value = name.value();
    if value.trim().is_empty() {
        errors.push(syn::Error::new_spanned(
            name,
            "the saga name must not be empty: it identifies the saga type in the store",
        ));
        return None;
    }
    if value.trim() != value {
        errors.push(syn::Error::new_spanned(
            name,
            format!(
                "the saga name {value:?} starts or ends with whitespace; write it without: \
                 sagas are found by their exact name"
            ),
        ));
        return None;
    }
    Some(name.clone())
}

fn version_value(expr: &Expr, errors: &mut Errors) -> Option<u32> {
    let lit = match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => lit,
        Expr::Unary(ExprUnary {
            op: UnOp::Neg(_), ..
        }) => {
            errors.push(syn::Error::new_spanned(
                expr,
                "`version` cannot be negative: versions count up from 1 (the default)",
            ));
            return None;
        }
        other => {
            errors.push(syn::Error::new_spanned(
                other,
                "expected an integer literal of at least 1: `version = 2`",
            ));
            return None;
        }
    };
    let version = version_number(lit);
    if version.is_none() {
        let message = match (lit.suffix(), lit.base10_parse::<u32>()) {
            ("" | "u32", Ok(_)) => format!(
                "`version` must be at least 1: versions count up from 1 (the default), got {}",
                lit.base10_digits()
            ),
            ("" | "u32", Err(_)) => format!(
                "`version` {} is too large: it is a `u32`, at most {}",
                lit.base10_digits(),
                u32::MAX
            ),
            (suffix, _) => format!(
                "`version` is a `u32`: write it without the `{suffix}` suffix, like \
                 `version = {}`",
                lit.base10_digits()
            ),
        };
        errors.push(syn::Error::new_spanned(lit, message));
    }
    version
}

/// The version when it is a valid one: at least 1, fitting a `u32`, with no other type
/// suffix.
fn version_number(lit: &LitInt) -> Option<u32> {
    if !matches!(lit.suffix(), "" | "u32") {
        return None;
    }
    lit.base10_parse::<u32>()
        .ok()
        .filter(|version| *version >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_options() {
        let (args, errors) = parse_saga_args(quote::quote!(name = "deal_flow", version = 2));
        assert!(errors.into_error().is_none());
        assert_eq!(
            args.name.map(|name| name.value()).as_deref(),
            Some("deal_flow")
        );
        assert_eq!(args.version, Some(2));
    }

    #[test]
    fn options_are_optional() {
        let (args, errors) = parse_saga_args(TokenStream::new());
        assert!(errors.into_error().is_none());
        assert!(args.name.is_none());
        assert!(args.version.is_none());
    }

    #[test]
    fn reports_every_mistake_at_once() {
        let (args, errors) = parse_saga_args(quote::quote!(
            nmae = "x",
            name = " deal_flow",
            version = 0,
            version = 3
        ));
        let messages: Vec<String> = errors
            .into_error()
            .map(|error| error.into_iter().map(|error| error.to_string()).collect())
            .unwrap_or_default();
        assert_eq!(messages.len(), 4, "{messages:?}");
        assert!(messages[0].contains("did you mean `name`?"));
        assert!(messages[1].contains("whitespace"));
        assert!(messages[2].contains("at least 1"));
        assert!(messages[3].contains("duplicate option `version`"));
        assert!(args.name.is_none());
        assert!(args.version.is_none());
    }

    #[test]
    fn version_limits() {
        let version = |tokens: TokenStream| {
            let (args, errors) = parse_saga_args(tokens);
            (
                args.version,
                errors.into_error().map(|error| error.to_string()),
            )
        };
        assert_eq!(
            version(quote::quote!(version = 4294967295)).0,
            Some(u32::MAX)
        );
        assert_eq!(version(quote::quote!(version = 7u32)).0, Some(7));
        let (none, error) = version(quote::quote!(version = 4294967296));
        assert!(none.is_none() && error.is_some_and(|error| error.contains("too large")));
        let (none, error) = version(quote::quote!(version = -1));
        assert!(none.is_none() && error.is_some_and(|error| error.contains("negative")));
        let (none, error) = version(quote::quote!(version = 2u8));
        assert!(none.is_none() && error.is_some_and(|error| error.contains("suffix")));
        let (none, error) = version(quote::quote!(version = "2"));
        assert!(none.is_none() && error.is_some_and(|error| error.contains("integer literal")));
    }
}
