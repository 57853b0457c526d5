//! MiniMind-V against `../shared/reference/tiny_llm/` (upstream's model code in PyTorch, f32):
//! logits within 1e-4, masked loss within 1e-5, gradients within 1e-5 of their max; checkpoint
//! import from upstream `.pth` files; strict loading; save/load round trip; KV cache == recompute.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use minimind_v::compare::{within, Diff};
use minimind_v::model::llm::KvCache;
use minimind_v::model::vlm::{masked_loss_full, Images, Vlm};
use minimind_v::model::{weights, ModelConfig};

fn dir() -> std::path::PathBuf {
    common::reference().join("tiny_llm")
}

fn config() -> ModelConfig {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    // Derived values the reference records for readers; ours derives them.
    let resolved = v
        .as_object_mut()
        .unwrap()
        .remove("ffn_hidden_resolved")
        .unwrap();
    v.as_object_mut().unwrap().remove("head_dim");
    let cfg: ModelConfig = serde_json::from_value(v).unwrap();
    assert_eq!(cfg.ffn_hidden() as u64, resolved.as_u64().unwrap());
    assert_eq!(cfg, ModelConfig::tiny());
    cfg
}

fn case() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("case.safetensors"), &Device::Cpu).unwrap()
}

fn model(file: &str) -> (Vlm, candle_nn::VarMap) {
    let (m, vm, report) = weights::load(&dir().join(file), &config(), false, &Device::Cpu).unwrap();
    assert!(!report.fresh_projector);
    (m, vm)
}

fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

/// The case's images: row 0 uses its first slot, row 1 both.
fn images(c: &HashMap<String, Tensor>, cfg: &ModelConfig) -> Images {
    let ids = ids_of(&c["input_ids"]);
    let rows: Vec<&[u32]> = ids.iter().map(|r| r.as_slice()).collect();
    let feats = c["image_feats"].to_dtype(DType::F32).unwrap();
    let per_row = vec![
        feats.i(0).unwrap().narrow(0, 0, 1).unwrap(),
        feats.i(1).unwrap(),
    ];
    let imgs = Images::for_rows(&rows, &per_row, &cfg.image_ids)
        .unwrap()
        .unwrap();
    assert_eq!(imgs.slots, vec![(0, 4), (1, 4), (1, 55)]);
    imgs
}

/// The largest absolute difference; NaN (within no tolerance) when either side holds a
/// non-finite value or the shapes differ.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    Diff::of_tensors(a, b).unwrap().abs()
}

/// The gradient check: within 1e-5 of the reference gradient's largest magnitude.
fn check_grad(got: &Tensor, want: &Tensor, name: &str) -> Result<(), String> {
    Diff::of_tensors(got, want).unwrap().check_rel(1e-5, name)
}

/// `t` with the value in the middle replaced by `v`.
fn poisoned(t: &Tensor, v: f32) -> Tensor {
    let mut data = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mid = data.len() / 2;
    data[mid] = v;
    Tensor::from_vec(data, t.shape(), t.device()).unwrap()
}

#[test]
fn logits_loss_and_gradients_match_upstream() {
    let cfg = config();
    let c = case();
    let (m, vm) = model("model.safetensors");
    let ids = c["input_ids"].to_dtype(DType::U32).unwrap();
    let imgs = images(&c, &cfg);

    let logits = m.forward(&ids, Some(&imgs)).unwrap();
    assert_eq!(logits.dims(), &[2, 127, 6400]);
    let d = max_diff(&logits, &c["logits"]);
    assert!(within(d, 1e-4), "logits differ by {d}");

    let want = c["loss"]
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let full = masked_loss_full(&logits, &c["targets"], &c["loss_mask"])
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        within((full - want).abs() as f64, 1e-5),
        "full-logits loss {full} vs {want}"
    );
    let loss = m
        .loss(&ids, Some(&imgs), &c["targets"], &c["loss_mask"])
        .unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(
        within((got - want).abs() as f64, 1e-5),
        "loss {got} vs {want}"
    );

    let grads = loss.backward().unwrap();
    let vars = vm.data().lock().unwrap();
    for name in [
        "vision_proj.vision_proj.0.weight",
        "vision_proj.vision_proj.0.bias",
        "layers.0.attention.wq.weight",
    ] {
        let g = grads
            .get(vars[name].as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        check_grad(g, &c[&format!("grad.{name}")], name).unwrap();
    }
}

/// The checks above fail when our side holds a NaN or an infinity (a fold over `f32::max`
/// would have skipped it and passed).
#[test]
fn the_logit_loss_and_gradient_checks_fail_on_non_finite_values() {
    let c = case();
    let grad = &c["grad.layers.0.attention.wq.weight"];
    assert_eq!(max_diff(&c["logits"], &c["logits"]), 0.0);
    assert!(check_grad(grad, grad, "wq").is_ok());
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let d = max_diff(&poisoned(&c["logits"], bad), &c["logits"]);
        assert!(!within(d, 1e-4), "logits with {bad}: {d}");
        let err = check_grad(&poisoned(grad, bad), grad, "wq").unwrap_err();
        assert!(err.contains("non-finite"), "{err}");
        assert!(!within((bad - 1.0).abs() as f64, 1e-5), "loss {bad}");
    }
}

#[test]
fn without_images_placeholders_are_ordinary_tokens() {
    let c = case();
    let (m, _) = model("model.safetensors");
    let row0 = c["input_ids"]
        .i(0..1)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let logits = m.forward(&row0, None).unwrap();
    let last = logits.i((0, 126)).unwrap();
    let d = max_diff(&last, &c["logits_no_image_row0_last"]);
    assert!(within(d, 1e-4), "differs by {d}");
}

#[test]
fn upstream_pth_checkpoints_load_like_safetensors() {
    let c = case();
    let ids = c["input_ids"].to_dtype(DType::U32).unwrap();
    let imgs = images(&c, &config());
    let (a, _) = model("model.safetensors");
    let want = a.forward(&ids, Some(&imgs)).unwrap();
    for file in ["model.pth", "model_orig_mod_prefix.pth"] {
        let (b, _) = model(file);
        assert_eq!(
            max_diff(&b.forward(&ids, Some(&imgs)).unwrap(), &want),
            0.0,
            "{file}"
        );
    }
    // An LLM-only checkpoint starts VLM pretraining with a fresh projector, and says so…
    let (m, _, report) =
        weights::load(&dir().join("llm_only.pth"), &config(), true, &Device::Cpu).unwrap();
    assert!(report.fresh_projector);
    let d = max_diff(
        &m.forward(&ids, None).unwrap(),
        &a.forward(&ids, None).unwrap(),
    );
    assert_eq!(d, 0.0, "the LLM part is loaded as is");
    // …but is an error where a full VLM checkpoint is expected.
    let err = weights::load(&dir().join("llm_only.pth"), &config(), false, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("missing tensor vision_proj.vision_proj.0.weight")
            && err.contains("llm_only.pth"),
        "{err}"
    );
}

/// The message of loading the reference weights into a model of shape `cfg`.
fn load_error(cfg: &ModelConfig) -> String {
    match weights::load(&dir().join("model.safetensors"), cfg, false, &Device::Cpu) {
        Ok(_) => panic!("{cfg:?} should not fit the reference weights"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loading_is_strict_and_lists_every_problem() {
    let wrong = ModelConfig {
        dim: 128,
        ..config()
    };
    let err = load_error(&wrong);
    assert!(
        err.contains("tok_embeddings.weight: shape [6400, 64], config wants [6400, 128]"),
        "{err}"
    );
    assert!(err.contains("HINT"));

    let deeper = ModelConfig {
        n_layers: 3,
        ..config()
    };
    let err = load_error(&deeper);
    assert!(
        err.contains("missing tensor layers.2.attention.wq.weight"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let mut state = weights::read_state(&dir().join("model.safetensors")).unwrap();
    state.insert(
        "layers.0.attention.bias".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = tmp.path().join("extra.safetensors");
    candle_core::safetensors::save(&state, &path).unwrap();
    let err = weights::load(&path, &config(), false, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("unexpected tensor layers.0.attention.bias"),
        "{err}"
    );
}

#[test]
fn save_then_load_round_trips() {
    let c = case();
    let ids = c["input_ids"].to_dtype(DType::U32).unwrap();
    let (a, vm) = model("model.pth");
    let tmp = tempfile::tempdir().unwrap();
    minimind_v::checkpoint::save_model(tmp.path(), &vm, &config()).unwrap();
    let ckpt = minimind_v::checkpoint::Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(ckpt.model_config().unwrap(), config());
    let (b, _) = ckpt.load_model(&Device::Cpu).unwrap();
    assert_eq!(
        max_diff(
            &a.forward(&ids, None).unwrap(),
            &b.forward(&ids, None).unwrap()
        ),
        0.0
    );
    let st = weights::read_state(&minimind_v::checkpoint::weights_file(tmp.path())).unwrap();
    assert_eq!(
        max_diff(&st["output.weight"], &st["tok_embeddings.weight"]),
        0.0,
        "tied head saved like upstream"
    );
}

#[test]
fn kv_cache_decoding_equals_full_recompute() {
    let cfg = config();
    let c = case();
    let (m, _) = model("model.safetensors");
    let all = ids_of(&c["input_ids"]);
    let row: Vec<u32> = all[1][..110].to_vec(); // two images, then text
    let feats = c["image_feats"].i(1).unwrap().to_dtype(DType::F32).unwrap();
    let imgs = Images::for_rows(&[&row], &[feats], &cfg.image_ids)
        .unwrap()
        .unwrap();

    // Prefill the first 100 tokens (both images inside), then one token at a time.
    let mut cache = KvCache::new(cfg.n_layers);
    let prefix = Tensor::new(&row[..100], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut steps = vec![m.forward_cached(&prefix, Some(&imgs), &mut cache).unwrap()];
    for p in 100..110 {
        let tok = Tensor::new(&row[p..p + 1], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        steps.push(m.forward_cached(&tok, Some(&imgs), &mut cache).unwrap());
    }
    assert_eq!(cache.len(), 110);
    let full = m
        .forward(
            &Tensor::new(row.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            Some(&imgs),
        )
        .unwrap();
    for (k, step) in steps.iter().enumerate() {
        let d = max_diff(step, &full.i((.., 99 + k)).unwrap());
        assert!(
            within(d, 1e-4),
            "position {}: cached logits differ by {d}",
            99 + k
        );
    }
}
