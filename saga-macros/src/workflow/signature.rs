//! Reading a saga's types from the signature of the fn under `#[saga]`.

use syn::{ItemFn, Type};

use crate::attr::Errors;
use crate::parse::{self, FnKind, FnRules, FnSig};

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
pub(crate) type SagaFn = FnSig;

/// `#[saga]`'s rules.
const SAGA_RULES: FnRules = FnRules {
    kind: &SAGA,
    wrong_count: |n| {
        format!(
            "a saga fn takes exactly two parameters, the saga context by mutable \
             reference and the input by value (`saga: &mut SagaContext, input: \
             Input`); this one takes {n}"
        )
    },
    returns_unit: "a saga fn returns `Result<Output, SagaError>`; this one returns `()`",
    returns_alias: "a saga fn returns `Result<Output, SagaError>`, spelled with both types so \
                    that the saga's Output type can be read from it (an alias such as \
                    `Result<T>` hides it)",
    check_ctx,
    owned_error: false,
    unsupported: "unsupported saga fn signature",
};

/// Checks the signature: a free `async fn(saga: &mut SagaContext, input: In) ->
/// Result<Out, SagaError>` with no generics. Every problem found is reported.
pub(crate) fn saga_fn(item: &ItemFn) -> Result<SagaFn, syn::Error> {
    parse::check_signature(item, &SAGA_RULES)
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
