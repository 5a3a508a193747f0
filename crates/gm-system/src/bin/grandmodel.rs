//! The `grandmodel` program (see `gm_system::cli`): the counting allocator
//! and the command line.

#[global_allocator]
static ALLOC: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

fn main() {
    std::process::exit(gm_system::cli::main());
}
