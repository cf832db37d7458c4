//! The VC deal-flow example: a sourcing saga and a deal saga run against simulated services
//! that inject seeded faults (rate limits with retry-after, timeouts, 503s, permanent
//! rejections), with a ledger of every effect and compensation so the run can prove that no
//! effect was applied twice and every compensated saga was fully undone.
//!
//! Run it with `cargo run --release -p saga-examples` (see `--help` for flags).

pub mod api;
pub mod coordinator;
pub mod deal;
pub mod kill_plan;
pub mod ledger;
pub mod load;
pub mod ops;
pub mod partner;
pub mod redis_office;
pub mod report;
pub mod scenario;
pub mod services;
pub mod sourcing;
pub mod world;
