//! Reading a step's types from the signature of the fn under `#[saga_step]`, with the checks
//! that `#[saga]` shares.

use proc_macro2::{Spacing, Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::{
    Attribute, FnArg, GenericArgument, Ident, ItemFn, PathArguments, ReturnType, Signature, Type,
    TypePath, Visibility,
};

use crate::attr::Errors;

/// Which macro checks a fn, for the wording of its messages.
pub(crate) struct FnKind {
    /// What the fn becomes: `"step"` or `"saga"`.
    pub(crate) noun: &'static str,
    /// The attribute's name, `"saga_step"` or `"saga"`.
    pub(crate) attribute: &'static str,
    /// The signature the attribute expects, quoted in messages.
    pub(crate) shape: &'static str,
    /// Why the fn cannot be generic.
    pub(crate) not_generic: &'static str,
    /// Where its input and output are kept, which is why they must own their data.
    pub(crate) stored: &'static str,
}

/// `#[saga_step]`.
pub(crate) const STEP: FnKind = FnKind {
    noun: "step",
    attribute: "saga_step",
    shape: "a step is `async fn name(ctx: &StepContext, input: Input) -> Result<Output, Error>`",
    not_generic: "the step type has one Input, Output and Error type (and the context is taken \
                  as `&StepContext` with an elided lifetime)",
    stored: "it is recorded in the journal",
};

/// What the generated type needs from an annotated fn's signature.
pub(crate) struct FnSig {
    pub(crate) ident: Ident,
    pub(crate) vis: Visibility,
    pub(crate) docs: Vec<Attribute>,
    /// `#[cfg(...)]` attributes, copied to the generated type so it exists exactly when the
    /// fn does.
    pub(crate) cfgs: Vec<Attribute>,
    /// The type behind the context parameter's reference, for spans.
    pub(crate) ctx_ty: Type,
    pub(crate) input_ty: Type,
    pub(crate) output_ty: Type,
    /// The error type as written.
    pub(crate) error_ty: Type,
}

/// What the step type needs from the fn.
pub(crate) type StepFn = FnSig;

/// What a signature check needs to know of one macro beyond its [`FnKind`] wording.
pub(crate) struct FnRules {
    /// The wording.
    pub(crate) kind: &'static FnKind,
    /// The message for a fn with `n` parameters instead of two.
    pub(crate) wrong_count: fn(usize) -> String,
    /// The message for a fn that returns `()`.
    pub(crate) returns_unit: &'static str,
    /// The message for a return type that is not spelled `Result<_, _>`.
    pub(crate) returns_alias: &'static str,
    /// Checks the context parameter; returns the type behind its reference.
    pub(crate) check_ctx: fn(&Type, &mut Errors) -> Option<Type>,
    /// Whether the error type must own its data (a step's is recorded; a saga's is
    /// `SagaError`).
    pub(crate) owned_error: bool,
    /// The last-resort message, never shown when the checks above reported.
    pub(crate) unsupported: &'static str,
}

/// `#[saga_step]`'s rules.
const STEP_RULES: FnRules = FnRules {
    kind: &STEP,
    wrong_count: |n| {
        format!(
            "a step fn takes exactly two parameters, the context by reference and the \
             input by value (`ctx: &StepContext, input: Input`); this one takes {n}"
        )
    },
    returns_unit: "a step fn returns `Result<Output, Error>`; this one returns `()`",
    returns_alias: "a step fn returns `Result<Output, Error>`, spelled with both types so that \
                    the step's Output and Error types can be read from it (an alias such as \
                    `Result<T>` hides the error type)",
    check_ctx,
    owned_error: true,
    unsupported: "unsupported step fn signature",
};

/// Checks the signature: a free `async fn(ctx: &StepContext, input: In) -> Result<Out, Err>`
/// with no generics. Every problem found is reported.
pub(crate) fn step_fn(item: &ItemFn) -> Result<StepFn, syn::Error> {
    check_signature(item, &STEP_RULES)
}

/// Checks a signature by `rules`: a free async fn of a context and an input, returning a
/// spelled-out `Result`, with no generics. Every problem found is reported.
pub(crate) fn check_signature(item: &ItemFn, rules: &FnRules) -> Result<FnSig, syn::Error> {
    let sig = &item.sig;
    let kind = rules.kind;
    let mut errors = Errors::default();
    check_qualifiers(sig, kind, &mut errors);

    let mut ctx_ty = None;
    let mut input_ty = None;
    if let Some(typed) = typed_params(sig, kind, &mut errors) {
        match typed.as_slice() {
            [ctx, input] => {
                ctx_ty = (rules.check_ctx)(ctx, &mut errors);
                input_ty = check_owned(input, kind, "input", &mut errors);
            }
            _ => errors.push(syn::Error::new(
                sig.paren_token.span.join(),
                (rules.wrong_count)(typed.len()),
            )),
        }
    }

    let (output_ty, error_ty) = match &sig.output {
        ReturnType::Default => {
            errors.push(syn::Error::new(
                sig.paren_token.span.close(),
                rules.returns_unit,
            ));
            (None, None)
        }
        ReturnType::Type(_, ty) => match result_types(ty) {
            Some((output, error)) => (
                check_owned(output, kind, "output", &mut errors),
                if rules.owned_error {
                    check_owned(error, kind, "error", &mut errors)
                } else {
                    Some(error.clone())
                },
            ),
            None => {
                errors.push(syn::Error::new_spanned(ty, rules.returns_alias));
                (None, None)
            }
        },
    };

    if let Some(error) = errors.into_error() {
        return Err(error);
    }
    match (ctx_ty, input_ty, output_ty, error_ty) {
        (Some(ctx_ty), Some(input_ty), Some(output_ty), Some(error_ty)) => Ok(FnSig {
            ident: sig.ident.clone(),
            vis: item.vis.clone(),
            docs: attributes(item, "doc"),
            cfgs: attributes(item, "cfg"),
            ctx_ty,
            input_ty,
            output_ty,
            error_ty,
        }),
        // Every `None` above was reported.
        _ => Err(syn::Error::new_spanned(&sig.ident, rules.unsupported)),
    }
}

/// Reports what no generated type can call: a fn that is not `async`, or is `const`,
/// `unsafe`, `extern`, generic or variadic.
pub(crate) fn check_qualifiers(sig: &Signature, kind: &FnKind, errors: &mut Errors) {
    let FnKind {
        noun,
        attribute,
        shape,
        not_generic,
        ..
    } = kind;
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new_spanned(
            sig.fn_token,
            format!("`#[{attribute}]` needs an `async fn`: add `async` before `fn` ({shape})"),
        ));
    }
    if let Some(constness) = &sig.constness {
        errors.push(syn::Error::new_spanned(
            constness,
            format!("a {noun} fn cannot be `const`"),
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.push(syn::Error::new_spanned(
            unsafety,
            format!(
                "a {noun} fn cannot be `unsafe`: the engine calls it with no way to uphold its \
                 contract"
            ),
        ));
    }
    if let Some(abi) = &sig.abi {
        errors.push(syn::Error::new_spanned(
            abi,
            format!("a {noun} fn cannot have an `extern` ABI"),
        ));
    }
    if !sig.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            format!("a {noun} fn cannot be generic: {not_generic}"),
        ));
    } else if let Some(where_clause) = &sig.generics.where_clause {
        errors.push(syn::Error::new_spanned(
            where_clause,
            format!("a {noun} fn cannot have a `where` clause"),
        ));
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(syn::Error::new_spanned(
            variadic,
            format!("a {noun} fn cannot be variadic"),
        ));
    }
}

/// The types of the parameters, or `None` when there is a `self` receiver (reported).
pub(crate) fn typed_params<'a>(
    sig: &'a Signature,
    kind: &FnKind,
    errors: &mut Errors,
) -> Option<Vec<&'a Type>> {
    let mut typed = Vec::new();
    let mut receiver = false;
    for arg in &sig.inputs {
        match arg {
            FnArg::Receiver(self_arg) => {
                receiver = true;
                errors.push(syn::Error::new_spanned(
                    self_arg,
                    format!(
                        "a {} fn cannot take `self`: write a free fn outside any `impl` block \
                         ({})",
                        kind.noun, kind.shape
                    ),
                ));
            }
            FnArg::Typed(pat) => typed.push(&*pat.ty),
        }
    }
    (!receiver).then_some(typed)
}

/// The fn's attributes with this name (`doc`, `cfg`), to copy to the generated type: docs so
/// that it is documented, `cfg`s so that it exists exactly when the fn does.
pub(crate) fn attributes(item: &ItemFn, name: &str) -> Vec<Attribute> {
    item.attrs
        .iter()
        .filter(|attr| attr.path().is_ident(name))
        .cloned()
        .collect()
}

/// The context parameter: a shared reference.
fn check_ctx(ty: &Type, errors: &mut Errors) -> Option<Type> {
    match ungroup(ty) {
        Type::Reference(reference) if reference.mutability.is_none() => Some(ty.clone()),
        Type::Reference(reference) => {
            errors.push(syn::Error::new_spanned(
                reference.mutability,
                "the context parameter is a shared reference: `ctx: &StepContext`",
            ));
            None
        }
        _ => {
            errors.push(syn::Error::new_spanned(
                ty,
                "the first parameter of a step fn is the context, by reference: `ctx: \
                 &StepContext`",
            ));
            None
        }
    }
}

/// The input, output and error types: owned (they are stored, or named as associated
/// types), so no references, borrowed lifetimes or `impl Trait`.
pub(crate) fn check_owned(
    ty: &Type,
    kind: &FnKind,
    what: &str,
    errors: &mut Errors,
) -> Option<Type> {
    let noun = kind.noun;
    let why = match what {
        "error" => format!("the {noun}'s Error type must be `'static`"),
        _ => format!("{}, so it must own its data (`'static`)", kind.stored),
    };
    if let Type::Reference(_) = ungroup(ty) {
        let by_value = if what == "input" {
            " and take it by value"
        } else {
            ""
        };
        errors.push(syn::Error::new_spanned(
            ty,
            format!("the {noun} {what} cannot be a reference: {why}; use an owned type{by_value}"),
        ));
        return None;
    }
    if let Some((span, found)) = forbidden_token(ty.to_token_stream()) {
        let message = match found {
            Forbidden::Lifetime(lifetime) => format!(
                "the {noun} {what} type cannot borrow (`'{lifetime}`): {why}; use an owned type"
            ),
            Forbidden::ImplTrait => format!(
                "the {noun} {what} type cannot be `impl Trait`: the {noun} type names it as an \
                 associated type; write the concrete type"
            ),
        };
        errors.push(syn::Error::new(span, message));
        return None;
    }
    Some(ty.clone())
}

enum Forbidden {
    Lifetime(String),
    ImplTrait,
}

/// The first lifetime other than `'static`, or `impl`, in a type's tokens.
fn forbidden_token(tokens: TokenStream) -> Option<(Span, Forbidden)> {
    let mut tokens = tokens.into_iter().peekable();
    while let Some(token) = tokens.next() {
        match token {
            TokenTree::Punct(punct)
                if punct.as_char() == '\'' && punct.spacing() == Spacing::Joint =>
            {
                if let Some(TokenTree::Ident(name)) = tokens.peek()
                    && name != "static"
                {
                    return Some((punct.span(), Forbidden::Lifetime(name.to_string())));
                }
            }
            TokenTree::Ident(ident) if ident == "impl" => {
                return Some((ident.span(), Forbidden::ImplTrait));
            }
            TokenTree::Group(group) => {
                if let Some(found) = forbidden_token(group.stream()) {
                    return Some(found);
                }
            }
            _ => {}
        }
    }
    None
}

/// The type inside the invisible groups that `macro_rules!` fragments (`$ty:ty`) leave.
pub(crate) fn ungroup(mut ty: &Type) -> &Type {
    while let Type::Group(group) = ty {
        ty = &group.elem;
    }
    ty
}

/// `T` and `E` of `Result<T, E>` (any path ending in `Result` with two type arguments).
pub(crate) fn result_types(ty: &Type) -> Option<(&Type, &Type)> {
    let Type::Path(TypePath { qself: None, path }) = ungroup(ty) else {
        return None;
    };
    let last = path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty),
        _ => None,
    });
    match (types.next(), types.next(), types.next()) {
        (Some(Some(output)), Some(Some(error)), None) => Some((output, error)),
        _ => None,
    }
}

/// `create_deal` → `CreateDeal`, at the fn name's span. An error when the name has no letter
/// to start a type name with, or is already the type name (a fn and a unit struct of the same
/// name would clash).
pub(crate) fn type_name(ident: &Ident, kind: &FnKind) -> Result<Ident, syn::Error> {
    let noun = kind.noun;
    let name = ident.to_string();
    let name = name.strip_prefix("r#").unwrap_or(&name);
    let pascal: String = name
        .split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_uppercase().chain(chars).collect::<String>()
            })
        })
        .collect();
    if !pascal.starts_with(|c: char| c.is_alphabetic()) {
        return Err(syn::Error::new_spanned(
            ident,
            format!(
                "cannot derive a {noun} type name from this fn name: start it with a letter, \
                 like `create_deal` (which becomes `CreateDeal`)"
            ),
        ));
    }
    if pascal == name {
        return Err(syn::Error::new_spanned(
            ident,
            format!(
                "the {noun} type would be named `{pascal}` like the fn itself; name the fn in \
                 snake_case (its PascalCase form names the {noun} type)"
            ),
        ));
    }
    Ok(Ident::new(&pascal, ident.span()))
}

/// The span of the whole attribute: where a missing option belongs.
pub(crate) fn attribute_span() -> Span {
    Span::call_site()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        let name =
            |s: &str| type_name(&Ident::new(s, Span::call_site()), &STEP).map(|i| i.to_string());
        assert_eq!(name("create_deal").ok().as_deref(), Some("CreateDeal"));
        assert_eq!(name("http_2_call").ok().as_deref(), Some("Http2Call"));
        assert_eq!(name("_private_step").ok().as_deref(), Some("PrivateStep"));
        assert!(name("_1").is_err());
        assert!(name("Step").is_err());
    }

    #[test]
    fn finds_borrowed_types() {
        let ty: Type = syn::parse_quote!(Vec<std::borrow::Cow<'a, str>>);
        assert!(forbidden_token(ty.to_token_stream()).is_some());
        let ty: Type = syn::parse_quote!(std::borrow::Cow<'static, str>);
        assert!(forbidden_token(ty.to_token_stream()).is_none());
    }
}
