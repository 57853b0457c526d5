//! Inputs from strangers: each hostile case is small on disk and made here, and must end as a
//! recorded reject or a clear refusal — never a crash, a hang, a read outside the dataset or an
//! unbounded allocation. This test binary's peak resident memory is checked at the end of each
//! case (all of them together stay under 1 GiB).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use minimind_v::config::IngestConfig;
use minimind_v::ingest::{self, IngestOptions};
use minimind_v::shards::manifest::read_rejects;
use minimind_v::shards::reject::Reason;
use minimind_v::text::Stage;

fn assert_bounded_memory(what: &str) {
    let rss = common::peak_rss();
    assert!(rss < 1 << 30, "{what}: peak RSS {} MiB", rss >> 20);
}

/// A pretrain JSON with one record per `(id, image, answer)`.
fn records(path: &Path, recs: &[(&str, &str, &str)]) {
    let v: Vec<serde_json::Value> = recs
        .iter()
        .map(|(id, image, answer)| {
            serde_json::json!({"id": id, "image": image, "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": answer}]})
        })
        .collect();
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn jpeg(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, seed]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
    buf.into_inner()
}

/// Ingest `json` + `images` in-process (random-small CLIP) and return the reject reason of each
/// record id.
fn ingest_rejects(tmp: &Path, json: &Path, images: &Path) -> Vec<(String, Reason)> {
    let mut cfg = IngestConfig::new(Stage::Pretrain, json.into(), images.into(), tmp.join("out"));
    cfg.tokenizer = common::tokenizer_dir();
    cfg.clip = "random-small:0".into();
    cfg.max_reject_rate = 1.0; // these datasets are mostly rejects, by design
    let summary = ingest::run(&cfg, &IngestOptions::default()).unwrap();
    let m = summary.manifest.expect("every shard done");
    assert_eq!(m.records_read, m.samples_written + m.samples_rejected);
    let mut r: Vec<(String, Reason)> = read_rejects(&cfg.out)
        .unwrap()
        .into_iter()
        .flat_map(|r| r.ids.into_iter().map(move |id| (id, r.reason)))
        .collect();
    r.sort_by(|a, b| a.0.cmp(&b.0));
    r
}

/// Image names that leave the directory are `unsafe_path` rejects and nothing outside is read:
/// `..`, absolute paths, a symlink out, a FIFO (which would hang a read) and `/dev/zero` (which
/// never ends). Images in a folder inside the directory are found by their name alone, as in a
/// zip.
#[test]
fn image_names_stay_inside_the_images_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    std::fs::create_dir_all(root.join("inner")).unwrap();
    std::fs::write(root.join("inner/ok.jpg"), jpeg(1)).unwrap();
    std::fs::write(tmp.path().join("secret.jpg"), jpeg(2)).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("secret.jpg"), root.join("out.jpg")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", root.join("zero.jpg")).unwrap();
    std::os::unix::fs::symlink(root.join("inner/ok.jpg"), root.join("alias.jpg")).unwrap();
    let fifo = root.join("fifo.jpg");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let json = tmp.path().join("data.json");
    let secret = tmp.path().join("secret.jpg");
    records(
        &json,
        &[
            ("a-ok", "ok.jpg", "An image."),
            ("b-alias", "alias.jpg", "An image."),
            ("c-dotdot", "../secret.jpg", "x"),
            ("d-absolute", secret.to_str().unwrap(), "x"),
            ("e-symlink-out", "out.jpg", "x"),
            ("f-dev-zero", "zero.jpg", "x"),
            ("g-fifo", "fifo.jpg", "x"),
            ("h-dotdot-inner", "inner/../../secret.jpg", "x"),
        ],
    );
    let rejects = ingest_rejects(tmp.path(), &json, &root);
    let unsafe_ids: Vec<&str> = rejects
        .iter()
        .filter(|(_, r)| *r == Reason::UnsafePath)
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(
        unsafe_ids,
        [
            "c-dotdot",
            "d-absolute",
            "e-symlink-out",
            "f-dev-zero",
            "g-fifo",
            "h-dotdot-inner"
        ],
        "{rejects:?}"
    );
    assert_eq!(
        rejects.len(),
        6,
        "ok.jpg and alias.jpg are read: {rejects:?}"
    );
    assert_bounded_memory("paths");
}

/// A PNG of a few hundred KB whose header declares 10,000 × 10,000 pixels is refused from its
/// header (decoded, and copied to f32 by the resize, it took 2.7 GB); a zip entry whose header
/// claims 4 GiB is refused without an allocation of that size; an entry that inflates past the
/// limit is cut off there; 10 MB of answer text is refused before it is tokenised.
#[test]
fn bombs_in_a_dataset_are_rejects_with_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let bomb_png = {
        let mut png = std::io::Cursor::new(Vec::new());
        image::GrayImage::new(10_000, 10_000)
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        png.into_inner()
    };
    let zip_path = tmp.path().join("images.zip");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
        let deflate = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        z.start_file("ok.jpg", deflate).unwrap();
        z.write_all(&jpeg(3)).unwrap();
        z.start_file("bomb.png", deflate).unwrap();
        z.write_all(&bomb_png).unwrap();
        z.start_file("claims.jpg", deflate).unwrap();
        z.write_all(&jpeg(4)).unwrap();
        // 128 MiB of zeros, deflated to ~128 KiB: over the 64 MiB limit once inflated.
        z.start_file("zeros.jpg", deflate).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..128 {
            z.write_all(&zeros).unwrap();
        }
        z.finish().unwrap();
    }
    // claims.jpg's central-directory entry now claims 4 GiB uncompressed.
    let mut bytes = std::fs::read(&zip_path).unwrap();
    let name = b"claims.jpg";
    let cd = (0..bytes.len() - 46)
        .find(|&i| bytes[i..i + 4] == [0x50, 0x4b, 0x01, 0x02] && bytes[i + 46..].starts_with(name))
        .expect("central directory entry of claims.jpg");
    bytes[cd + 24..cd + 28].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    std::fs::write(&zip_path, &bytes).unwrap();
    assert!(bytes.len() < 2 << 20, "{} bytes", bytes.len());

    let json = tmp.path().join("data.json");
    let long = "很长的回答。".repeat(600_000); // 10.8 MB
    records(
        &json,
        &[
            ("a-ok", "ok.jpg", "An image."),
            ("b-bomb", "bomb.png", "x"),
            ("c-claims", "claims.jpg", "x"),
            ("d-zeros", "zeros.jpg", "x"),
            ("e-long", "ok.jpg", &long),
        ],
    );
    let rejects = ingest_rejects(tmp.path(), &json, &zip_path);
    assert_eq!(
        rejects,
        [
            ("b-bomb".to_string(), Reason::ImageTooLarge),
            ("c-claims".to_string(), Reason::ImageTooLarge),
            ("d-zeros".to_string(), Reason::ImageTooLarge),
            ("e-long".to_string(), Reason::TextTooLong),
        ]
    );
    assert_bounded_memory("dataset bombs");
}

/// The tensors and globals of a copy of the reference `.pth` whose `data.pkl` is replaced by
/// `pickle`.
fn pth_with_pickle(tmp: &Path, pickle: &[u8], name: &str) -> PathBuf {
    let src = common::reference().join("tiny_llm/model.pth");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    let path = tmp.join(name);
    let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).unwrap();
        let n = entry.name().unwrap().to_string();
        if n.ends_with("data.pkl") {
            drop(entry);
            w.start_file(n, stored).unwrap();
            w.write_all(pickle).unwrap();
        } else {
            w.raw_copy_file(entry).unwrap();
        }
    }
    w.finish().unwrap();
    path
}

fn reference_pickle() -> Vec<u8> {
    let src = common::reference().join("tiny_llm/model.pth");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    let mut entry = archive.by_name("model/data.pkl").unwrap();
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
    data
}

/// A `.pth` whose weights are valid but whose pickle also names `os.system` is refused with the
/// global named (it loaded silently before). A tensor that declares 2^30 × 2^30 elements is
/// refused before its bytes are read. Model configs that cannot be built are refused before
/// anything is allocated.
#[test]
fn checkpoints_and_configs_from_strangers_are_checked_before_use() {
    use minimind_v::model::{weights, ModelConfig};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::tiny();
    let cpu = candle_core::Device::Cpu;
    let good = reference_pickle();
    let same = pth_with_pickle(tmp.path(), &good, "same.pth");
    assert!(weights::load(&same, &cfg, false, &cpu).is_ok());

    // PROTO, then `os.system` at the bottom of the stack, under the real state dict.
    let mut evil = good[..2].to_vec();
    evil.extend(b"cos\nsystem\n");
    evil.extend(&good[2..]);
    let path = pth_with_pickle(tmp.path(), &evil, "evil.pth");
    let err = weights::load(&path, &cfg, false, &cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("evil.pth") && err.contains("os.system") && err.contains("refusing"),
        "{err}"
    );

    // One tensor, `[2^30, 2^30]`, on 16 bytes of storage.
    let mut huge = vec![0x80, 2, b'}', b'('];
    let s = |out: &mut Vec<u8>, v: &str| {
        out.push(b'X');
        out.extend((v.len() as u32).to_le_bytes());
        out.extend(v.as_bytes());
    };
    let int = |out: &mut Vec<u8>, v: u32| {
        out.push(b'J');
        out.extend(v.to_le_bytes());
    };
    s(&mut huge, "tok_embeddings.weight");
    huge.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    s(&mut huge, "storage");
    huge.extend(b"ctorch\nFloatStorage\n");
    s(&mut huge, "0");
    s(&mut huge, "cpu");
    int(&mut huge, 4);
    huge.extend(b"tQ");
    int(&mut huge, 0);
    huge.push(b'(');
    int(&mut huge, 1 << 30);
    int(&mut huge, 1 << 30);
    huge.extend(b"t(");
    int(&mut huge, 1 << 30);
    int(&mut huge, 1);
    huge.extend(b"t\x89ccollections\nOrderedDict\n)RtRu.");
    let path = pth_with_pickle(tmp.path(), &huge, "huge.pth");
    let err = weights::load(&path, &cfg, false, &cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tok_embeddings.weight") && err.contains("[1073741824, 1073741824]"),
        "{err}"
    );
    let err = weights::read_state(&path).err().unwrap().to_string();
    assert!(err.contains("declares shape"), "{err}");

    for (what, bad) in [
        (
            "n_layers",
            ModelConfig {
                n_layers: 1_000_000_000,
                ..cfg.clone()
            },
        ),
        (
            "max_seq_len",
            ModelConfig {
                max_seq_len: 100_000_000,
                ..cfg.clone()
            },
        ),
        (
            "dim",
            ModelConfig {
                dim: 0,
                ..cfg.clone()
            },
        ),
        (
            "n_heads",
            ModelConfig {
                n_heads: 0,
                ..cfg.clone()
            },
        ),
        (
            "n_kv_heads",
            ModelConfig {
                n_kv_heads: 0,
                ..cfg.clone()
            },
        ),
        (
            "norm_eps",
            ModelConfig {
                norm_eps: f64::NAN,
                ..cfg.clone()
            },
        ),
        (
            "parameters",
            ModelConfig {
                dim: 16384,
                n_layers: 1024,
                n_heads: 128,
                n_kv_heads: 128,
                ..cfg.clone()
            },
        ),
    ] {
        let err = bad
            .validate()
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"))
            .to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
    // Through a checkpoint directory's config.json, as chat and serve read it.
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        common::reference().join("tiny_llm/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let mut json = serde_json::to_value(&cfg).unwrap();
    json["n_layers"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let err = minimind_v::checkpoint::Checkpoint::open(&dir)
        .unwrap()
        .load_model(&cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("n_layers = 1000000000"), "{err}");
    assert_bounded_memory("checkpoints");
}

/// 400 flipped bytes in a shard: `inspect --verify` and `train` name the damaged shard (it
/// trained without a word before), and a rerun of the ingest redoes it, byte for byte.
#[test]
fn a_damaged_shard_is_named_and_a_rerun_ingest_redoes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    minimind_v::synth::generate(&minimind_v::synth::SynthConfig {
        out: ds.clone(),
        seed: 4,
        pretrain: 60,
        sft: 0,
        sft_records: 1,
        multi: 0,
        faults: false,
    })
    .unwrap();
    let pipeline = tmp.path().join("p.toml");
    let cache = tmp.path().join("cache");
    std::fs::write(
        &pipeline,
        format!(
            "[ingest]\nstage = \"pretrain\"\njson = {:?}\nimages = {:?}\nout = {cache:?}\ntokenizer = {:?}\nclip = \"random-small:0\"\n\n[train]\nshards = {cache:?}\nout = {:?}\nsteps = 2\nbatch_size = 2\n\n[train.model]\n{}",
            ds.join("LLaVA-Pretrain/chat-translated.json"),
            ds.join("pretrain_images.zip"),
            common::tokenizer_dir(),
            tmp.path().join("run"),
            toml::to_string(&minimind_v::model::ModelConfig {
                vision_dim: 192,
                ..minimind_v::model::ModelConfig::tiny()
            })
            .unwrap()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(common::bin())
            .args(args)
            .args([pipeline.to_str().unwrap(), "--device", "cpu"])
            .output()
            .unwrap()
    };
    common::assert_ok(&run(&["ingest"]));
    let shard = cache.join("data/shard-00000.parquet");
    let good = std::fs::read(&shard).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid..mid + 400].iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(&shard, &bad).unwrap();

    let out = std::process::Command::new(common::bin())
        .args(["inspect", cache.to_str().unwrap(), "--verify"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("shard-00000.parquet: DAMAGED"),
        "{err}"
    );

    let out = run(&["train"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("shard-00000.parquet: damaged"),
        "{err}"
    );

    let out = run(&["ingest"]);
    common::assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("redoing it"));
    assert_eq!(std::fs::read(&shard).unwrap(), good, "redone byte for byte");
}
