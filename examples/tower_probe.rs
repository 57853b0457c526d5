//! What do random towers of different shapes carry about shape, and in what form? Draws fresh
//! synthetic scenes (the demo's generator, through a JPEG round trip and the ingest resize), runs
//! each tower, and fits probes on held-out images:
//! - `mean lin`: linear on the mean over tokens (what one attention layer reads most easily),
//! - `set MLP`: a per-token MLP, then the mean, then linear (what attention after a per-token
//!   MLP can read: translation-invariant, like the LLM must be),
//! - `flat MLP`: one hidden layer on all tokens flattened (position-specific).
//!
//! cargo run --release --example tower_probe -- [n_train] [n_test] [variant…]
//! variants: hidden x layers x patch[@seed], e.g. 192x4x32 (random-small:0), 192x4x32@2, 384x2x32

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use minimind_v::synth::draw::{render, Scene, SHAPES};
use minimind_v::vision::clip::{ClipTower, TowerShape};
use minimind_v::vision::preprocess::load_resized;
use rand::SeedableRng;

fn jpeg(img: &image::RgbImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90);
    img.write_with_encoder(enc).unwrap();
    buf.into_inner()
}

/// `hidden x layers x patch`, optionally `@seed` (default 0).
fn parse(v: &str) -> (TowerShape, u64) {
    let (v, seed) = v.split_once('@').unwrap_or((v, "0"));
    let p: Vec<usize> = v.split('x').map(|x| x.parse().unwrap()).collect();
    let patch = p[2];
    let shape = TowerShape {
        hidden: p[0],
        layers: p[1],
        heads: (p[0] / 64).max(1),
        image_size: patch * 7,
        patch_size: patch,
    };
    (shape, seed.parse().unwrap())
}

enum Probe {
    Linear,
    Set(usize),
    Flat(usize),
}

fn fit(probe: &Probe, xtr: &Tensor, ytr: &Tensor, xte: &Tensor, yte: &Tensor) -> f32 {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let (_, t, d) = xtr.dims3().unwrap();
    let k = SHAPES.len();
    let net: Box<dyn Fn(&Tensor) -> Tensor> = match *probe {
        Probe::Linear => {
            let o = candle_nn::linear(d, k, vb.pp("o")).unwrap();
            Box::new(move |x: &Tensor| o.forward(&x.mean(1).unwrap()).unwrap())
        }
        Probe::Set(h) => {
            let a = candle_nn::linear(d, h, vb.pp("a")).unwrap();
            let o = candle_nn::linear(h, k, vb.pp("o")).unwrap();
            Box::new(move |x: &Tensor| {
                let h = a.forward(x).unwrap().relu().unwrap().mean(1).unwrap();
                o.forward(&h).unwrap()
            })
        }
        Probe::Flat(h) => {
            let a = candle_nn::linear(t * d, h, vb.pp("a")).unwrap();
            let o = candle_nn::linear(h, k, vb.pp("o")).unwrap();
            Box::new(move |x: &Tensor| {
                let h = a.forward(&x.flatten_from(1).unwrap()).unwrap();
                o.forward(&h.relu().unwrap()).unwrap()
            })
        }
    };
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..200 {
        let loss = candle_nn::loss::cross_entropy(&net(xtr), ytr).unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let ok = net(xte).argmax(D::Minus1).unwrap().eq(yte).unwrap();
    ok.to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Standardise every feature with the training set's token-pooled mean and std.
fn standardise(tr: &Tensor, te: &Tensor) -> (Tensor, Tensor) {
    let flat = tr.flatten_to(1).unwrap();
    let mean = flat.mean_keepdim(0).unwrap();
    let var = flat.broadcast_sub(&mean).unwrap().sqr().unwrap();
    let std = var
        .mean_keepdim(0)
        .unwrap()
        .sqrt()
        .unwrap()
        .affine(1.0, 1e-5);
    let std = std.unwrap();
    let f = |x: &Tensor| x.broadcast_sub(&mean).unwrap().broadcast_div(&std).unwrap();
    (f(tr), f(te))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n_train: usize = args.first().map_or(3000, |a| a.parse().unwrap());
    let n_test: usize = args.get(1).map_or(500, |a| a.parse().unwrap());
    let variants: Vec<String> = if args.len() > 2 {
        args[2..].to_vec()
    } else {
        vec!["192x4x32".into()]
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let n = n_train + n_test;
    let mut jpegs = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let scene = Scene::random(&mut rng, 128);
        jpegs.push(jpeg(&render(&scene, 128, &mut rng)));
        labels.push(SHAPES.iter().position(|s| *s == scene.shape).unwrap() as u32);
    }
    let dev = Device::Cpu;
    let ytr = Tensor::new(&labels[..n_train], &dev).unwrap();
    let yte = Tensor::new(&labels[n_train..], &dev).unwrap();
    println!("{n_train} train / {n_test} held-out scenes; shape accuracy (chance 20%)");
    println!("| tower (hidden×layers×patch) | mean lin | set MLP | flat MLP | features s |");
    println!("|---|---|---|---|---|");
    for v in &variants {
        let (shape, seed) = parse(v);
        let tower = ClipTower::random(seed, &shape, &dev).unwrap();
        let t0 = std::time::Instant::now();
        let mut feats = Vec::new();
        for chunk in jpegs.chunks(64) {
            let px: Vec<Vec<u8>> = chunk
                .iter()
                .map(|b| load_resized(b, shape.image_size as u32, &Default::default()).unwrap())
                .collect();
            let refs: Vec<&[u8]> = px.iter().map(|p| p.as_slice()).collect();
            feats.push(tower.features_u8(&refs).unwrap());
        }
        let secs = t0.elapsed().as_secs_f32();
        let x = Tensor::cat(&feats, 0).unwrap();
        let (xtr, xte) = standardise(
            &x.narrow(0, 0, n_train).unwrap(),
            &x.narrow(0, n_train, n_test).unwrap(),
        );
        let acc = |p: Probe| 100.0 * fit(&p, &xtr, &ytr, &xte, &yte);
        println!(
            "| {v} | {:.1}% | {:.1}% | {:.1}% | {secs:.1} |",
            acc(Probe::Linear),
            acc(Probe::Set(128)),
            acc(Probe::Flat(128)),
        );
    }
}
