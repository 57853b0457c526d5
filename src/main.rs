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

fn main() -> std::process::ExitCode {
    match Cli::parse().command.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain, one line each; no backtrace noise for user errors.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
