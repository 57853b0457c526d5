//! `minimind-v demo` end to end at toy scale: it announces the random tower, writes its report,
//! and a second run with other settings in the same directory starts fresh instead of meeting the
//! first run's shards.

mod common;

use std::process::Command;

fn demo(out: &std::path::Path, sft: &str) -> std::process::Output {
    Command::new(common::bin())
        .current_dir(common::repo())
        .args(["demo", "--out", out.to_str().unwrap(), "--sft", sft])
        .args(["--pretrain", "60", "--multi", "8", "--pretrain-steps", "2"])
        .args([
            "--sft-steps",
            "2",
            "--eval-images",
            "4",
            "--eval-pairs",
            "2",
        ])
        .args(["--clip", "/nonexistent", "--device", "cpu"])
        .output()
        .unwrap()
}

#[test]
fn demo_runs_twice_with_other_settings_in_one_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let first = demo(&out, "20");
    common::assert_ok(&first);
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(err.contains("RANDOM-INITIALISED"), "{err}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("RANDOM-INITIALISED"), "{report}");
    assert!(report.contains("held-out evaluation"), "{report}");
    // The no-image baseline and where and how long the run took are in the report.
    assert!(
        report.contains("with the image features zeroed: colour "),
        "{report}"
    );
    assert!(
        report.contains("demo wall time: ") && report.contains(" cores"),
        "{report}"
    );
    // Validation during training reads its own split, never the evaluation set.
    let stage: toml::Table = std::fs::read_to_string(out.join("sft.toml"))
        .map(|t| t.parse().unwrap())
        .unwrap_or_default();
    if let Some(train) = stage.get("train") {
        assert!(train["val_shards"].as_str().unwrap().ends_with("cache/val"));
    }
    assert!(out.join("cache/val/manifest.json").exists());
    assert!(out.join("sft/val.jsonl").exists());

    let second = demo(&out, "30");
    common::assert_ok(&second);
    let text = String::from_utf8_lossy(&second.stdout);
    assert!(text.contains("held-out images: 4"), "{text}");
    // Both held-out sets are read and asked: the images and the two-image pairs.
    assert!(text.contains("two-image pairs: 2;"), "{text}");
}
