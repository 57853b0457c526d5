//! Score a checkpoint on a demo directory's held-out images (colour and shape) and pairs, as the
//! demo does, and print the demo's report of it.
//! For experiments that retrain one stage by hand (`minimind-v train <dir>/sft.toml …`).
//!
//! cargo run --release --example eval_ckpt -- <demo dir> <checkpoint dir>

use std::path::PathBuf;

use minimind_v::demo_eval::evaluate_demo_dir;
use minimind_v::text::ChatTokenizer;

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let root = PathBuf::from(&a[0]);
    let tok = ChatTokenizer::load(&PathBuf::from("assets/tokenizer")).unwrap();
    let acc = evaluate_demo_dir(
        &root,
        &PathBuf::from(&a[1]),
        &tok,
        200,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    print!("{}", acc.report());
}
