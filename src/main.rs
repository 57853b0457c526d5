//! The `minimind-v` command: parses arguments and dispatches to the library (`cli` holds each
//! subcommand's arguments and the call it makes). No logic here.

mod cli;

use clap::Parser;

/// glibc's malloc spent most of the ingest planner's time in its free lists (millions of small
/// strings and token vectors built by two threads); mimalloc does not.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "minimind-v",
    version,
    about = "Train a tiny vision-language model from precomputed CLIP-feature shards"
)]
struct Cli {
    #[command(subcommand)]
    command: cli::Command,
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Read by candle-core's barrier pool when it starts.
const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

fn main() -> std::process::ExitCode {
    // Keep freed memory instead of returning it to the OS after 10 ms: a training step frees
    // and reallocates the same few hundred megabytes every step, and each return cost fresh
    // zeroed pages again (page faults took 13% of a CPU step's time).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // candle's elementwise pool spins 25,000 rounds after each operation before it sleeps; in
    // ingest those spins took 11% of the CPU from the image decoders beside the tower. A shorter
    // spin unless the user chose one; set before the pool starts.
    if std::env::var_os(SPIN_LIMIT).is_none() {
        std::env::set_var(SPIN_LIMIT, "2000");
    }
    match Cli::parse().command.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain, one line each; no backtrace noise for user errors.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
