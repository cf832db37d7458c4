//! `#[derive(Classify)]`: an error type's class from `#[classify(...)]` attributes.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned as _;
use syn::{Attribute, Data, DeriveInput, Fields, Member, Type};

use crate::attr::Errors;

/// The choices, as error messages list them.
const CHOICES: &str = "`transient`, `transient(retry_after = <field>)`, `permanent` or `delegate`";

/// What one `#[classify(...)]` says.
enum Kind {
    /// `transient`, with the field holding the retry-after hint if one was named.
    Transient(Option<Member>),
    Permanent,
    /// The only field's own classification.
    Delegate {
        member: Member,
        ty: Box<Type>,
    },
}

pub(crate) fn derive(input: TokenStream) -> TokenStream {
    let input: DeriveInput = match syn::parse2(input) {
        Ok(input) => input,
        Err(error) => return error.into_compile_error(),
    };
    match expand(&input) {
        Ok(tokens) => tokens,
        Err(error) => {
            // An impl that compiles keeps the error from cascading to every use of the type
            // as a step error; the build fails on the error anyway.
            let fallback = implement(
                &input,
                &quote!(::saga_core::__private::ErrorClass::Permanent),
                &[],
            );
            let error = error.into_compile_error();
            quote!(#error #fallback)
        }
    }
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    let p = quote!(::saga_core::__private);
    let mut errors = Errors::default();
    let mut delegated = Vec::new();
    let body = match &input.data {
        Data::Enum(data) => {
            if let Some(attr) = classify_attrs(&input.attrs).next() {
                errors.push(syn::Error::new_spanned(
                    attr,
                    "on an enum, `#[classify(...)]` goes on each variant, so that every variant \
                     states its class",
                ));
            }
            let mut permanent = Vec::new();
            let mut transient = Vec::new();
            let mut arms = Vec::new();
            for variant in &data.variants {
                check_fields(&variant.fields, &mut errors);
                let ident = &variant.ident;
                let what = format!("variant `{ident}`");
                let kind = match kind_of(&variant.attrs, &variant.fields, &what, ident.span()) {
                    Ok(kind) => kind,
                    Err(error) => {
                        errors.push(error);
                        continue;
                    }
                };
                match kind {
                    Kind::Permanent => permanent.push(quote!(Self::#ident { .. })),
                    Kind::Transient(None) => transient.push(quote!(Self::#ident { .. })),
                    Kind::Transient(Some(member)) => {
                        let class = retry_after_class(&member, Hint::Binding);
                        arms.push(quote!(Self::#ident { #member: retry_after, .. } => #class,));
                    }
                    Kind::Delegate { member, ty } => {
                        let span = ty.span().resolved_at(Span::call_site());
                        let class = quote_spanned! {span=>
                            ::saga_core::__private::Classify::classify(inner)
                        };
                        arms.push(quote!(Self::#ident { #member: inner } => #class,));
                        delegated.push(*ty);
                    }
                }
            }
            if data.variants.is_empty() {
                quote!(match *self {})
            } else {
                let permanent = (!permanent.is_empty())
                    .then(|| quote!(#(#permanent)|* => #p::ErrorClass::Permanent,));
                let transient = (!transient.is_empty())
                    .then(|| quote!(#(#transient)|* => #p::ErrorClass::TRANSIENT,));
                quote! {
                    match self {
                        #permanent
                        #transient
                        #(#arms)*
                    }
                }
            }
        }
        Data::Struct(data) => {
            check_fields(&data.fields, &mut errors);
            let what = format!("struct `{}`", input.ident);
            match kind_of(&input.attrs, &data.fields, &what, input.ident.span()) {
                Ok(Kind::Permanent) => quote!(#p::ErrorClass::Permanent),
                Ok(Kind::Transient(None)) => quote!(#p::ErrorClass::TRANSIENT),
                Ok(Kind::Transient(Some(member))) => retry_after_class(&member, Hint::SelfField),
                Ok(Kind::Delegate { member, ty }) => {
                    let span = ty.span().resolved_at(Span::call_site());
                    let class = quote_spanned! {span=>
                        ::saga_core::__private::Classify::classify(&self.#member)
                    };
                    delegated.push(*ty);
                    class
                }
                Err(error) => {
                    errors.push(error);
                    TokenStream::new()
                }
            }
        }
        Data::Union(data) => {
            return Err(syn::Error::new_spanned(
                data.union_token,
                "`#[derive(Classify)]` supports enums and structs, not unions",
            ));
        }
    };
    if let Some(error) = errors.into_error() {
        return Err(error);
    }
    Ok(implement(input, &body, &delegated))
}

/// `impl Classify for Type` with `body` as the method body. A generic type gets a
/// `Field: Classify` bound for every delegated field.
fn implement(input: &DeriveInput, body: &TokenStream, delegated: &[Type]) -> TokenStream {
    let p = quote!(::saga_core::__private);
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let mut predicates: Vec<TokenStream> = where_clause
        .map(|clause| {
            clause
                .predicates
                .iter()
                .map(ToTokens::to_token_stream)
                .collect()
        })
        .unwrap_or_default();
    if input.generics.type_params().next().is_some() {
        predicates.extend(delegated.iter().map(|ty| quote!(#ty: #p::Classify)));
    }
    let where_clause = (!predicates.is_empty()).then(|| quote!(where #(#predicates),*));
    quote! {
        #[automatically_derived]
        impl #impl_generics #p::Classify for #ident #ty_generics #where_clause {
            fn classify(&self) -> #p::ErrorClass {
                #body
            }
        }
    }
}

/// Where the retry-after hint is read from.
#[derive(Clone, Copy)]
enum Hint {
    /// The `retry_after` binding of a match arm.
    Binding,
    /// `self.<member>` of a struct.
    SelfField,
}

/// Transient with the hint from an `Option<Duration>` field. Located at the field named in the
/// attribute, where a field of another type is reported.
fn retry_after_class(member: &Member, hint: Hint) -> TokenStream {
    let span = member.span().resolved_at(Span::call_site());
    let value = match hint {
        Hint::Binding => quote_spanned!(span=> *retry_after),
        Hint::SelfField => quote_spanned!(span=> self.#member),
    };
    quote_spanned! {span=>
        ::saga_core::__private::ErrorClass::Transient { retry_after: #value }
    }
}

fn classify_attrs(attrs: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attrs.iter().filter(|attr| attr.path().is_ident("classify"))
}

/// `#[classify]` on a field is a mistake: the class belongs to the variant or struct.
fn check_fields(fields: &Fields, errors: &mut Errors) {
    for field in fields {
        for attr in classify_attrs(&field.attrs) {
            errors.push(syn::Error::new_spanned(
                attr,
                "`#[classify(...)]` goes on the variant or struct, not on a field; name the \
                 field with `#[classify(transient(retry_after = <field>))]` or \
                 `#[classify(delegate)]`",
            ));
        }
    }
}

/// The one `#[classify(...)]` of a variant or struct.
fn kind_of(attrs: &[Attribute], fields: &Fields, what: &str, span: Span) -> syn::Result<Kind> {
    let mut found = classify_attrs(attrs);
    let Some(attr) = found.next() else {
        return Err(syn::Error::new(
            span,
            format!(
                "{what} needs `#[classify(...)]` to say whether it is worth retrying: {CHOICES}"
            ),
        ));
    };
    if let Some(second) = found.next() {
        return Err(syn::Error::new_spanned(
            second,
            format!("{what} has more than one `#[classify(...)]`; keep one"),
        ));
    }
    let syn::Meta::List(list) = &attr.meta else {
        return Err(syn::Error::new_spanned(
            attr,
            format!("expected `#[classify(<class>)]`, where the class is {CHOICES}"),
        ));
    };
    let mut kinds = Vec::new();
    list.parse_nested_meta(|meta| {
        let key = meta
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_default();
        match key.as_str() {
            "transient" => {
                let mut retry_after = None;
                if meta.input.peek(syn::Token![=]) {
                    return Err(meta.error(
                        "`transient` takes no value; for a retry-after hint write \
                         `transient(retry_after = <field>)`",
                    ));
                }
                if meta.input.peek(syn::token::Paren) {
                    meta.parse_nested_meta(|inner| {
                        if !inner.path.is_ident("retry_after") {
                            return Err(inner.error(
                                "unknown key in `transient(...)`; the only key is `retry_after = \
                                 <field>`",
                            ));
                        }
                        if retry_after.is_some() {
                            return Err(inner.error("duplicate key `retry_after`"));
                        }
                        let member: Member = inner.value()?.parse().map_err(|error| {
                            syn::Error::new(
                                error.span(),
                                "expected a field name, or a field index for a tuple variant: \
                                 `retry_after = wait` or `retry_after = 0`",
                            )
                        })?;
                        retry_after = Some(member);
                        Ok(())
                    })?;
                    if retry_after.is_none() {
                        return Err(meta.error(
                            "`transient()` names no field; write `transient` or \
                             `transient(retry_after = <field>)`",
                        ));
                    }
                }
                kinds.push((meta.path, Kind::Transient(retry_after)));
            }
            "permanent" | "delegate" => {
                if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                    return Err(meta.error(format!("`{key}` takes no value")));
                }
                let kind = if key == "permanent" {
                    Kind::Permanent
                } else {
                    delegate(fields, what, &meta.path)?
                };
                kinds.push((meta.path, kind));
            }
            _ => {
                return Err(meta.error(format!("unknown class `{key}`; expected {CHOICES}")));
            }
        }
        Ok(())
    })?;
    let mut kinds = kinds.into_iter();
    let Some((_, kind)) = kinds.next() else {
        return Err(syn::Error::new_spanned(
            attr,
            format!("`#[classify()]` is empty; expected one of {CHOICES}"),
        ));
    };
    if let Some((path, _)) = kinds.next() {
        return Err(syn::Error::new_spanned(
            path,
            format!("{what} can have only one class; choose one of {CHOICES}"),
        ));
    }
    if let Kind::Transient(Some(member)) = &kind {
        check_member(fields, member, what)?;
    }
    Ok(kind)
}

/// The single field a `delegate` classification reads.
fn delegate(fields: &Fields, what: &str, path: &syn::Path) -> syn::Result<Kind> {
    let mut iter = fields.iter();
    match (iter.next(), iter.next()) {
        (Some(field), None) => Ok(Kind::Delegate {
            member: field
                .ident
                .clone()
                .map_or_else(|| Member::from(0), Member::Named),
            ty: Box::new(field.ty.clone()),
        }),
        _ => Err(syn::Error::new_spanned(
            path,
            format!(
                "`delegate` classifies by the {what}'s only field, but it has {} fields; wrap \
                 the error in a variant of its own, or use `transient` or `permanent`",
                fields.len()
            ),
        )),
    }
}

/// The field named by `retry_after` exists.
fn check_member(fields: &Fields, member: &Member, what: &str) -> syn::Result<()> {
    let exists = match (member, fields) {
        (Member::Named(name), Fields::Named(named)) => named
            .named
            .iter()
            .any(|field| field.ident.as_ref() == Some(name)),
        (Member::Unnamed(index), Fields::Unnamed(unnamed)) => {
            usize::try_from(index.index).is_ok_and(|index| index < unnamed.unnamed.len())
        }
        _ => false,
    };
    if exists {
        return Ok(());
    }
    let names: Vec<String> = fields
        .iter()
        .enumerate()
        .map(|(index, field)| {
            field
                .ident
                .as_ref()
                .map_or_else(|| index.to_string(), ToString::to_string)
        })
        .collect();
    let has = if names.is_empty() {
        "it has no fields".to_owned()
    } else {
        format!("its fields are: {}", names.join(", "))
    };
    Err(syn::Error::new_spanned(
        member,
        format!(
            "{what} has no field `{}` to read the retry-after hint from; {has}",
            member.to_token_stream()
        ),
    ))
}
