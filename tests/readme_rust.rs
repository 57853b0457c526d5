//! The README's Rust snippet, compiled and run as written. Its own test binary: it changes the
//! working directory (the snippet names `cache/pretrain/data` relative to it).

mod common;

use minimind_v::shards::writer::write_shard;
use minimind_v::shards::{f32_to_f16_bytes, Sample, ShardRow};

/// The snippet, between the markers exactly as the README shows it (indented here).
fn readme_snippet() -> polars::prelude::PolarsResult<polars::prelude::DataFrame> {
    // README begin
    use polars::prelude::*;

    let lf = LazyFrame::scan_parquet(
        PlRefPath::new("cache/pretrain/data/*.parquet"),
        Default::default(),
    )?;
    // One row per sample: its length.
    let lengths = lf
        .explode(
            cols(["samples"]),
            ExplodeOptions {
                empty_as_null: false,
                keep_nulls: false,
            },
        )
        .unnest(cols(["samples"]), None)
        .select([col("input_ids").list().len()])
        .collect()?;
    // README end
    Ok(lengths)
}

#[test]
fn the_readmes_rust_snippet_is_this_one_and_reads_the_sample_lengths() {
    let source = std::fs::read_to_string(common::repo().join("tests/readme_rust.rs")).unwrap();
    let begin = "// README begin\n";
    let body = &source[source.find(begin).unwrap() + begin.len()..];
    let body = &body[..body.find("// README end").unwrap()];
    let body = &body[..body.rfind('\n').unwrap() + 1];
    let ours: String = body
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let theirs = readme
        .split("```rust\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a rust snippet in the README");
    assert_eq!(
        ours, theirs,
        "the README's Rust snippet differs from the one this test runs"
    );

    // An ingest's directory: shards in data/, the rest beside it.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cache/pretrain");
    std::fs::create_dir_all(out.join("progress")).unwrap();
    std::fs::write(out.join("manifest.json"), "{}").unwrap();
    let meta = common::shard_meta();
    let mut want = Vec::new();
    for shard in 0..2 {
        let rows: Vec<ShardRow> = (0..5)
            .map(|r| ShardRow {
                image_key: format!("{shard}-{r}.jpg"),
                images: vec![format!("{shard}-{r}.jpg")],
                features: vec![f32_to_f16_bytes(&[0.5, -1.0, 0.25, 2.0, 0.0, 1.0])],
                samples: (0..r % 3)
                    .map(|k| {
                        let len = 1 + shard * 10 + r * 3 + k;
                        want.push(len as u32);
                        Sample {
                            id: format!("{shard}-{r}-{k}"),
                            input_ids: vec![7; len],
                            loss_mask: vec![1; len],
                        }
                    })
                    .collect(),
            })
            .collect();
        let file = out.join(minimind_v::shards::shard_file(shard, false));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        write_shard(&file, &rows, &meta).unwrap();
    }
    std::env::set_current_dir(tmp.path()).unwrap();
    let lengths = readme_snippet().unwrap();
    let got: Vec<u32> = lengths
        .column("input_ids")
        .unwrap()
        .u32()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert_eq!(got, want);
}
