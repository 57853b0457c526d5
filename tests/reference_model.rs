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

/// Row 0 of the case (one image placeholder) as a (1, 127) batch.
fn row0_ids(c: &HashMap<String, Tensor>) -> Tensor {
    c["input_ids"]
        .i(0..1)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
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
    let row0 = row0_ids(&c);
    let logits = m.forward(&row0, None).unwrap();
    let last = logits.i((0, 126)).unwrap();
    let d = max_diff(&last, &c["logits_no_image_row0_last"]);
    assert!(within(d, 1e-4), "differs by {d}");
}

/// A text-only sample batched with an image sample (as the trainer batches them, each row's
/// placeholder windows paired with that row's images, none for the text-only row): the image
/// row's logits are the reference's with its image, and the text-only row's are the reference's
/// without one, where its placeholder tokens stay ordinary tokens.
#[test]
fn a_text_only_row_batched_with_an_image_row_matches_the_reference() {
    use minimind_v::model::vlm::pair_windows;
    let c = case();
    let cfg = config();
    let (m, _) = model("model.safetensors");
    let row0 = row0_ids(&c);
    let ids = Tensor::cat(&[&row0, &row0], 0).unwrap();
    let rows = ids_of(&ids);
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let pairs = pair_windows(&rows, &[1, 0], &cfg.image_ids);
    assert_eq!(
        pairs.len(),
        1,
        "only the image row's window is paired: {pairs:?}"
    );
    let feats = c["image_feats"].to_dtype(DType::F32).unwrap();
    let imgs = Images {
        feats: feats.i((0, 0..1)).unwrap(),
        slots: pairs.iter().map(|&(r, s, _)| (r, s)).collect(),
    };
    let logits = m.forward(&ids, Some(&imgs)).unwrap();
    let d = max_diff(&logits.i(0).unwrap(), &c["logits"].i(0).unwrap());
    assert!(within(d, 1e-4), "image row: logits differ by {d}");
    let last = logits.i((1, 126)).unwrap();
    let d = max_diff(&last, &c["logits_no_image_row0_last"]);
    assert!(within(d, 1e-4), "text-only row: last logits differ by {d}");
    let alone = m.forward(&row0, None).unwrap();
    let d = max_diff(&logits.i(1).unwrap(), &alone.i(0).unwrap());
    assert!(within(d, 1e-5), "text-only row: batched vs alone {d}");
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

/// `export` to `.pth` and safetensors: upstream's 23 names exactly (the reference `.pth`'s, whose
/// layout upstream's strict `load_state_dict` accepts), the archive laid out as `torch.save` lays
/// it out, and the same logits when read back; f16 is each value rounded once.
#[test]
fn export_writes_upstreams_formats_and_reads_back_to_the_same_logits() {
    use minimind_v::export::{export, Format, Precision};
    let c = case();
    let ids = c["input_ids"].to_dtype(DType::U32).unwrap();
    let imgs = images(&c, &config());
    let (a, vm) = model("model.pth");
    let want = a.forward(&ids, Some(&imgs)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("checkpoint");
    minimind_v::checkpoint::save_model(&ckpt, &vm, &config()).unwrap();
    let reference = weights::read_state(&dir().join("model.pth")).unwrap();

    let pth = tmp.path().join("x.pth");
    let said = export(&ckpt, Format::Pth, Precision::F32, &pth).unwrap();
    assert!(said.contains("23 tensors"), "{said}");
    let got = weights::read_state(&pth).unwrap();
    let mut names: Vec<_> = got.keys().collect();
    let mut want_names: Vec<_> = reference.keys().collect();
    names.sort();
    want_names.sort();
    assert_eq!(names, want_names);
    for (name, t) in &reference {
        assert_eq!(got[name].dtype(), DType::F32, "{name}");
        assert_eq!(max_diff(&got[name], t), 0.0, "{name}");
    }
    let (b, _) = model_from(&pth);
    assert_eq!(max_diff(&b.forward(&ids, Some(&imgs)).unwrap(), &want), 0.0);

    // The archive: one prefix, a stored pickle, byteorder and version, each tensor's bytes in
    // data/N at a 64-byte boundary (torch.load maps them from there).
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&pth).unwrap()).unwrap();
    let entries: Vec<String> = zip.file_names().map(|n| n.unwrap().to_string()).collect();
    for name in ["archive/data.pkl", "archive/byteorder", "archive/version"] {
        assert!(entries.iter().any(|e| e == name), "{entries:?}");
    }
    assert_eq!(entries.len(), 3 + 23, "{entries:?}");
    for i in 0..zip.len() {
        let f = zip.by_index(i).unwrap();
        assert_eq!(f.compression(), zip::CompressionMethod::Stored);
        let name = f.name().unwrap().to_string();
        if name.starts_with("archive/data/") {
            assert_eq!(f.data_start().unwrap() % 64, 0, "{name}");
        }
    }

    // f16: each value f32 → f16 once; a HalfStorage the reader takes too.
    let half = tmp.path().join("half.pth");
    export(&ckpt, Format::Pth, Precision::F16, &half).unwrap();
    let got = weights::read_state(&half).unwrap();
    for (name, t) in &reference {
        assert_eq!(got[name].dtype(), DType::F16, "{name}");
        assert_eq!(max_diff(&got[name], &t.to_dtype(DType::F16).unwrap()), 0.0);
    }

    // safetensors + upstream's LMConfig.
    let st = tmp.path().join("hf");
    export(&ckpt, Format::Safetensors, Precision::F32, &st).unwrap();
    let (b, _) = model_from(&st.join("model.safetensors"));
    assert_eq!(max_diff(&b.forward(&ids, Some(&imgs)).unwrap(), &want), 0.0);
    let lm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(st.join("config.json")).unwrap()).unwrap();
    let cfg = config();
    assert_eq!(lm["dim"], cfg.dim);
    assert_eq!(lm["n_layers"], cfg.n_layers);
    assert_eq!(lm["n_kv_heads"], cfg.n_kv_heads);
    assert_eq!(lm["max_seq_len"], cfg.max_seq_len);
    assert_eq!(lm["image_special_token"], "<".repeat(25) + &">".repeat(25));
    assert_eq!(lm["image_ids"], serde_json::json!(cfg.image_ids));
    assert_eq!(lm["use_moe"], false);

    // Not a checkpoint: named.
    let err = export(tmp.path(), Format::Pth, Precision::F32, &pth)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a checkpoint directory"), "{err}");
}

fn model_from(path: &std::path::Path) -> (Vlm, candle_nn::VarMap) {
    let (m, vm, _) = weights::load(path, &config(), false, &Device::Cpu).unwrap();
    (m, vm)
}

/// What `torch.load` does with an exported `.pth`, done by CPython's own unpickler (the one
/// `torch.load` runs) with only the three globals allowed and storages read from the zip as
/// `torch.load` reads them: every name, shape and value comes back. Runs where `MMV_PYTHON` names
/// a Python (`.ci/run` sets it); PyTorch itself is not needed.
const TORCH_LOAD_EMULATION: &str = r#"
import collections, struct, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
prefix = z.namelist()[0].split("/")[0]
def rebuild(storage, offset, shape, stride, requires_grad, hooks):
    n = 1
    for d in shape:
        n *= d
    want = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        want[i] = want[i + 1] * shape[i + 1]
    assert list(stride) == want and not requires_grad and len(hooks) == 0
    return tuple(shape), storage[offset:offset + n]
ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): rebuild, ("torch", "FloatStorage"): "f",
           ("torch", "HalfStorage"): "e", ("collections", "OrderedDict"): collections.OrderedDict}
class Unpickler(__import__("pickle").Unpickler):
    def find_class(self, module, name):
        return ALLOWED[(module, name)]
    def persistent_load(self, pid):
        tag, kind, key, location, numel = pid
        assert tag == "storage" and location == "cpu"
        data = z.read(f"{prefix}/data/{key}")
        assert len(data) == numel * struct.calcsize(kind)
        return struct.unpack(f"<{numel}{kind}", data)
assert z.read(f"{prefix}/version").strip() == b"3" and z.read(f"{prefix}/byteorder") == b"little"
sd = Unpickler(z.open(f"{prefix}/data.pkl")).load()
for name, (shape, values) in sorted(sd.items()):
    print(name, list(shape), struct.pack("<f", values[0]).hex(), struct.pack("<f", values[-1]).hex())
"#;

#[test]
fn an_exported_pth_unpickles_in_python_as_torch_load_would() {
    let Some(python) = common::python("a Python 3") else {
        return;
    };
    let (_, vm) = model("model.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("checkpoint");
    minimind_v::checkpoint::save_model(&ckpt, &vm, &config()).unwrap();
    let mut want = String::new();
    let reference: std::collections::BTreeMap<_, _> = weights::read_state(&dir().join("model.pth"))
        .unwrap()
        .into_iter()
        .collect();
    for (name, t) in &reference {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let hex = |x: f32| {
            x.to_le_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        want += &format!(
            "{name} {:?} {} {}\n",
            t.dims(),
            hex(v[0]),
            hex(*v.last().unwrap())
        );
    }
    for dtype in [
        minimind_v::export::Precision::F32,
        minimind_v::export::Precision::F16,
    ] {
        let pth = tmp.path().join("x.pth");
        minimind_v::export::export(&ckpt, minimind_v::export::Format::Pth, dtype, &pth).unwrap();
        let out = std::process::Command::new(&python)
            .args(["-c", TORCH_LOAD_EMULATION, pth.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = String::from_utf8_lossy(&out.stdout);
        if dtype == minimind_v::export::Precision::F32 {
            assert_eq!(got, want);
        } else {
            // Names and shapes; the values are f16-rounded.
            let strip = |s: &str| -> Vec<String> {
                s.lines()
                    .map(|l| l.rsplitn(3, ' ').nth(2).unwrap().to_string())
                    .collect()
            };
            assert_eq!(strip(&got), strip(&want));
        }
    }
}
