//! The shipped pipeline files parse, validate and accept overrides; unknown keys are errors.

mod common;

use minimind_v::config::load_pipeline;

/// The shipped pipelines are upstream v1's recipe (1-pretrain_vlm.py / 2-sft_vlm.py defaults):
/// 19 epochs of batch 32, Adam at 4e-4 (pretrain) or 1e-6 (SFT, two-image SFT), no warmup, clip
/// 1.0, each stage starting from the one before.
#[test]
fn shipped_pipelines_are_upstreams_recipe() {
    for (name, lr, init) in [
        ("pretrain", 4e-4, "out/512_llm.pth"),
        ("sft", 1e-6, "out/pretrain/checkpoint"),
        ("sft_multi", 1e-6, "out/sft/checkpoint"),
    ] {
        let path = common::repo().join(format!("pipelines/{name}.toml"));
        let t = load_pipeline(&path, &[]).unwrap().train.unwrap();
        let got = (
            t.steps,
            t.epochs,
            t.batch_size,
            t.grad_accum,
            t.lr,
            t.warmup_steps,
        );
        assert_eq!(got, (None, Some(19), 32, 1, lr, 0), "{name}");
        assert_eq!(
            (t.grad_clip, t.weight_decay, t.adam_beta2),
            (1.0, 0.0, 0.999),
            "{name}"
        );
        assert_eq!(
            t.init.as_deref(),
            Some(std::path::Path::new(init)),
            "{name}"
        );
        assert_eq!(t.trainable, minimind_v::config::Trainable::All, "{name}");
    }
}

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
    // The file gives epochs; an override of steps replaces them (exactly one is allowed).
    assert_eq!((t.steps, t.epochs, t.lr), (Some(7), None, 2e-5));
    let t = load_pipeline(&path, &["train.steps=7".into(), "train.epochs=2".into()])
        .unwrap()
        .train
        .unwrap();
    assert_eq!((t.steps, t.epochs), (None, Some(2)));
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
        ("train.epochs=0", "epochs = 0"),
        ("ingest.max_seq_len=0", "max_seq_len"),
        ("ingest.rows_per_shard=0", "rows_per_shard"),
        ("ingest.clip_batch=0", "clip_batch"),
        ("ingest.image_limits.max_side=0", "max_side"),
        ("ingest.image_limits.max_pixels=0", "max_pixels"),
        ("ingest.image_limits.max_bytes=0", "max_bytes"),
    ];
    let cases = cases.iter().map(|&(set, want)| (vec![set], want)).chain([(
        vec!["train.steps=10", "train.warmup_steps=11"],
        "warmup_steps = 11 is more than steps = 10",
    )]);
    for (sets, want) in cases {
        let set = sets.join(" ");
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let err = match load_pipeline(&path, &sets) {
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

/// A run's length is given one way: a file with both steps and epochs, or neither, is refused.
#[test]
fn a_run_is_given_in_steps_or_in_epochs_never_both() {
    let tmp = tempfile::tempdir().unwrap();
    for (length, want) in [
        ("steps = 5\nepochs = 2\n", "both steps and epochs are set"),
        ("", "neither steps nor epochs is set"),
    ] {
        let p = tmp.path().join("p.toml");
        std::fs::write(
            &p,
            format!("[train]\nshards = \"s\"\nout = \"o\"\n{length}"),
        )
        .unwrap();
        let err = load_pipeline(&p, &[]).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("p.toml"), "{err}");
    }
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
