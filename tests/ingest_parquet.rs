//! Upstream's later Parquet format through the real binary: a v1 JSON + images converted into it
//! (text conversations and single binaries; lists of structs and lists of binaries over several
//! files and row groups; with and without v1's names) makes the same shards as the JSON does.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Fields};
use minimind_v::ingest::records::ImageNaming;
use minimind_v::ingest::source::ImageSource;
use minimind_v::shards::manifest::{read_manifest, read_rejects};
use minimind_v::shards::reader::{list_shards, read_shard};
use minimind_v::synth::{self, SynthConfig};
use minimind_v::text::Stage;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

const CLIP: &str = "random-small:3";

/// One v1 record as the converter sees it.
struct V1 {
    id: String,
    image: Option<String>,
    /// (role, content) in the later format's terms.
    turns: Vec<(String, String)>,
    /// The images' bytes (empty where the v1 source has none: the JSON's missing image stays an
    /// unreadable one).
    images: Vec<Vec<u8>>,
}

/// The JSON's records that have a v1 shape (the others are rejects before any image is read and
/// have no Parquet form), with their images' bytes.
fn read_v1(json: &Path, images: &Path, prefix: &str) -> Vec<V1> {
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let mut source = ImageSource::open(images, 1 << 26).unwrap();
    let naming = ImageNaming {
        prefix: prefix.into(),
        max_images: 8,
    };
    let mut out = Vec::new();
    for (index, r) in records.iter().enumerate() {
        let Some(conv) = r["conversations"].as_array() else {
            continue;
        };
        let turns: Option<Vec<(String, String)>> = conv
            .iter()
            .map(|t| {
                let role = match t["from"].as_str()? {
                    "human" => "user",
                    "gpt" => "assistant",
                    other => other,
                };
                Some((role.to_string(), t["value"].as_str()?.to_string()))
            })
            .collect();
        let Some(turns) = turns else { continue };
        let image = r["image"].as_str().map(str::to_string);
        let images = image
            .as_deref()
            .map(|f| naming.split(f))
            .unwrap_or_default()
            .iter()
            .map(|name| source.read(name).unwrap_or_default())
            .collect();
        let id = match &r["id"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => index.to_string(),
            v => v.to_string(),
        };
        out.push(V1 {
            id,
            image,
            turns,
            images,
        });
    }
    out
}

/// How the converter writes the columns.
#[derive(Clone, Copy)]
struct Shape {
    /// `conversations` as a list of {role, content} structs, `image_bytes` as a list of binaries
    /// (else JSON text and one binary per row).
    lists: bool,
    /// Keep v1's names in an `image` column.
    names: bool,
}

fn batch(records: &[V1], shape: Shape) -> RecordBatch {
    let mut cols: Vec<(&str, ArrayRef)> = Vec::new();
    let ids: StringArray = records.iter().map(|r| Some(r.id.clone())).collect();
    cols.push(("id", Arc::new(ids)));
    if shape.names {
        let names: StringArray = records.iter().map(|r| r.image.clone()).collect();
        cols.push(("image", Arc::new(names)));
    }
    if shape.lists {
        let fields = Fields::from(vec![
            Field::new("role", DataType::Utf8, true),
            Field::new("content", DataType::Utf8, true),
        ]);
        let all: Vec<&(String, String)> = records.iter().flat_map(|r| &r.turns).collect();
        let role: StringArray = all.iter().map(|t| Some(t.0.clone())).collect();
        let content: StringArray = all.iter().map(|t| Some(t.1.clone())).collect();
        let values = StructArray::new(
            fields.clone(),
            vec![Arc::new(role) as ArrayRef, Arc::new(content)],
            None,
        );
        let offsets = OffsetBuffer::from_lengths(records.iter().map(|r| r.turns.len()));
        let item = Arc::new(Field::new("item", DataType::Struct(fields), true));
        cols.push((
            "conversations",
            Arc::new(ListArray::new(item, offsets, Arc::new(values), None)),
        ));
        let mut images = ListBuilder::new(BinaryBuilder::new());
        for r in records {
            for b in &r.images {
                images.values().append_value(b);
            }
            images.append(!r.images.is_empty());
        }
        cols.push(("image_bytes", Arc::new(images.finish())));
    } else {
        let mut conv = StringBuilder::new();
        let mut images = BinaryBuilder::new();
        for r in records {
            let turns: Vec<_> = r
                .turns
                .iter()
                .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
                .collect();
            conv.append_value(serde_json::to_string(&turns).unwrap());
            assert!(r.images.len() <= 1, "one binary per row");
            match r.images.first() {
                Some(b) => images.append_value(b),
                None => images.append_null(),
            }
        }
        cols.push(("conversations", Arc::new(conv.finish())));
        cols.push(("image_bytes", Arc::new(images.finish())));
    }
    RecordBatch::try_from_iter(cols).unwrap()
}

/// Write `records` as Parquet: into `files` files in the directory `out`, row groups of
/// `group_rows`.
fn write_parquet(records: &[V1], shape: Shape, out: &Path, files: usize, group_rows: usize) {
    std::fs::create_dir_all(out).unwrap();
    let per_file = records.len().div_ceil(files);
    for (k, part) in records.chunks(per_file).enumerate() {
        write_file(
            part,
            shape,
            &out.join(format!("part-{k:03}.parquet")),
            group_rows,
        );
    }
}

fn write_file(records: &[V1], shape: Shape, path: &Path, group_rows: usize) {
    let b = batch(records, shape);
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group_rows))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, b.schema(), Some(props)).unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
}

/// Every sample of an ingest (training and held-out shards) by id: its tokens, loss mask and its
/// row's features. A sample written twice fails.
type Sample = (Vec<u16>, Vec<u8>, Vec<Vec<u8>>);

fn samples_by_id(out: &Path) -> BTreeMap<String, Sample> {
    let mut all = BTreeMap::new();
    let mut paths = list_shards(out).unwrap();
    paths.extend(list_shards(&out.join("val")).unwrap_or_default());
    for f in paths {
        for row in read_shard(&f).unwrap().1 {
            for s in row.samples {
                let v = (s.input_ids, s.loss_mask, row.features.clone());
                assert!(all.insert(s.id, v).is_none(), "a sample written twice");
            }
        }
    }
    all
}

fn ingest(dir: &Path, name: &str, stage: Stage, input: &str, extra: &str) -> PathBuf {
    let out = dir.join(format!("cache/{name}"));
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "[ingest]\nstage = \"{}\"\n{input}\nout = {out:?}\ntokenizer = {:?}\nclip = \"{CLIP}\"\nrows_per_shard = 24\nclip_batch = 16\nmax_reject_rate = 0.9\n{extra}",
            stage.as_str(),
            common::tokenizer_dir(),
        ),
    )
    .unwrap();
    let run = Command::new(common::bin())
        .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
        .output()
        .unwrap();
    common::assert_ok(&run);
    out
}

fn shard_bytes(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = list_shards(out).unwrap();
    files.extend(list_shards(&out.join("val")).unwrap_or_default());
    files
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(out).unwrap().to_string_lossy().to_string();
            (rel, std::fs::read(p).unwrap())
        })
        .collect()
}

fn dataset(tmp: &Path, faults: bool) -> PathBuf {
    let ds = tmp.join("ds");
    synth::generate(&SynthConfig {
        out: ds.clone(),
        seed: 8,
        pretrain: 300,
        sft: 60,
        sft_records: 3,
        multi: 80,
        faults,
    })
    .unwrap();
    ds
}

/// Upstream's v1 JSON + zip, with every kind of fault, and the same records as Parquet rows
/// (conversations as JSON text, one binary per row, v1's names kept): the shards are the same
/// bytes, the held-out ones too; the same records are rejected (a missing image, which the
/// Parquet row holds as zero bytes, is an `empty_image` there).
#[test]
fn v1_converted_to_parquet_makes_the_same_shards_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path(), true);
    let (json, images, prefix) = synth::stage_files(&ds, Stage::Pretrain);
    let v1 = read_v1(&json, &images, prefix);
    let pq = tmp.path().join("pretrain.parquet");
    let shape = Shape {
        lists: false,
        names: true,
    };
    write_file(&v1, shape, &pq, 64);

    let split = "val_fraction = 0.2\n";
    let from_json = ingest(
        tmp.path(),
        "json",
        Stage::Pretrain,
        &format!("json = {json:?}\nimages = {images:?}"),
        split,
    );
    let from_pq = ingest(
        tmp.path(),
        "pq",
        Stage::Pretrain,
        &format!("input = {pq:?}"),
        split,
    );
    let (a, b) = (shard_bytes(&from_json), shard_bytes(&from_pq));
    assert!(
        a.iter().any(|(f, _)| f.starts_with("val/")),
        "a held-out shard"
    );
    assert_eq!(a.len(), b.len());
    for ((fa, ba), (fb, bb)) in a.iter().zip(&b) {
        assert_eq!(fa, fb);
        assert!(ba == bb, "{fa} differs");
    }
    let (ma, mb) = (
        read_manifest(&from_json).unwrap(),
        read_manifest(&from_pq).unwrap(),
    );
    assert_eq!(
        (
            ma.samples_written,
            ma.rows,
            ma.unique_images,
            ma.samples_val
        ),
        (
            mb.samples_written,
            mb.rows,
            mb.unique_images,
            mb.samples_val
        )
    );
    assert!(ma.samples_written > 200, "{}", ma.samples_written);
    let by_id = |out: &Path| -> BTreeMap<String, String> {
        read_rejects(out)
            .unwrap()
            .into_iter()
            .flat_map(|r| {
                r.ids
                    .into_iter()
                    .map(move |id| (id, r.reason.as_str().to_string()))
            })
            .collect()
    };
    let (ra, rb) = (by_id(&from_json), by_id(&from_pq));
    // Records without a v1 shape have no Parquet form: the converter leaves them out.
    let converted: std::collections::HashSet<&str> = v1.iter().map(|r| r.id.as_str()).collect();
    let ra: BTreeMap<_, _> = ra
        .into_iter()
        .filter(|(id, _)| converted.contains(id.as_str()))
        .map(|(id, r)| match r.as_str() {
            "missing_image" | "unsafe_path" => (id, "empty_image".to_string()),
            _ => (id, r),
        })
        .collect();
    assert!(ra.len() > 10, "{ra:?}");
    assert_eq!(ra, rb);
}

/// Two-image records as lists — `conversations` a list of {role, content}, `image_bytes` a list
/// of binaries — spread over three files of several row groups, with v1's names: the same shards
/// as the JSON and its image directory.
#[test]
fn lists_over_several_files_and_row_groups_make_the_same_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path(), false);
    let (json, images, prefix) = synth::stage_files(&ds, Stage::SftMulti);
    let v1 = read_v1(&json, &images, prefix);
    assert!(v1.iter().all(|r| r.images.len() == 2));
    let dir = tmp.path().join("multi");
    write_parquet(
        &v1,
        Shape {
            lists: true,
            names: true,
        },
        &dir,
        3,
        7,
    );

    let from_json = ingest(
        tmp.path(),
        "json",
        Stage::SftMulti,
        &format!("json = {json:?}\nimages = {images:?}"),
        "",
    );
    let from_pq = ingest(
        tmp.path(),
        "pq",
        Stage::SftMulti,
        &format!("input = {dir:?}"),
        "",
    );
    let (a, b) = (shard_bytes(&from_json), shard_bytes(&from_pq));
    assert!(a.len() >= 2);
    assert!(a == b, "the shards differ");
}

/// Rows without names: each image is named by its bytes, rows holding the same image share a
/// shard row, and every sample has the tokens and features the JSON's sample has. A `system`
/// turn is left out of v1's template (the model has never seen one).
#[test]
fn rows_without_names_dedup_by_content_and_leave_system_turns_out() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path(), false);
    let (json, images, prefix) = synth::stage_files(&ds, Stage::Sft);
    let mut v1 = read_v1(&json, &images, prefix);
    for r in v1.iter_mut().step_by(4) {
        r.turns
            .insert(0, ("system".into(), "You are a helpful assistant.".into()));
    }
    let pq = tmp.path().join("sft");
    write_parquet(
        &v1,
        Shape {
            lists: false,
            names: false,
        },
        &pq,
        2,
        50,
    );

    let from_json = ingest(
        tmp.path(),
        "json",
        Stage::Sft,
        &format!("json = {json:?}\nimages = {images:?}\nimage_prefix = \"{prefix}\""),
        "",
    );
    let from_pq = ingest(
        tmp.path(),
        "pq",
        Stage::Sft,
        &format!("input = {pq:?}\nformat = \"parquet\""),
        "",
    );
    let (a, b) = (samples_by_id(&from_json), samples_by_id(&from_pq));
    assert_eq!(a.len(), v1.len());
    assert!(a == b, "a sample differs");
    let (ma, mb) = (
        read_manifest(&from_json).unwrap(),
        read_manifest(&from_pq).unwrap(),
    );
    assert_eq!((ma.rows, mb.rows), (60, 60), "3 records per image");
    for f in list_shards(&from_pq).unwrap() {
        for row in read_shard(&f).unwrap().1 {
            let name = &row.images[0];
            assert!(
                name.starts_with("sha256:") && name.len() == 7 + 16,
                "{name}"
            );
        }
    }
}

/// A stated format that is not the file's, a Parquet input given `images`, a Parquet file
/// without `image_bytes`: each fails before any work, naming the file and the fix.
#[test]
fn parquet_mistakes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path(), false);
    let (json, images, _) = synth::stage_files(&ds, Stage::Pretrain);
    let v1 = read_v1(&json, &images, "");
    let pq = tmp.path().join("five.parquet");
    let shape = Shape {
        lists: false,
        names: false,
    };
    write_file(&v1[..5], shape, &pq, 64);
    let no_images = tmp.path().join("no_images.parquet");
    {
        let b = batch(
            &v1[..5],
            Shape {
                lists: false,
                names: false,
            },
        );
        let b = b.project(&[0, 1]).unwrap();
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&no_images).unwrap(), b.schema(), None)
                .unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
    }
    let fails = |input: String, want: &[&str]| {
        let p = tmp.path().join("bad.toml");
        std::fs::write(
            &p,
            format!(
                "[ingest]\nstage = \"pretrain\"\n{input}\nout = {:?}\nclip = \"{CLIP}\"\n",
                tmp.path().join("out")
            ),
        )
        .unwrap();
        let run = Command::new(common::bin())
            .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr).to_string();
        assert!(!run.status.success());
        for w in want {
            assert!(err.contains(w), "{w:?} not in {err}");
        }
    };
    fails(
        format!("input = {json:?}\nformat = \"parquet\""),
        &["chat-translated.json", "not Parquet", "HINT"],
    );
    fails(
        format!("input = {pq:?}\nimages = {images:?}"),
        &["Parquet", "remove `images`"],
    );
    fails(format!("input = {json:?}"), &["set `images`"]);
    fails(
        format!("input = {no_images:?}"),
        &["no_images.parquet", "no `image_bytes` column", "HINT"],
    );
}

/// A corpus planned in windows of 50 rows (row groups of 25): every sample is written once with
/// the tokens and features the JSON gives it, images shared by rows of one window share a row
/// (one row per image and window), held-out shards follow each window's training ones, the
/// directory verifies, and a rerun finds every shard done.
#[test]
fn windows_plan_a_corpus_piece_by_piece_and_cover_every_sample_once() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path(), false);
    let (json, images, prefix) = synth::stage_files(&ds, Stage::Sft);
    let v1 = read_v1(&json, &images, prefix);
    let pq = tmp.path().join("sft.parquet");
    let shape = Shape {
        lists: false,
        names: false,
    };
    write_file(&v1, shape, &pq, 25);
    let settings = "val_fraction = 0.3\nplan_window = 50\n";
    let from_pq = ingest(
        tmp.path(),
        "pq",
        Stage::Sft,
        &format!("input = {pq:?}"),
        settings,
    );
    let from_json = ingest(
        tmp.path(),
        "json",
        Stage::Sft,
        &format!("json = {json:?}\nimages = {images:?}\nimage_prefix = \"{prefix}\""),
        "val_fraction = 0.3\n",
    );

    let mut files: Vec<String> = list_shards(&from_pq)
        .unwrap()
        .into_iter()
        .chain(list_shards(&from_pq.join("val")).unwrap())
        .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    files.sort();
    let (a, b) = (samples_by_id(&from_json), samples_by_id(&from_pq));
    assert_eq!(b.len(), v1.len());
    assert!(a == b, "a sample differs from the JSON's");
    let want: Vec<String> = (0..files.len())
        .map(|i| format!("shard-{i:05}.parquet"))
        .collect();
    assert_eq!(files, want, "shard indices run on across windows");

    // One row per distinct image within each window of 50 rows.
    let per_window: usize = v1
        .chunks(50)
        .map(|w| {
            let names: std::collections::HashSet<&Vec<u8>> =
                w.iter().map(|r| &r.images[0]).collect();
            names.len()
        })
        .sum();
    let m = read_manifest(&from_pq).unwrap();
    assert!(per_window > 60, "images recur across windows: {per_window}");
    assert_eq!(
        (m.rows, m.samples_written, m.samples_rejected),
        (per_window, v1.len(), 0)
    );
    assert!(m.samples_val > 0 && m.samples_val < v1.len());
    let verify = Command::new(common::bin())
        .args(["inspect", from_pq.to_str().unwrap(), "--verify"])
        .output()
        .unwrap();
    common::assert_ok(&verify);

    let again = Command::new(common::bin())
        .args([
            "ingest",
            tmp.path().join("pq.toml").to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    common::assert_ok(&again);
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("0 written now"), "{text}");
}
