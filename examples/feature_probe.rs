//! How much shape and colour information do the frozen features carry? Fits softmax probes on
//! the features of the demo's shards (train: pretrain + SFT images; test: the held-out images)
//! and prints held-out accuracy. Used to explain the demo's numbers; see docs/DEMO.md.
//!
//! cargo run --release --example feature_probe -- out/demo

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use minimind_v::shards::f16_bytes_to_f32;
use minimind_v::shards::reader::{list_shards, read_shard};

type Labels = HashMap<String, (String, String)>;

fn labels(path: &Path) -> Labels {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("labels.json")).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, l)| {
            let s = |f: &str| l[f].as_str().unwrap().to_string();
            (k.clone(), (s("shape"), s("colour")))
        })
        .collect()
}

/// (features (N, tokens, hidden), shape label, colour label) for single-image rows.
fn load(dirs: &[&Path], labels: &Labels) -> (Vec<f32>, Vec<String>, Vec<String>, [usize; 2]) {
    let (mut x, mut shapes, mut colours, mut fshape) = (Vec::new(), Vec::new(), Vec::new(), [0; 2]);
    for dir in dirs {
        for shard in list_shards(dir).unwrap() {
            let (meta, rows) = read_shard(&shard).unwrap();
            fshape = meta.feature_shape;
            for row in rows {
                if row.images.len() != 1 {
                    continue;
                }
                let name = &row.images[0];
                let base = name.rsplit('/').next().unwrap();
                let Some((s, c)) = labels.get(name).or_else(|| labels.get(base)) else {
                    continue;
                };
                x.extend(f16_bytes_to_f32(&row.features[0]));
                shapes.push(s.clone());
                colours.push(c.clone());
            }
        }
    }
    (x, shapes, colours, fshape)
}

fn classes(y: &[String]) -> Vec<String> {
    let mut c: Vec<String> = y.to_vec();
    c.sort();
    c.dedup();
    c
}

fn ids(y: &[String], classes: &[String]) -> Vec<u32> {
    y.iter()
        .map(|s| classes.iter().position(|c| c == s).unwrap() as u32)
        .collect()
}

/// Train a probe (linear, or one hidden layer when `hidden > 0`); return held-out accuracy.
fn probe(xtr: &Tensor, ytr: &Tensor, xte: &Tensor, yte: &Tensor, k: usize, hidden: usize) -> f32 {
    let dev = Device::Cpu;
    let d = xtr.dim(1).unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let (l1, l2) = if hidden > 0 {
        (
            Some(candle_nn::linear(d, hidden, vb.pp("h")).unwrap()),
            candle_nn::linear(hidden, k, vb.pp("o")).unwrap(),
        )
    } else {
        (None, candle_nn::linear(d, k, vb.pp("o")).unwrap())
    };
    let fwd = |x: &Tensor| {
        use candle_nn::Module;
        let h = match &l1 {
            Some(l) => l.forward(x).unwrap().relu().unwrap(),
            None => x.clone(),
        };
        l2.forward(&h).unwrap()
    };
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..300 {
        let loss = candle_nn::loss::cross_entropy(&fwd(xtr), ytr).unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let pred = fwd(xte).argmax(D::Minus1).unwrap();
    let ok = pred.eq(yte).unwrap().to_dtype(DType::F32).unwrap();
    ok.mean_all().unwrap().to_scalar::<f32>().unwrap()
}

fn standardise(tr: &Tensor, te: &Tensor) -> (Tensor, Tensor) {
    let mean = tr.mean_keepdim(0).unwrap();
    let std = tr
        .broadcast_sub(&mean)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_keepdim(0)
        .unwrap()
        .sqrt()
        .unwrap()
        .affine(1.0, 1e-5)
        .unwrap();
    let f = |x: &Tensor| x.broadcast_sub(&mean).unwrap().broadcast_div(&std).unwrap();
    (f(tr), f(te))
}

fn main() {
    let root = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or("out/demo".into()));
    let train_labels = labels(&root.join("dataset/labels.json"));
    let test_labels = labels(&root.join("eval/labels.json"));
    let (pre, sft) = (root.join("cache/pretrain"), root.join("cache/sft"));
    let (xtr, str_, ctr, [t, h]) = load(&[&pre, &sft], &train_labels);
    let (xte, ste, cte, _) = load(&[&root.join("cache/eval")], &test_labels);
    let (ntr, nte) = (str_.len(), ste.len());
    println!("train images {ntr}, held-out images {nte}, features {t}x{h}");
    let dev = Device::Cpu;
    let xtr = Tensor::from_vec(xtr, (ntr, t, h), &dev).unwrap();
    let xte = Tensor::from_vec(xte, (nte, t, h), &dev).unwrap();
    let views: [(&str, Tensor, Tensor); 3] = [
        (
            "all tokens (flattened)",
            xtr.flatten_from(1).unwrap(),
            xte.flatten_from(1).unwrap(),
        ),
        (
            "mean over tokens",
            xtr.mean(1).unwrap(),
            xte.mean(1).unwrap(),
        ),
        (
            "CLS token",
            xtr.get_on_dim(1, 0).unwrap(),
            xte.get_on_dim(1, 0).unwrap(),
        ),
    ];
    for (task, ytr, yte) in [("shape", &str_, &ste), ("colour", &ctr, &cte)] {
        let cls = classes(ytr);
        let ytr_t = Tensor::new(ids(ytr, &cls), &dev).unwrap();
        let yte_t = Tensor::new(ids(yte, &cls), &dev).unwrap();
        for (view, a, b) in &views {
            let (a, b) = standardise(a, b);
            let lin = probe(&a, &ytr_t, &b, &yte_t, cls.len(), 0);
            let mlp = probe(&a, &ytr_t, &b, &yte_t, cls.len(), 256);
            println!(
                "{task:6} | {view:24} | linear {:5.1}% | MLP(256) {:5.1}%",
                lin * 100.0,
                mlp * 100.0
            );
        }
    }
}
