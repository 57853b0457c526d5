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
        assert_eq!(train.model.resolve().unwrap().dim, 512);
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
