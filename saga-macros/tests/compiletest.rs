//! Compile-time checks: every misuse of `#[saga_step]` and `#[derive(Classify)]` fails with
//! an error at the offending tokens (`tests/ui`), and correct use compiles under strict lints
//! (`tests/ui-pass`).
//!
//! Compiler messages change between Rust releases, so the checked-in `.stderr` files belong
//! to one release and the test runs only there. Regenerate them with
//! `TRYBUILD=overwrite cargo test -p saga-macros --test compiletest` and read every diff.

#[rustversion::attr(
    not(stable(1.95)),
    ignore = "the .stderr files were written with Rust 1.95; regenerate them for this compiler"
)]
#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
    cases.pass("tests/ui-pass/*.rs");
}
