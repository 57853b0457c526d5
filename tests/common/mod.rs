//! Shared test helpers: where the reference vectors live, and tensor comparison.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/reference` beside the checkout (CI clones with shared/ beside it).
pub fn reference() -> PathBuf {
    let p = repo().join("../shared/reference");
    assert!(
        p.exists(),
        "golden vectors missing: expected {}",
        p.display()
    );
    p
}

pub fn tokenizer_dir() -> PathBuf {
    repo().join("assets/tokenizer")
}

/// Largest absolute difference between two slices; NaN (within no tolerance) when either holds
/// a non-finite value or the lengths differ (`minimind_v::compare`).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    minimind_v::compare::Diff::of(a, b).abs()
}

/// Peak resident memory of this process so far (`VmHWM`), bytes.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_minimind-v")
}
pub mod http;

/// Fail with the command's stderr (and stdout) when it did not succeed.
#[track_caller]
pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "exit {}\n--- stderr\n{}\n--- stdout\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The Python named by `MMV_PYTHON` (`.ci/run` makes a venv with polars, pyarrow and duckdb and
/// requires it with `MMV_PYTHON_TEST=require`); `None`, with a SKIPPED message naming `needs`,
/// when it is not set and not required.
pub fn python(needs: &str) -> Option<String> {
    let Ok(python) = std::env::var("MMV_PYTHON") else {
        assert!(
            std::env::var("MMV_PYTHON_TEST").as_deref() != Ok("require"),
            "MMV_PYTHON_TEST=require but MMV_PYTHON is not set"
        );
        eprintln!("SKIPPED: set MMV_PYTHON to {needs} (.ci/run does)");
        return None;
    };
    Some(python)
}

/// Shard metadata for tests that write shards themselves: a random small tower's 2×3 features.
pub fn shard_meta() -> minimind_v::shards::ShardMeta {
    use minimind_v::shards::{ClipPrecision, ShardMeta, SCHEMA_VERSION};
    ShardMeta {
        schema_version: SCHEMA_VERSION.into(),
        stage: "sft_multi".into(),
        clip_source: "random-small:1".into(),
        clip_weights: "random-small:1".into(),
        clip_random: true,
        tokenizer_sha256: "abc".into(),
        image_size: 224,
        feature_dtype: "f16".into(),
        feature_shape: [2, 3],
        placeholder_ids: minimind_v::text::placeholder_ids(),
        max_seq_len: 512,
        clip_precision: ClipPrecision::Tf32,
    }
}
