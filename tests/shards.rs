//! Shard write → read round trip, Polars compatibility, and refusal of unknown versions.

mod common;

use std::sync::Arc;

use minimind_v::shards::reader::{read_meta, read_shard};
use minimind_v::shards::writer::write_shard;
use minimind_v::shards::{f16_bytes_to_f32, f32_to_f16_bytes, Sample, ShardRow};
use minimind_v::Error;

fn rows() -> Vec<ShardRow> {
    (0..300)
        .map(|i| ShardRow {
            image_key: format!("{i}.jpg, {}.jpg", i + 1),
            images: vec![format!("{i}.jpg"), format!("{}.jpg", i + 1)],
            features: vec![
                f32_to_f16_bytes(&[i as f32, -1.5, 0.25, 3.0, 1e-3, 7.0]),
                f32_to_f16_bytes(&[0.0; 6]),
            ],
            samples: (0..(i % 3))
                .map(|k| Sample {
                    id: format!("{i}-{k}"),
                    input_ids: (0..(i + k) as u16 % 40 + 1).map(|t| t * 100).collect(),
                    loss_mask: (0..(i + k) % 40 + 1).map(|t| (t % 2) as u8).collect(),
                })
                .collect(),
        })
        .collect()
}

#[test]
fn write_then_read_returns_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("shard-00000.parquet");
    let input = rows();
    let (bytes, sha) = write_shard(&path, &input, &common::shard_meta()).unwrap();
    assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(sha, minimind_v::util::sha256_file(&path).unwrap());
    let (m, back) = read_shard(&path).unwrap();
    assert_eq!(m, common::shard_meta());
    assert_eq!(back, input);
    assert_eq!(
        f16_bytes_to_f32(&back[5].features[0]),
        vec![
            5.0,
            -1.5,
            0.25,
            3.0,
            half::f16::from_f32(1e-3).to_f32(),
            7.0
        ]
    );
    // Same rows, same bytes: what makes resumed ingests reproducible.
    let again = tmp.path().join("shard-00001.parquet");
    assert_eq!(
        write_shard(&again, &input, &common::shard_meta())
            .unwrap()
            .1,
        sha
    );
}

#[test]
fn polars_scans_and_explodes_samples() {
    let tmp = tempfile::tempdir().unwrap();
    write_shard(
        &tmp.path().join("shard-00000.parquet"),
        &rows(),
        &common::shard_meta(),
    )
    .unwrap();
    write_shard(
        &tmp.path().join("shard-00001.parquet"),
        &rows()[..10],
        &common::shard_meta(),
    )
    .unwrap();
    let stats = minimind_v::inspect::sample_stats(tmp.path()).unwrap();
    let all: Vec<ShardRow> = rows()
        .into_iter()
        .chain(rows().into_iter().take(10))
        .collect();
    let samples: Vec<&Sample> = all.iter().flat_map(|r| &r.samples).collect();
    assert_eq!(stats.rows, 310);
    assert_eq!(stats.images, 620);
    assert_eq!(stats.samples, samples.len());
    let mut want: Vec<u32> = samples.iter().map(|s| s.input_ids.len() as u32).collect();
    let mut got = stats.lengths.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(
        stats.loss_tokens,
        samples
            .iter()
            .map(|s| s.loss_mask.iter().map(|&m| m as u64).sum::<u64>())
            .sum::<u64>()
    );
}

#[test]
fn unknown_schema_version_is_refused_with_the_file_named() {
    use arrow_array::{Int32Array, RecordBatch};
    use parquet::arrow::ArrowWriter;
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("shard-00000.parquet");
    let batch =
        RecordBatch::try_from_iter([("x", Arc::new(Int32Array::from(vec![1])) as _)]).unwrap();
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "schema_version".into(),
            "99".to_string(),
        )]))
        .build();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    match read_meta(&path) {
        Err(Error::SchemaVersion { path: p, found, .. }) => {
            assert_eq!(p, path);
            assert_eq!(found.as_deref(), Some("99"));
        }
        other => panic!("expected a schema-version error, got {other:?}"),
    }
    let err = minimind_v::inspect::report(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard-00000.parquet") && err.contains("HINT"),
        "{err}"
    );
}

/// The README's Python snippets, run as written on shards in `cache/pretrain/` with the Python
/// named by `MMV_PYTHON` (which needs polars and pyarrow; `.ci/run` makes such a venv and requires
/// it with `MMV_PYTHON_TEST=require`; skipped with a message otherwise).
#[test]
fn the_readmes_python_snippets_run_as_written() {
    let Some(python) = common::python("a Python with polars, pyarrow and duckdb") else {
        return;
    };
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let snippets: Vec<&str> = readme
        .split("```python\n")
        .skip(1)
        .map(|s| s.split("```").next().unwrap())
        .collect();
    assert!(!snippets.is_empty(), "no python snippet in the README");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cache/pretrain");
    let all = rows();
    for (i, part) in all.chunks(150).enumerate() {
        let file = out.join(minimind_v::shards::shard_file(i, false));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        write_shard(&file, part, &common::shard_meta()).unwrap();
    }
    // What an ingest writes beside data/, which the snippets must not trip over: its manifest,
    // rejects, progress records, lock and held-out split.
    std::fs::write(out.join("manifest.json"), "{}").unwrap();
    std::fs::write(out.join("rejects.jsonl"), "").unwrap();
    std::fs::write(out.join(".ingest-0-of-1.lock"), "1").unwrap();
    std::fs::create_dir_all(out.join("progress")).unwrap();
    std::fs::write(out.join("progress/shard-00000.json"), "{}").unwrap();
    let val = out.join(minimind_v::shards::shard_file(2, true));
    std::fs::create_dir_all(val.parent().unwrap()).unwrap();
    write_shard(&val, &all[..10], &common::shard_meta()).unwrap();
    let samples: usize = all.iter().map(|r| r.samples.len()).sum();
    for snippet in snippets {
        let out = std::process::Command::new(&python)
            .args(["-c", snippet])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{snippet}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Polars counts the samples (exploded), pyarrow the rows and the metadata comes back,
        // DuckDB sums the samples — all of data/, none of val/.
        assert!(stdout.contains(&format!("{samples}.0")), "{stdout}");
        assert!(stdout.contains("300 b'random-small:1'"), "{stdout}");
        assert!(
            stdout.contains(&format!("samples: {samples}\n")),
            "{stdout}"
        );
    }
}
