//! Score a checkpoint on a demo directory's held-out images (colour and shape), as the demo does.
//! For experiments that retrain one stage by hand (`minimind-v train <dir>/sft.toml …`).
//!
//! cargo run --release --example eval_ckpt -- <demo dir> <checkpoint dir>

use std::path::PathBuf;

use candle_core::Device;
use minimind_v::demo_eval::evaluate;
use minimind_v::ingest::chat::ChatTokenizer;

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let root = PathBuf::from(&a[0]);
    let tok = ChatTokenizer::load(&PathBuf::from("assets/tokenizer")).unwrap();
    let acc = evaluate(
        &PathBuf::from(&a[1]),
        &root.join("cache/eval"),
        &root.join("eval/labels.json"),
        &tok,
        200,
        &Device::Cpu,
    )
    .unwrap();
    println!(
        "colour {:.1}% shape {:.1}%",
        acc.colour_pct(),
        acc.shape_pct()
    );
}
