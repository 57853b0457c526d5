//! The shipped pipeline files parse, validate and accept overrides; unknown keys are errors.

mod common;

use minimind_v::config::load_pipeline;

#[test]
fn shipped_pipelines_parse() {
    for name in ["pretrain", "sft", "sft_multi"] {
        let path = common::repo().join(format!("pipelines/{name}.toml"));
        let p = load_pipeline(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ingest = p.ingest.unwrap();
        assert_eq!(ingest.stage.as_str(), name);
        let train = p.train.unwrap();
        assert_eq!(
            minimind_v::train::model_config(&train).unwrap(),
            minimind_v::model::ModelConfig::minimind_512()
        );
    }
}

#[test]
fn overrides_are_checked_like_the_file() {
    let path = common::repo().join("pipelines/sft.toml");
    let p = load_pipeline(
        &path,
        &[
            "ingest.clip=random:3".into(),
            "train.steps=7".into(),
            "train.lr=2e-5".into(),
        ],
    )
    .unwrap();
    assert_eq!(p.ingest.unwrap().clip, "random:3");
    let t = p.train.unwrap();
    assert_eq!((t.steps, t.lr), (7, 2e-5));
    let err = load_pipeline(&path, &["train.stepz=7".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("stepz") && err.contains("sft.toml"), "{err}");
    let err = load_pipeline(&path, &["ingest.max_seq_len=0".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_seq_len"), "{err}");
}

/// Every numeric setting is checked when the file is read, and its refusal names it (a
/// `checkpoint_every` of 0 was a division by zero in the middle of a run).
#[test]
fn every_setting_refuses_its_invalid_values_by_name() {
    let path = common::repo().join("pipelines/sft.toml");
    let cases = [
        ("train.steps=0", "steps = 0"),
        ("train.batch_size=0", "batch_size = 0"),
        ("train.grad_accum=0", "grad_accum = 0"),
        ("train.checkpoint_every=0", "checkpoint_every = 0"),
        ("train.val_every=0", "val_every = 0"),
        ("train.val_batches=0", "val_batches = 0"),
        ("train.shuffle_buffer=0", "shuffle_buffer = 0"),
        ("train.bucket_batches=0", "bucket_batches = 0"),
        ("train.pad_to=0", "pad_to = 0"),
        ("train.lr=0", "lr = 0"),
        ("train.lr=nan", "lr = NaN"),
        ("train.lr=-1e-3", "lr = -0.001"),
        ("train.grad_clip=0", "grad_clip = 0"),
        ("train.weight_decay=-0.1", "weight_decay = -0.1"),
        ("train.adam_beta2=1.5", "adam_beta2 = 1.5"),
        ("train.warmup_steps=99999999", "warmup_steps = 99999999"),
        ("ingest.max_seq_len=0", "max_seq_len"),
        ("ingest.rows_per_shard=0", "rows_per_shard"),
        ("ingest.clip_batch=0", "clip_batch"),
        ("ingest.image_limits.max_side=0", "max_side"),
        ("ingest.image_limits.max_pixels=0", "max_pixels"),
        ("ingest.image_limits.max_bytes=0", "max_bytes"),
    ];
    for (set, want) in cases {
        let err = match load_pipeline(&path, &[set.into()]) {
            Ok(_) => panic!("{set} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(want) && err.contains("sft.toml"),
            "{set}: {err}"
        );
    }
}

/// A smaller model from the command line: a preset plus per-field overrides, upstream's fixed
/// values (vocabulary, placeholder ids, multiple_of, RoPE theta) taken from the preset; a
/// partial table; `init = none` for random initialisation.
#[test]
fn a_model_is_a_preset_with_fields_over_it() {
    use minimind_v::model::ModelConfig;
    use minimind_v::train::model_config;
    let path = common::repo().join("pipelines/pretrain.toml");
    let load = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load_pipeline(&path, &sets).unwrap().train.unwrap()
    };
    let t = load(&["train.model.dim=96", "train.model.n_layers=4"]);
    let m = model_config(&t).unwrap();
    assert_eq!(
        m,
        ModelConfig {
            dim: 96,
            n_layers: 4,
            ..ModelConfig::minimind_512()
        }
    );
    let t = load(&["train.model.preset=\"tiny\"", "train.model.vision_dim=192"]);
    assert_eq!(
        model_config(&t).unwrap(),
        ModelConfig {
            vision_dim: 192,
            ..ModelConfig::tiny()
        }
    );
    assert!(load(&[]).init.is_some());
    assert!(load(&["train.init=none"]).init.is_none());
    let err = load_pipeline(&path, &["train.model.dimm=96".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `dimm`"), "{err}");
}

#[test]
fn config_lists_every_key_and_resolves_a_pipeline() {
    let run = |args: &[&str]| {
        std::process::Command::new(common::bin())
            .args(args)
            .current_dir(common::repo())
            .output()
            .unwrap()
    };
    let out = run(&["config", "--list"]);
    common::assert_ok(&out);
    let list = String::from_utf8_lossy(&out.stdout);
    for key in minimind_v::config::keys::KEYS {
        assert!(list.contains(key.key), "{} missing", key.key);
    }
    let out = run(&["config", "pipelines/sft.toml", "--set", "train.steps=5"]);
    common::assert_ok(&out);
    let resolved: toml::Table = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    assert_eq!(resolved["train"]["steps"].as_integer(), Some(5));
    // Defaults the file does not name are filled in.
    assert_eq!(resolved["train"]["adam_beta2"].as_float(), Some(0.999));
    assert_eq!(
        resolved["ingest"]["image_limits"]["max_side"].as_integer(),
        Some(8192)
    );
    let out = run(&["config", "pipelines/sft.toml", "--set", "train.stepz=5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stepz"));
}
