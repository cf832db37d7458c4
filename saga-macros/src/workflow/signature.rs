//! Reading a saga's types from the signature of the fn under `#[saga]`.

use syn::{Attribute, Ident, ItemFn, ReturnType, Type, Visibility};

use crate::attr::Errors;
use crate::parse::{self, FnKind};

/// `#[saga]`.
pub(crate) const SAGA: FnKind = FnKind {
    noun: "saga",
    attribute: "saga",
    shape: "a saga is `async fn name(saga: &mut SagaContext, input: Input) -> Result<Output, \
            SagaError>`",
    not_generic: "the saga type has one Input and Output type (and the context is taken as \
                  `&mut SagaContext` with an elided lifetime)",
    stored: "it is stored with the saga",
};

/// What the saga type needs from the fn.
pub(crate) struct SagaFn {
    pub(crate) ident: Ident,
    pub(crate) vis: Visibility,
    pub(crate) docs: Vec<Attribute>,
    pub(crate) cfgs: Vec<Attribute>,
    /// The type behind the `&mut` of the context parameter, for spans.
    pub(crate) ctx_ty: Type,
    pub(crate) input_ty: Type,
    pub(crate) output_ty: Type,
    /// The error type as written, for spans.
    pub(crate) error_ty: Type,
}

/// Checks the signature: a free `async fn(saga: &mut SagaContext, input: In) ->
/// Result<Out, SagaError>` with no generics. Every problem found is reported.
pub(crate) fn saga_fn(item: &ItemFn) -> Result<SagaFn, syn::Error> {
    let sig = &item.sig;
    let mut errors = Errors::default();
    parse::check_qualifiers(sig, &SAGA, &mut errors);

    let mut ctx_ty = None;
    let mut input_ty = None;
    if let Some(typed) = parse::typed_params(sig, &SAGA, &mut errors) {
        match typed.as_slice() {
            [ctx, input] => {
                ctx_ty = check_ctx(ctx, &mut errors);
                input_ty = parse::check_owned(input, &SAGA, "input", &mut errors);
            }
            _ => errors.push(syn::Error::new(
                sig.paren_token.span.join(),
                format!(
                    "a saga fn takes exactly two parameters, the saga context by mutable \
                     reference and the input by value (`saga: &mut SagaContext, input: \
                     Input`); this one takes {}",
                    typed.len()
                ),
            )),
        }
    }

    let (output_ty, error_ty) = match &sig.output {
        ReturnType::Default => {
            errors.push(syn::Error::new(
                sig.paren_token.span.close(),
                "a saga fn returns `Result<Output, SagaError>`; this one returns `()`",
            ));
            (None, None)
        }
        ReturnType::Type(_, ty) => match parse::result_types(ty) {
            Some((output, error)) => (
                parse::check_owned(output, &SAGA, "output", &mut errors),
                Some(error.clone()),
            ),
            None => {
                errors.push(syn::Error::new_spanned(
                    ty,
                    "a saga fn returns `Result<Output, SagaError>`, spelled with both types so \
                     that the saga's Output type can be read from it (an alias such as \
                     `Result<T>` hides it)",
                ));
                (None, None)
            }
        },
    };

    if let Some(error) = errors.into_error() {
        return Err(error);
    }
    match (ctx_ty, input_ty, output_ty, error_ty) {
        (Some(ctx_ty), Some(input_ty), Some(output_ty), Some(error_ty)) => Ok(SagaFn {
            ident: sig.ident.clone(),
            vis: item.vis.clone(),
            docs: parse::attributes(item, "doc"),
            cfgs: parse::attributes(item, "cfg"),
            ctx_ty,
            input_ty,
            output_ty,
            error_ty,
        }),
        // Every `None` above was reported.
        _ => Err(syn::Error::new_spanned(
            &sig.ident,
            "unsupported saga fn signature",
        )),
    }
}

/// The context parameter: a mutable reference. Returns the referenced type; whether it is
/// `SagaContext` is left to the compiler, which sees through imports and aliases.
fn check_ctx(ty: &Type, errors: &mut Errors) -> Option<Type> {
    let must = "the first parameter of a saga fn is the saga context, by mutable reference: \
                `saga: &mut SagaContext`";
    match parse::ungroup(ty) {
        Type::Reference(reference) if reference.mutability.is_some() => {
            Some((*reference.elem).clone())
        }
        Type::Reference(reference) => {
            errors.push(syn::Error::new_spanned(
                reference,
                format!(
                    "{must} (the workflow records every step it runs through it); add `mut` \
                     after `&`"
                ),
            ));
            None
        }
        _ => {
            errors.push(syn::Error::new_spanned(ty, must));
            None
        }
    }
}
