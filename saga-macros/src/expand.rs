//! Code generation for `#[saga_step]`.

use std::time::Duration;

use proc_macro2::{Literal, Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{Item, LitStr};

use crate::attr::{self, Compensation, Errors, Jitter, RetryArgs, StepArgs, Timeout};
use crate::parse::{self, StepFn};

/// Expands `#[saga_step(args)] item`. The item is always emitted unchanged, followed by the
/// step type when the signature allows one, and by every error found.
pub(crate) fn saga_step(args: TokenStream, item: &TokenStream) -> TokenStream {
    let (args, errors) = attr::parse_step_args(args);
    on_fn(
        item,
        errors,
        "`#[saga_step]` goes on an `async fn(ctx: &StepContext, input: Input) -> \
         Result<Output, Error>`",
        |item_fn, errors| generate(item_fn, &args, errors),
    )
}

/// What an attribute macro on a fn expands to: the item unchanged, then what `generate`
/// makes of the fn, then every error found (`misuse` when the item is not a fn).
pub(crate) fn on_fn(
    item: &TokenStream,
    mut errors: Errors,
    misuse: &str,
    generate: impl FnOnce(&syn::ItemFn, &mut Errors) -> TokenStream,
) -> TokenStream {
    let generated = match syn::parse2::<Item>(item.clone()) {
        Ok(Item::Fn(item_fn)) => generate(&item_fn, &mut errors),
        Ok(other) => {
            errors.push(syn::Error::new(item_span(&other), misuse));
            TokenStream::new()
        }
        Err(error) => {
            errors.push(error);
            TokenStream::new()
        }
    };
    let errors = errors.into_error().map(|error| error.into_compile_error());
    quote! {
        #item
        #generated
        #errors
    }
}

pub(crate) fn item_span(item: &Item) -> Span {
    // The whole item would underline pages of code; its first token is enough.
    quote::ToTokens::to_token_stream(item)
        .into_iter()
        .next()
        .map_or_else(Span::call_site, |token| token.span())
}

/// The step type and its `Step` impl, or nothing when the signature does not allow one.
fn generate(item_fn: &syn::ItemFn, args: &StepArgs, errors: &mut Errors) -> TokenStream {
    let fn_name = item_fn.sig.ident.to_string();
    let fn_name = fn_name.strip_prefix("r#").unwrap_or(&fn_name).to_owned();
    if args.compensation.is_none() && !args.skip_missing_check {
        errors.push(syn::Error::new(
            parse::attribute_span(),
            format!(
                "step `{fn_name}` does not say how its effect is undone when a later step \
                 fails: add `compensate = <async fn(ctx: &StepContext, input: Input, output: \
                 Output) -> Result<(), Error>>`; or mark it `no_compensation` if there is nothing \
                 to undo, or `pivot` if it is the point of no return (once it has succeeded, \
                 nothing is compensated after a later failure)"
            ),
        ));
    }
    let step = match parse::step_fn(item_fn) {
        Ok(step) => step,
        Err(error) => {
            errors.push(error);
            return TokenStream::new();
        }
    };
    let type_ident = match parse::type_name(&step.ident, &parse::STEP) {
        Ok(ident) => ident,
        Err(error) => {
            errors.push(error);
            return TokenStream::new();
        }
    };
    step_type(&step, &type_ident, &fn_name, args)
}

fn step_type(
    step: &StepFn,
    type_ident: &syn::Ident,
    fn_name: &str,
    args: &StepArgs,
) -> TokenStream {
    let p = quote!(::saga_core::__private);
    let StepFn {
        ident: fn_ident,
        vis,
        docs,
        cfgs,
        ctx_ty,
        input_ty,
        output_ty,
        error_ty,
    } = step;

    let name = match &args.name {
        Some(name) => name.clone(),
        None => LitStr::new(fn_name, fn_ident.span()),
    };
    let CompensationParts {
        variant,
        method: compensate,
        doc: undo_doc,
    } = compensation_parts(args.compensation.as_ref());
    let reconcile = args.reconcile.as_ref().map(reconcile_method);
    let reconcile_compensation = reconcile_compensation_method(args);
    let timeout = args.timeout.map(timeout_method);
    let retry_policy = args.retry.as_ref().map(retry_policy_method);
    let compensation_retry_policy = args
        .compensate_retry
        .as_ref()
        .map(compensation_retry_policy_method);

    let ctx_arg = ctx_arg(ctx_ty);
    let summary = summary_doc(&name, fn_name, type_ident);
    let separator = (!docs.is_empty()).then(|| quote!(#[doc = ""]));

    quote! {
        #(#docs)*
        #separator
        #[doc = #summary]
        #[doc = ""]
        #[doc = #undo_doc]
        #(#cfgs)*
        #[derive(#p::Clone, #p::Copy, #p::Debug, #p::Default)]
        #vis struct #type_ident;

        #(#cfgs)*
        #[automatically_derived]
        impl #p::Step for #type_ident {
            type Input = #input_ty;
            type Output = #output_ty;
            type Error = #error_ty;

            const NAME: &'static str = #name;
            const COMPENSATION: #p::Compensation = #p::Compensation::#variant;

            async fn forward(
                &self,
                ctx: &#p::StepContext,
                input: Self::Input,
            ) -> #p::Result<Self::Output, Self::Error> {
                #fn_ident(#ctx_arg, input).await
            }

            #compensate
            #reconcile
            #reconcile_compensation
            #retry_policy
            #compensation_retry_policy
            #timeout
        }
    }
}

/// The doc line that says where the type comes from and how to run it.
fn summary_doc(name: &LitStr, fn_name: &str, type_ident: &syn::Ident) -> String {
    format!(
        "Saga step `{}`, generated by `#[saga_step]` from `async fn {fn_name}`: run it with \
         `saga.run({type_ident}, input)`.",
        name.value()
    )
}

/// What the step's compensation option turns into.
struct CompensationParts {
    /// The `Compensation` variant named in `const COMPENSATION`.
    variant: TokenStream,
    /// The `compensate` method, or nothing when the trait's default applies.
    method: TokenStream,
    /// The doc line that says how the step is undone.
    doc: String,
}

fn compensation_parts(compensation: Option<&Compensation>) -> CompensationParts {
    match compensation {
        Some(Compensation::Undo { path, always }) => undo_compensation(path, *always),
        Some(Compensation::Pivot) => CompensationParts {
            variant: quote!(Pivot),
            method: TokenStream::new(),
            doc: "Pivot: the point of no return: once it has succeeded the saga only goes \
                  forward; nothing is compensated after a later failure."
                .to_owned(),
        },
        // `None`: the missing option was reported; the type still exists so that its uses
        // do not fail too.
        Some(Compensation::Nothing) | None => CompensationParts {
            variant: quote!(None),
            method: TokenStream::new(),
            doc: "No compensation: nothing to undo (a read-only step); the other steps are \
                  compensated as usual."
                .to_owned(),
        },
    }
}

/// `compensate = path`: a `compensate` method calling `path`, with every output or (without
/// `compensate_on_failure`) only with the output of a forward action that succeeded.
fn undo_compensation(path: &syn::Path, always: bool) -> CompensationParts {
    let p = quote!(::saga_core::__private);
    let path_text = quote!(#path).to_string().replace(' ', "");
    // Located at the path, so that a compensation fn with the wrong signature is
    // reported there; resolved at the call site, which marks the tokens as macro
    // output so that rustc does not suggest editing them into the attribute.
    let span = path.span().resolved_at(Span::call_site());
    let (variant, body, doc) = if always {
        let body = quote_spanned!(span=> #path(ctx, input, output).await);
        let doc = format!(
            "Compensation: `{path_text}`, also when the forward action fails for good \
             or its outcome is unknown."
        );
        (quote!(Always), body, doc)
    } else {
        let call = quote_spanned!(span=> #path(ctx, input, output).await);
        let body = quote! {
            match output {
                #p::Option::Some(output) => #call,
                #p::Option::None => #p::Result::Ok(()),
            }
        };
        (
            quote!(OnSuccess),
            body,
            format!("Compensation: `{path_text}`."),
        )
    };
    let method = quote! {
        async fn compensate(
            &self,
            ctx: &#p::StepContext,
            input: Self::Input,
            output: #p::Option<Self::Output>,
        ) -> #p::Result<(), Self::Error> {
            #body
        }
    };
    CompensationParts {
        variant,
        method,
        doc,
    }
}

fn reconcile_method(path: &syn::Path) -> TokenStream {
    let p = quote!(::saga_core::__private);
    let span = path.span().resolved_at(Span::call_site());
    let call = quote_spanned!(span=> #path(ctx, input).await);
    quote! {
        async fn reconcile(
            &self,
            ctx: &#p::StepContext,
            input: &Self::Input,
        ) -> #p::Result<#p::Reconciled<Self::Output>, Self::Error> {
            #call
        }
    }
}

fn reconcile_compensation_method(args: &StepArgs) -> Option<TokenStream> {
    let p = quote!(::saga_core::__private);
    // Only with `compensate` (checked in `attr`); its output parameter follows the
    // compensation's: `&Out`, or `Option<&Out>` with `compensate_on_failure`.
    let (Some(path), Some(Compensation::Undo { always, .. })) =
        (&args.reconcile_compensation, &args.compensation)
    else {
        return None;
    };
    let span = path.span().resolved_at(Span::call_site());
    let call = quote_spanned!(span=> #path(ctx, input, output).await);
    let body = if *always {
        call
    } else {
        // Without an output there is nothing this compensation undoes.
        quote! {
            match output {
                #p::Option::Some(output) => #call,
                #p::Option::None => #p::Result::Ok(#p::Reconciled::Unknown),
            }
        }
    };
    Some(quote! {
        async fn reconcile_compensation(
            &self,
            ctx: &#p::StepContext,
            input: &Self::Input,
            output: #p::Option<&Self::Output>,
        ) -> #p::Result<#p::Reconciled<()>, Self::Error> {
            #body
        }
    })
}

fn timeout_method(timeout: Timeout) -> TokenStream {
    let p = quote!(::saga_core::__private);
    let value = match timeout {
        Timeout::Off => quote!(#p::Option::None),
        Timeout::After(duration) => {
            let duration = duration_tokens(duration);
            quote!(#p::Option::Some(#duration))
        }
    };
    quote! {
        fn timeout(&self) -> #p::Option<#p::Duration> {
            #value
        }
    }
}

fn retry_policy_method(retry: &RetryArgs) -> TokenStream {
    let p = quote!(::saga_core::__private);
    let base = quote!(<#p::RetryPolicy as #p::Default>::default());
    let policy = policy_tokens(&base, retry);
    quote! {
        fn retry_policy(&self) -> #p::RetryPolicy {
            #policy
        }
    }
}

fn compensation_retry_policy_method(retry: &RetryArgs) -> TokenStream {
    let p = quote!(::saga_core::__private);
    // The trait's default compensation policy, with the given keys applied on top.
    let base = quote! { #p::RetryPolicy::compensation_default() };
    let policy = policy_tokens(&base, retry);
    quote! {
        fn compensation_retry_policy(&self) -> #p::RetryPolicy {
            #policy
        }
    }
}

/// The `ctx` argument passed to the step fn, located at the context type so that a context
/// of the wrong type is reported there.
fn ctx_arg(ctx_ty: &syn::Type) -> TokenStream {
    let ctx_span = match ctx_ty {
        syn::Type::Reference(reference) => reference.elem.span(),
        other => other.span(),
    };
    quote_spanned!(ctx_span.resolved_at(Span::call_site())=> ctx)
}

/// `base` with a `with_*` call for every key given. `initial` comes before `max`, because
/// `with_initial_delay` raises the cap to the initial delay (the order never matters for
/// values that pass the checks in `attr`).
fn policy_tokens(base: &TokenStream, retry: &RetryArgs) -> TokenStream {
    let p = quote!(::saga_core::__private);
    let mut calls = Vec::new();
    if let Some(attempts) = retry.max_attempts {
        let attempts = Literal::u32_unsuffixed(attempts);
        calls.push(quote!(.with_max_attempts(#attempts)));
    }
    if let Some(initial) = retry.initial {
        let initial = duration_tokens(initial);
        calls.push(quote!(.with_initial_delay(#initial)));
    }
    if let Some(max) = retry.max {
        let max = duration_tokens(max);
        calls.push(quote!(.with_max_delay(#max)));
    }
    if let Some(multiplier) = retry.multiplier {
        let multiplier = Literal::f32_suffixed(multiplier);
        calls.push(quote!(.with_multiplier(#multiplier)));
    }
    if let Some(jitter) = retry.jitter {
        let jitter = match jitter {
            Jitter::Full => quote!(Full),
            Jitter::Equal => quote!(Equal),
            Jitter::None => quote!(None),
        };
        calls.push(quote!(.with_jitter(#p::Jitter::#jitter)));
    }
    if let Some(limit) = retry.max_elapsed {
        let limit = duration_tokens(limit);
        calls.push(quote!(.with_max_elapsed(#limit)));
    }
    quote!(#base #(#calls)*)
}

fn duration_tokens(duration: Duration) -> TokenStream {
    let p = quote!(::saga_core::__private);
    let secs = Literal::u64_unsuffixed(duration.as_secs());
    let nanos = Literal::u32_unsuffixed(duration.subsec_nanos());
    quote!(#p::Duration::new(#secs, #nanos))
}
