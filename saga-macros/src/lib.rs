//! Procedural macros for saga-core (being written).
use proc_macro::TokenStream;

/// Placeholder.
#[proc_macro_attribute]
pub fn saga_step(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}

/// Placeholder.
#[proc_macro_derive(Classify, attributes(classify))]
pub fn derive_classify(_item: TokenStream) -> TokenStream {
    TokenStream::new()
}
