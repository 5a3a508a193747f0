//! The `grandmodel` program as the end-to-end tests run it: the same
//! `gm_system::cli::main` and counting allocator as `crates/gm-system`'s
//! binary, built inside this package so `cargo test -p grandmodel-e2e`
//! builds it (`CARGO_BIN_EXE_grandmodel-e2e`).

#[global_allocator]
static ALLOC: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

fn main() {
    std::process::exit(gm_system::cli::main());
}
