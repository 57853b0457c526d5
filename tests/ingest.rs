//! End-to-end ingest through the real binary on synthetic datasets in upstream's three formats:
//! counts, rejects, deduplication, token ids and features against direct computation, Polars
//! readability, SIGKILL + resume, and multi-worker splits.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use minimind_v::compare;
use minimind_v::ingest::source::ImageSource;
use minimind_v::shards::manifest::{read_manifest, read_rejects, Manifest};
use minimind_v::shards::reader::{list_shards, read_shard};
use minimind_v::shards::{f16_bytes_to_f32, ClipPrecision};
use minimind_v::synth::{self, SynthConfig};
use minimind_v::text::{ChatTokenizer, Stage, Turn};
use minimind_v::vision::clip::ClipTower;
use minimind_v::vision::preprocess::load_resized;

const CLIP: &str = "random-small:3";

fn pipeline(
    dir: &Path,
    name: &str,
    stage: &str,
    json: &Path,
    images: &Path,
    prefix: &str,
    rows: usize,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "[ingest]\nstage = \"{stage}\"\njson = {json:?}\nimages = {images:?}\nimage_prefix = \"{prefix}\"\nout = {out:?}\ntokenizer = {tok:?}\nclip = \"{CLIP}\"\nrows_per_shard = {rows}\nclip_batch = 16\n",
        out = dir.join(format!("cache/{name}")),
        tok = common::tokenizer_dir(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn ingest(pipeline: &Path, extra: &[&str]) -> std::process::Output {
    let out = Command::new(common::bin())
        .args(["ingest", pipeline.to_str().unwrap(), "--device", "cpu"])
        .args(extra)
        .output()
        .unwrap();
    common::assert_ok(&out);
    out
}

/// Stored (f16) features against a direct f32 computation: within 2e-3 of each value's magnitude
/// (at least 1), f16's rounding. NaN or infinity on either side fails.
fn check_stored_features(got: &[f32], want: &[f32]) -> Result<(), String> {
    let worst = compare::worst(got, want, |g, w| (g - w).abs() / w.abs().max(1.0));
    if compare::within(worst, 2e-3) {
        Ok(())
    } else {
        Err(format!("features differ by {worst} (f16 storage: 2e-3)"))
    }
}

/// An f16 ingest's features against an f32 ingest's: different, and within 1e-2 of their largest
/// magnitude. NaN or infinity on either side fails.
fn check_f16_ingest(f16: &[f32], f32: &[f32]) -> Result<(), String> {
    let d = compare::Diff::of(f16, f32);
    if d.abs() == 0.0 {
        return Err("f16 features equal the f32 ones: the tower did not run in f16".into());
    }
    d.check_rel(1e-2, "f16 vs f32 ingest")
}

#[test]
fn the_feature_checks_fail_on_non_finite_values() {
    let want = vec![0.5f32, -3.0, 2.0, 0.0];
    let close: Vec<f32> = want.iter().map(|v| v + 1e-3).collect();
    assert!(check_stored_features(&want, &want).is_ok());
    assert!(check_f16_ingest(&close, &want).is_ok());
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut got = close.clone();
        got[1] = bad;
        assert!(check_stored_features(&got, &want).is_err(), "{bad}");
        assert!(check_stored_features(&want, &got).is_err(), "{bad}");
        assert!(check_f16_ingest(&got, &want).is_err(), "{bad}");
        assert!(
            check_stored_features(&[bad; 4], &want).is_err(),
            "all {bad}"
        );
    }
}

fn reasons(m: &Manifest) -> Vec<(String, usize)> {
    m.rejects_by_reason
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

fn n_residue(n: usize, modulus: usize, r: usize) -> usize {
    (0..n).filter(|i| i % modulus == r).count()
}

#[test]
fn three_upstream_formats_with_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("dataset");
    // ≥2,000 images in each format.
    let (n_pre, n_sft, n_multi) = (2000, 2000, 1000);
    let planted = synth::generate(&SynthConfig {
        out: ds.clone(),
        seed: 1,
        pretrain: n_pre,
        sft: n_sft,
        sft_records: 3,
        multi: n_multi,
        faults: true,
    })
    .unwrap();

    // --- pretrain: zip with a folder inside, one caption per image.
    let p = pipeline(
        tmp.path(),
        "pretrain",
        "pretrain",
        &ds.join("LLaVA-Pretrain/chat-translated.json"),
        &ds.join("pretrain_images.zip"),
        "",
        512,
    );
    let out = ingest(&p, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("RANDOM-INITIALISED"),
        "random tower must be announced: {stdout}"
    );
    let m = read_manifest(&tmp.path().join("cache/pretrain")).unwrap();
    assert_eq!(m.records_read, n_pre + 1);
    assert_eq!(
        m.samples_written + m.samples_rejected,
        m.records_read,
        "no sample vanishes"
    );
    let r = |k| n_residue(n_pre, 97, k);
    assert_eq!(
        reasons(&m),
        vec![
            ("answer_truncated".into(), r(89)),
            ("corrupt_image".into(), r(13)),
            ("empty_image".into(), r(29)),
            ("image_tag_mismatch".into(), r(53)),
            ("malformed_record".into(), 1),
            ("missing_image".into(), r(41)),
            ("no_conversations".into(), r(67)),
            ("placeholder_truncated".into(), r(5)),
        ]
    );
    assert_eq!(planted.faults["corrupt_image"], r(13));
    assert_eq!(m.placeholders_repaired, r(79));
    assert_eq!(m.rows, m.samples_written, "pretrain: one caption per image");
    let image_rejects = r(13) + r(29) + r(41);
    assert_eq!(m.shards.len(), (m.rows + image_rejects).div_ceil(512));
    let meta = m.meta.clone().unwrap();
    assert_eq!(meta.feature_shape, [50, 192]);
    assert!(meta.clip_random && meta.clip_weights == CLIP);
    let rejects = read_rejects(&tmp.path().join("cache/pretrain")).unwrap();
    assert_eq!(
        rejects.iter().map(|r| r.ids.len()).sum::<usize>(),
        m.samples_rejected
    );
    assert!(
        rejects.windows(2).all(|w| w[0].record <= w[1].record),
        "rejects in source order"
    );

    // Token ids and features of a few rows against a direct computation.
    let tok = ChatTokenizer::load(&common::tokenizer_dir()).unwrap();
    let records: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ds.join("LLaVA-Pretrain/chat-translated.json")).unwrap(),
    )
    .unwrap();
    let tower = ClipTower::load(&CLIP.parse().unwrap(), &Device::Cpu).unwrap();
    let mut zip = ImageSource::open(&ds.join("pretrain_images.zip"), 1 << 26).unwrap();
    let (_, rows) =
        read_shard(&tmp.path().join("cache/pretrain/data/shard-00000.parquet")).unwrap();
    for row in rows.iter().step_by(97).take(6) {
        let rec = records
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["image"] == row.image_key.as_str())
            .unwrap();
        let turns: Vec<Turn> = serde_json::from_value(rec["conversations"].clone()).unwrap();
        let enc = tok.encode_sample(Stage::Pretrain, &turns, 1, 512).unwrap();
        assert_eq!(
            row.samples[0].input_ids,
            enc.input_ids.iter().map(|&t| t as u16).collect::<Vec<_>>()
        );
        assert_eq!(row.samples[0].loss_mask, enc.loss_mask);
        let px =
            load_resized(&zip.read(&row.images[0]).unwrap(), 224, &Default::default()).unwrap();
        let want = tower
            .features_u8(&[&px])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = f16_bytes_to_f32(&row.features[0]);
        check_stored_features(&got, &want).unwrap_or_else(|e| panic!("{}: {e}", row.image_key));
    }

    // Polars reads the shards: scan_parquet(...).explode("samples").
    let stats = minimind_v::inspect::sample_stats(&tmp.path().join("cache/pretrain")).unwrap();
    assert_eq!(
        (stats.rows, stats.samples, stats.images),
        (m.rows, m.samples_written, m.unique_images)
    );
    let report = Command::new(common::bin())
        .args([
            "inspect",
            tmp.path().join("cache/pretrain").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.contains("samples: ")
            && report.contains("loss-token share")
            && report.contains("rejected corrupt_image"),
        "{report}"
    );

    // --- SFT: prefixed COCO names, three conversations per image, deduplicated to one row.
    let p = pipeline(
        tmp.path(),
        "sft",
        "sft",
        &ds.join("LLaVA-Instruct/llava_instruct_230k.json"),
        &ds.join("sft_images.zip"),
        "COCO_train2014_",
        256,
    );
    ingest(&p, &[]);
    let m = read_manifest(&tmp.path().join("cache/sft")).unwrap();
    assert_eq!(m.records_read, 3 * n_sft);
    assert_eq!(m.rows, n_sft, "CLIP once per unique image");
    assert_eq!(m.unique_images, n_sft);
    assert_eq!(
        reasons(&m),
        vec![("empty_answer".into(), n_residue(n_sft, 89, 7))]
    );
    assert_eq!(m.samples_written + m.samples_rejected, m.records_read);
    let (_, rows) = read_shard(&tmp.path().join("cache/sft/data/shard-00000.parquet")).unwrap();
    assert!(rows[0].images[0].starts_with("COCO_train2014_"));
    assert!(rows
        .iter()
        .all(|r| !r.samples.is_empty() && r.samples.len() <= 3));

    // --- Two-image SFT: "a.jpg, b.jpg" from a plain directory.
    let dir = ds.join("sft_multi_images");
    let p = pipeline(
        tmp.path(),
        "multi",
        "sft_multi",
        &dir.join("output.json"),
        &dir,
        "",
        128,
    );
    ingest(&p, &[]);
    let m = read_manifest(&tmp.path().join("cache/multi")).unwrap();
    let bad = n_residue(n_multi, 83, 11);
    assert_eq!(m.records_read, n_multi);
    assert_eq!(m.samples_written + m.samples_rejected, m.records_read);
    assert_eq!(reasons(&m), vec![("image_tag_mismatch".into(), bad)]);
    assert_eq!(
        (m.rows, m.unique_images),
        (n_multi - bad, 2 * (n_multi - bad))
    );
    let (_, rows) = read_shard(&tmp.path().join("cache/multi/data/shard-00000.parquet")).unwrap();
    assert_eq!(rows[0].images, vec!["0.jpg", "1.jpg"]);
    assert_eq!(rows[0].features.len(), 2);
    assert_ne!(rows[0].features[0], rows[0].features[1]);
    assert_eq!(
        minimind_v::text::placeholder_starts(
            &rows[0].samples[0]
                .input_ids
                .iter()
                .map(|&t| t as u32)
                .collect::<Vec<_>>()
        )
        .len(),
        2
    );
}

fn shard_hashes(dir: &Path) -> Vec<(String, String)> {
    list_shards(dir)
        .unwrap()
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                minimind_v::util::sha256_file(p).unwrap(),
            )
        })
        .collect()
}

fn small_dataset(tmp: &Path) -> (PathBuf, PathBuf) {
    let ds = tmp.join("dataset");
    synth::generate(&SynthConfig {
        out: ds.clone(),
        seed: 5,
        pretrain: 700,
        sft: 0,
        sft_records: 3,
        multi: 0,
        faults: true,
    })
    .unwrap();
    (
        ds.join("LLaVA-Pretrain/chat-translated.json"),
        ds.join("pretrain_images.zip"),
    )
}

/// A shard's Parquet file being written (its temporary name), if any.
fn shard_being_written(out: &Path) -> Option<PathBuf> {
    std::fs::read_dir(out).ok()?.find_map(|e| {
        let p = e.ok()?.path();
        let name = p.file_name()?.to_str()?;
        (name.starts_with("shard-") && name.contains(".parquet.tmp-")).then_some(p)
    })
}

/// SIGKILL once a shard is committed, then while a shard is being written (seen: its temporary
/// file is still there after the kill), then resume: the shards are those of an uninterrupted run,
/// byte for byte, and the resume redid only what was missing.
#[test]
fn sigkill_mid_run_and_mid_write_then_resume_gives_identical_shards() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let (json, zip) = small_dataset(tmp.path());
    let whole = pipeline(tmp.path(), "whole", "pretrain", &json, &zip, "", 48);
    ingest(&whole, &[]);
    let expected = shard_hashes(&tmp.path().join("cache/whole"));
    assert!(expected.len() >= 10);

    let p = pipeline(tmp.path(), "killed", "pretrain", &json, &zip, "", 48);
    let out = tmp.path().join("cache/killed");
    let start = || {
        Command::new(common::bin())
            .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    // 1. After the first shard is committed.
    let mut child = start();
    while !out.join("progress/shard-00000.json").exists() {
        assert!(Instant::now() < deadline, "first shard never committed");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // 2. While a shard is being written: rerun and kill as soon as a temporary shard file
    // appears, until one is still there after the kill (a rename can beat the signal).
    let mut mid_write = false;
    for _ in 0..30 {
        let mut child = start();
        let seen = loop {
            if let Some(tmp_file) = shard_being_written(&out.join("data")) {
                break Some(tmp_file);
            }
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break None;
            }
        };
        child.kill().unwrap();
        child.wait().unwrap();
        match seen {
            Some(f) if f.exists() => {
                mid_write = true;
                break;
            }
            Some(_) => continue,
            None => break, // the run finished: no kill left to try
        }
    }
    assert!(mid_write, "no kill landed while a shard was being written");
    assert!(
        !out.join("manifest.json").exists(),
        "the interrupted run must not have finished"
    );

    let resumed = ingest(&p, &[]);
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    let counts: Vec<usize> = stdout
        .lines()
        .find(|l| l.starts_with("shards: "))
        .unwrap_or_else(|| panic!("{stdout}"))
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let (written, done, total) = (counts[0], counts[1], counts[2]);
    assert!(
        done > 0 && written > 0 && written + done == total,
        "the resume should redo only the missing shards: {stdout}"
    );
    assert_eq!(shard_hashes(&out), expected, "same rows, same bytes");
    assert_eq!(
        std::fs::read_to_string(out.join("rejects.jsonl")).unwrap(),
        std::fs::read_to_string(tmp.path().join("cache/whole/rejects.jsonl")).unwrap()
    );
    let leftovers: Vec<_> = walk(&out)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all.extend(walk(&p));
        } else {
            all.push(p);
        }
    }
    all
}

/// Also: CLIP streams (here three, from three threads) change nothing in the shards.
#[test]
fn workers_write_disjoint_shards_that_add_up_to_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (json, zip) = small_dataset(tmp.path());
    let whole = pipeline(tmp.path(), "whole", "pretrain", &json, &zip, "", 100);
    ingest(&whole, &[]);
    let p = pipeline(tmp.path(), "split", "pretrain", &json, &zip, "", 100);
    let out = tmp.path().join("cache/split");
    let first = ingest(&p, &["--workers", "2", "--worker", "1"]);
    assert!(String::from_utf8_lossy(&first.stdout).contains("still missing"));
    assert!(!out.join("manifest.json").exists());
    assert!(shard_hashes(&out).iter().all(|(name, _)| {
        let i: usize = name[6..11].parse().unwrap();
        i % 2 == 1
    }));
    let second = ingest(
        &p,
        &["--workers", "2", "--worker", "0", "--clip-streams", "3"],
    );
    assert!(String::from_utf8_lossy(&second.stdout).contains("CLIP (3 streams) busy"));
    assert_eq!(
        shard_hashes(&out),
        shard_hashes(&tmp.path().join("cache/whole"))
    );
    let (a, b) = (
        read_manifest(&out).unwrap(),
        read_manifest(&tmp.path().join("cache/whole")).unwrap(),
    );
    assert_eq!(
        (
            a.samples_written,
            a.rejects_by_reason.clone(),
            a.shards.clone()
        ),
        (b.samples_written, b.rejects_by_reason, b.shards)
    );
}

/// `clip_precision = "f16"`: the shards say so, their features stay close to f32 ones, and a
/// directory of f32 shards refuses to be resumed in f16.
#[test]
fn an_f16_ingest_is_recorded_and_cannot_be_mixed_with_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let (json, zip) = small_dataset(tmp.path());
    let f32p = pipeline(tmp.path(), "f32", "pretrain", &json, &zip, "", 100);
    let f16p = pipeline(tmp.path(), "f16", "pretrain", &json, &zip, "", 100);
    let f16 = ["--set", "ingest.clip_precision=f16"];
    // Shard 0 of each (a worker of 8 writes only shards 0 and 8: there are 7).
    ingest(&f32p, &["--workers", "8", "--worker", "0"]);
    ingest(
        &f16p,
        &[&f16[..], &["--workers", "8", "--worker", "0"]].concat(),
    );
    let (m32, r32) = read_shard(&tmp.path().join("cache/f32/data/shard-00000.parquet")).unwrap();
    let (m16, r16) = read_shard(&tmp.path().join("cache/f16/data/shard-00000.parquet")).unwrap();
    assert_eq!(
        (m32.clip_precision, m16.clip_precision),
        (ClipPrecision::F32, ClipPrecision::F16)
    );
    assert_eq!(r32.len(), r16.len());
    let (mut a32, mut a16) = (Vec::new(), Vec::new());
    for (a, b) in r32.iter().zip(&r16) {
        assert_eq!(a.samples, b.samples);
        a32.extend(f16_bytes_to_f32(&a.features[0]));
        a16.extend(f16_bytes_to_f32(&b.features[0]));
    }
    check_f16_ingest(&a16, &a32).unwrap();

    let out = Command::new(common::bin())
        .args(["ingest", f32p.to_str().unwrap(), "--device", "cpu"])
        .args(f16)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another plan") && err.contains("HINT"),
        "{err}"
    );
}

#[test]
fn user_errors_name_the_file_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let (json, zip) = small_dataset(tmp.path());
    let p = pipeline(tmp.path(), "x", "pretrain", &json, &zip, "", 100);
    let run = |args: &[&str]| Command::new(common::bin()).args(args).output().unwrap();

    let out = run(&["ingest", p.to_str().unwrap(), "--clip", "/no/such/clip"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/no/such/clip") && err.contains("HINT"),
        "{err}"
    );

    let out = run(&["ingest", p.to_str().unwrap(), "--set", "ingest.colour=1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("colour") && err.contains("x.toml"),
        "{err}"
    );

    let out = run(&[
        "ingest",
        p.to_str().unwrap(),
        "--set",
        "ingest.images=/no/such.zip",
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/no/such.zip"));

    // A shard that cannot be written (its name taken by a directory) stops the run, named; the
    // shards before it stay done.
    let blocked = tmp.path().join("cache/x/data/shard-00002.parquet");
    std::fs::create_dir_all(blocked.join("d")).unwrap();
    let out = run(&[
        "ingest",
        p.to_str().unwrap(),
        "--device",
        "cpu",
        "--clip-streams",
        "2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("shard-00002.parquet"),
        "{err}"
    );
    assert!(tmp
        .path()
        .join("cache/x/progress/shard-00000.json")
        .exists());
    assert!(!tmp
        .path()
        .join("cache/x/progress/shard-00002.json")
        .exists());
}

#[test]
fn sft_records_sets_the_records_per_instruction_image() {
    let tmp = tempfile::tempdir().unwrap();
    for per_image in [1, 2, 3] {
        let ds = tmp.path().join(format!("ds{per_image}"));
        let summary = synth::generate(&SynthConfig {
            out: ds.clone(),
            seed: 2,
            pretrain: 0,
            sft: 30,
            sft_records: per_image,
            multi: 0,
            faults: false,
        })
        .unwrap();
        assert_eq!(summary.sft_records, 30 * per_image);
        let (json, _, _) = synth::stage_files(&ds, Stage::Sft);
        let records: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        assert_eq!(records.len(), 30 * per_image);
        // One image's records ask the same four questions, each in another order.
        let questions = |r: &serde_json::Value| -> Vec<String> {
            let turns = r["conversations"].as_array().unwrap();
            turns
                .iter()
                .step_by(2)
                .map(|t| t["value"].as_str().unwrap().replace("<image>\n", ""))
                .collect()
        };
        let first: Vec<Vec<String>> = records[..per_image].iter().map(questions).collect();
        assert!(first.iter().all(|q| q.len() == 4));
        if per_image >= 2 {
            assert_ne!(first[0], first[1]);
            let (mut a, mut b) = (first[0].clone(), first[1].clone());
            a.sort();
            b.sort();
            assert_eq!(a, b);
        }
        // The trained (first) questions: shape in English, shape in Chinese, then colour —
        // English on even images, Chinese on odd ones.
        let trained: Vec<Vec<String>> = records
            .chunks(per_image)
            .map(|r| r.iter().map(|r| questions(r)[0].clone()).collect())
            .collect();
        let colour = ["What colour is the shape?", "图中的形状是什么颜色？"];
        for (i, t) in trained.iter().enumerate() {
            let want = [
                "What shape is in the image?",
                "图中是什么形状？",
                colour[i % 2],
            ];
            assert_eq!(t[..], want[..per_image], "image {i}");
        }
    }
}

/// Two ingests into the same `out`: the second is refused while the first runs, naming the
/// process that holds it (both did all the work before).
#[test]
fn a_second_ingest_into_the_same_out_is_refused_while_the_first_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (json, zip) = small_dataset(tmp.path());
    let p = pipeline(tmp.path(), "both", "pretrain", &json, &zip, "", 48);
    let lock = tmp.path().join("cache/both/.ingest-0-of-1.lock");
    let mut first = Command::new(common::bin())
        .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !lock.exists() {
        assert!(std::time::Instant::now() < deadline, "no lock taken");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let second = Command::new(common::bin())
        .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
        .output()
        .unwrap();
    let running = first.try_wait().unwrap().is_none();
    let err = String::from_utf8_lossy(&second.stderr);
    if running {
        assert!(
            !second.status.success()
                && err.contains("already running")
                && err.contains(&format!("process {}", first.id())),
            "{err}"
        );
    }
    assert!(first.wait().unwrap().success());
    assert!(!lock.exists(), "the lock is removed at the end");
    // Once the first is done, a rerun goes through (and finds every shard done).
    let again = ingest(&p, &[]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("already done"));
}

/// An ingest that rejects most of its records (here: the wrong image prefix) fails, naming the top
/// reasons, with its manifest and rejects kept to look at (it exited 0 with an empty shard).
#[test]
fn an_ingest_that_rejects_most_records_fails_naming_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (json, zip) = small_dataset(tmp.path());
    let p = pipeline(
        tmp.path(),
        "wrong",
        "pretrain",
        &json,
        &zip,
        "COCO_train2014_",
        100,
    );
    let out = Command::new(common::bin())
        .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("over max_reject_rate 50%")
            && err.contains("missing_image")
            && err.contains("image_prefix"),
        "{err}"
    );
    assert!(tmp.path().join("cache/wrong/manifest.json").exists());
    assert!(tmp.path().join("cache/wrong/rejects.jsonl").exists());
    // A user who means it raises the limit: the same run (every shard done) then finishes.
    let out = Command::new(common::bin())
        .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
        .args(["--max-reject-rate", "1"])
        .output()
        .unwrap();
    common::assert_ok(&out);
}

/// Images that change in the source after their shard was written are redone on the next run
/// (they were kept as "already done"), and only their shard.
#[test]
fn a_shard_whose_images_changed_is_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("dataset");
    synth::generate(&SynthConfig {
        out: ds.clone(),
        seed: 6,
        pretrain: 0,
        sft: 0,
        sft_records: 1,
        multi: 120,
        faults: false,
    })
    .unwrap();
    let dir = ds.join("sft_multi_images");
    let p = pipeline(
        tmp.path(),
        "multi",
        "sft_multi",
        &dir.join("output.json"),
        &dir,
        "",
        32,
    );
    ingest(&p, &[]);
    let out = tmp.path().join("cache/multi");
    let before = shard_hashes(&out);
    // Replace the first pair's first image (shard 0) with another picture.
    std::fs::copy(dir.join("5.jpg"), dir.join("0.jpg")).unwrap();
    let rerun = ingest(&p, &[]);
    let err = String::from_utf8_lossy(&rerun.stderr);
    assert!(
        err.contains("shard-00000.parquet: its images changed"),
        "{err}"
    );
    assert!(!err.contains("shard-00001.parquet: its images"), "{err}");
    let after = shard_hashes(&out);
    assert_ne!(after[0], before[0], "shard 0 redone with the new image");
    assert_eq!(after[1..], before[1..], "the others untouched");
}

/// Records without an image (no `image` field, no `<image>` in the text) become text-only
/// samples: each its own row, with no images and no features, tokenized with the same template and
/// no placeholder; a record without `image` whose text has `<image>` is a recorded `no_image`
/// reject. The shards verify, and a model trains on text-only and image rows together.
#[test]
fn text_only_records_become_image_less_samples_that_train_beside_image_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    synth::generate(&SynthConfig {
        out: ds.clone(),
        seed: 4,
        pretrain: 0,
        sft: 40,
        sft_records: 1,
        multi: 0,
        faults: false,
    })
    .unwrap();
    let (json, images, prefix) = synth::stage_files(&ds, Stage::Sft);
    let mut records: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let turn = |from: &str, value: String| serde_json::json!({"from": from, "value": value});
    let text_only: Vec<serde_json::Value> = (0..30)
        .map(|i| {
            serde_json::json!({"id": format!("text{i}"), "conversations": [
                turn("human", format!("What is {i} plus {i}?")),
                turn("gpt", format!("{}.", 2 * i)),
            ]})
        })
        .collect();
    // Text-only records in between the image ones.
    for (k, r) in text_only.iter().enumerate() {
        records.insert(k * 2, r.clone());
    }
    records.push(
        serde_json::json!({"id": "wants_an_image", "conversations": [
            turn("human", "<image>\nWhat is in the picture?".into()),
            turn("gpt", "A cat.".into()),
        ]}),
    );
    let mixed = tmp.path().join("mixed.json");
    std::fs::write(&mixed, serde_json::to_string(&records).unwrap()).unwrap();
    let p = pipeline(tmp.path(), "mixed", "sft", &mixed, &images, prefix, 16);
    ingest(&p, &[]);
    let out = tmp.path().join("cache/mixed");

    let m = read_manifest(&out).unwrap();
    assert_eq!((m.samples_written, m.rows, m.unique_images), (70, 70, 40));
    assert_eq!(reasons(&m), vec![("no_image".to_string(), 1)]);
    let rejects = read_rejects(&out).unwrap();
    assert!(rejects[0].detail.contains("<image>"), "{:?}", rejects[0]);

    let tok = ChatTokenizer::load(&common::tokenizer_dir()).unwrap();
    let mut text_rows = 0;
    for f in list_shards(&out).unwrap() {
        for row in read_shard(&f).unwrap().1 {
            assert_eq!(row.features.len(), row.images.len());
            if !row.images.is_empty() {
                continue;
            }
            text_rows += 1;
            assert_eq!((row.image_key.as_str(), row.samples.len()), ("", 1));
            let s = &row.samples[0];
            let i: usize = s.id.strip_prefix("text").unwrap().parse().unwrap();
            let turns: Vec<Turn> =
                serde_json::from_value(text_only[i]["conversations"].clone()).unwrap();
            let enc = tok.encode_sample(Stage::Sft, &turns, 0, 512).unwrap();
            let want: Vec<u16> = enc.input_ids.iter().map(|&t| t as u16).collect();
            assert_eq!((&s.input_ids, &s.loss_mask), (&want, &enc.loss_mask));
            assert!(minimind_v::text::placeholder_starts(&enc.input_ids).is_empty());
            assert!(s.loss_mask.contains(&1));
        }
    }
    assert_eq!(text_rows, 30);
    common::assert_ok(
        &Command::new(common::bin())
            .args(["inspect", out.to_str().unwrap(), "--verify"])
            .output()
            .unwrap(),
    );

    // Training on both kinds at once: batches of 16 from 70 samples mix them.
    let t = tmp.path().join("train.toml");
    std::fs::write(
        &t,
        format!(
            "[train]\nshards = {out:?}\nout = {:?}\nsteps = 5\nbatch_size = 16\nlr = 1e-3\nshuffle_buffer = 70\n\n[train.model]\npreset = \"tiny\"\nvision_dim = 192\n",
            tmp.path().join("run")
        ),
    )
    .unwrap();
    common::assert_ok(
        &Command::new(common::bin())
            .args(["train", t.to_str().unwrap(), "--device", "cpu"])
            .output()
            .unwrap(),
    );
    let logs = minimind_v::train::read_metrics(&tmp.path().join("run")).unwrap();
    assert_eq!(logs.len(), 5);
    assert!(logs.iter().all(|l| l.loss.is_finite()), "{logs:?}");
}
