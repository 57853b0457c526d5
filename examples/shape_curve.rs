//! How fast does the demo's model learn shape? Runs the demo's instruction stage from a
//! checkpoint in chunks and scores held-out colour and shape accuracy after each chunk.
//! Needs a demo directory (its caches and its pretrain checkpoint, of the same dim and layers):
//! run the demo first (`demo --dim D --layers L --sft-steps 20` for another shape).
//!
//! cargo run --release --example shape_curve -- <demo dir> <steps> <chunk> [lr] [dim] [layers]

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use minimind_v::demo_eval::{
    demo_model, evaluate_demo_dir, stage_config, StageRun, SFT_ADAM_BETA2,
};
use minimind_v::text::ChatTokenizer;
use minimind_v::train::{self, RunOptions};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let root = PathBuf::from(&a[0]);
    let steps: usize = a[1].parse().unwrap();
    let chunk: usize = a[2].parse().unwrap();
    let lr: f64 = a.get(3).map_or(2e-3, |v| v.parse().unwrap());
    let mut model = demo_model(192);
    if let Some(d) = a.get(4) {
        model.dim = d.parse().unwrap();
    }
    if let Some(l) = a.get(5) {
        model.n_layers = l.parse().unwrap();
    }
    let out = root.join(format!("curve-lr{lr}-d{}-l{}", model.dim, model.n_layers));
    let _ = std::fs::remove_dir_all(&out);
    let pretrained =
        minimind_v::checkpoint::weights_file(&minimind_v::checkpoint::dir(&root.join("pretrain")));
    let stage = StageRun {
        shards: &root.join("cache/sft"),
        out: &out,
        init: Some(pretrained),
        steps,
        batch_size: 16,
        lr,
        adam_beta2: SFT_ADAM_BETA2,
    };
    let mut cfg = stage_config(&stage, None, &model);
    cfg.checkpoint_every = chunk;
    let tok = ChatTokenizer::load(&PathBuf::from("assets/tokenizer")).unwrap();
    let t0 = Instant::now();
    println!("| SFT step | colour | shape | wall s |\n|---|---|---|---|");
    for i in 0..steps / chunk {
        let opts = RunOptions {
            resume: i > 0,
            overwrite: false,
            force: false,
            interrupt: None,
            stop_after: Some(chunk),
            progress: false,
            device: Device::Cpu,
        };
        train::run(&cfg, &opts).unwrap();
        let acc = evaluate_demo_dir(
            &root,
            &out.join("checkpoint"),
            &tok,
            200,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        println!(
            "| {} | {:.1}% | {:.1}% | {:.0} |",
            (i + 1) * chunk,
            acc.colour_pct(),
            acc.shape_pct(),
            t0.elapsed().as_secs_f64()
        );
    }
}
