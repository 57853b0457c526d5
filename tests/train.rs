//! The trainer on synthetic shards through the real binary: loss falls; (N steps, stop, resume,
//! N steps) reproduces 2N uninterrupted steps bit for bit on CPU; bad shards are refused first.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use minimind_v::shards::reader::{read_meta, read_shard};
use minimind_v::shards::writer::write_shard;
use minimind_v::shards::{ClipPrecision, ShardMeta};
use minimind_v::synth::{self, SynthConfig};
use minimind_v::train::{read_metrics, StepLog};

/// A small ingested dataset (random-small CLIP: 192-wide features).
fn shards(tmp: &Path) -> PathBuf {
    shards_with(tmp, "")
}

/// `shards` with more `[ingest]` settings (TOML lines).
fn shards_with(tmp: &Path, settings: &str) -> PathBuf {
    let ds = tmp.join("dataset");
    synth::generate(&SynthConfig {
        out: ds.clone(),
        seed: 2,
        pretrain: 300,
        sft: 0,
        sft_records: 3,
        multi: 0,
        faults: false,
    })
    .unwrap();
    let p = tmp.join("ingest.toml");
    std::fs::write(
        &p,
        format!(
            "[ingest]\nstage = \"pretrain\"\njson = {:?}\nimages = {:?}\nout = {:?}\ntokenizer = {:?}\nclip = \"random-small:1\"\nrows_per_shard = 64\n{settings}",
            ds.join("LLaVA-Pretrain/chat-translated.json"),
            ds.join("pretrain_images.zip"),
            tmp.join("cache"),
            common::tokenizer_dir()
        ),
    )
    .unwrap();
    let out = Command::new(common::bin())
        .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
        .output()
        .unwrap();
    common::assert_ok(&out);
    // Outside a terminal (stderr is a pipe here) ingest prints plain progress lines.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("ingest: ") && l.contains("/300 images (") && l.contains("ETA")),
        "{err}"
    );
    assert!(err.contains("ingest: 300/300 images (100.0%)"), "{err}");
    tmp.join("cache")
}

fn pipeline(tmp: &Path, name: &str, shards: &Path, steps: usize, vision_dim: usize) -> PathBuf {
    let p = tmp.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "[train]\nshards = {shards:?}\nout = {:?}\nsteps = {steps}\nbatch_size = 4\ngrad_accum = 2\nlr = 1e-3\nwarmup_steps = 2\nshuffle_buffer = 64\nbucket_batches = 4\ncheckpoint_every = 4\nseed = 9\nval_shards = {shards:?}\nval_every = 6\nval_batches = 3\n\n[train.model]\ndim = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nvocab_size = 6400\nmultiple_of = 64\nnorm_eps = 1e-5\nmax_seq_len = 512\nrope_theta = 10000.0\nvision_dim = {vision_dim}\nimage_ids = {:?}\n",
            tmp.join(name),
            minimind_v::text::placeholder_ids()
        ),
    )
    .unwrap();
    p
}

fn train(p: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(common::bin())
        .args(["train", p.to_str().unwrap(), "--device", "cpu"])
        .args(extra)
        .output()
        .unwrap()
}

fn losses(logs: &[StepLog]) -> Vec<(usize, u32)> {
    logs.iter().map(|l| (l.step, l.loss.to_bits())).collect()
}

#[test]
fn stop_and_resume_reproduces_the_uninterrupted_run_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let whole = pipeline(tmp.path(), "whole", &cache, 12, 192);
    let out = train(&whole, &[]);
    common::assert_ok(&out);
    let want = read_metrics(&tmp.path().join("whole")).unwrap();
    assert_eq!(want.len(), 12);
    assert!(want
        .iter()
        .all(|l| l.loss.is_finite() && l.tokens_per_s > 0.0));
    assert!(
        want[11].loss < want[0].loss,
        "loss should fall: {} → {}",
        want[0].loss,
        want[11].loss
    );

    let split = pipeline(tmp.path(), "split", &cache, 12, 192);
    // Stop after 6 steps (between checkpoints), resume for the remaining 6.
    assert!(train(&split, &["--stop-after", "6"]).status.success());
    assert_eq!(read_metrics(&tmp.path().join("split")).unwrap().len(), 6);
    let out = train(&split, &["--resume"]);
    common::assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming at step 6 "));
    let got = read_metrics(&tmp.path().join("split")).unwrap();
    assert_eq!(losses(&got), losses(&want), "bit-exact loss sequence");

    // Held-out loss at steps 6 and 12, with and without the image features, identical too.
    let val = |run: &str| std::fs::read_to_string(tmp.path().join(run).join("val.jsonl")).unwrap();
    assert_eq!(val("split"), val("whole"));
    let lines: Vec<minimind_v::train::ValLog> = val("whole")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.iter().map(|v| v.step).collect::<Vec<_>>(),
        vec![6, 12]
    );
    assert!(lines
        .iter()
        .all(|v| v.loss.is_finite() && v.loss != v.loss_no_image));
}

/// `[ingest] val_fraction`: a share of the image sets goes to `val/` (chosen by their key alone),
/// with every sample that uses them; `data/` holds Parquet files only; and `train` without
/// `val_shards` evaluates on the split.
#[test]
fn a_held_out_split_made_at_ingest_is_what_train_evaluates_on() {
    use minimind_v::shards::manifest::read_manifest;
    use minimind_v::shards::reader::{list_shards, read_shard};
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards_with(tmp.path(), "val_fraction = 0.2\n");
    let keys = |dir: &Path| -> Vec<(String, usize)> {
        list_shards(dir)
            .unwrap()
            .iter()
            .flat_map(|f| read_shard(f).unwrap().1)
            .map(|r| (r.image_key, r.samples.len()))
            .collect()
    };
    let (train_keys, val_keys) = (keys(&cache), keys(&cache.join("val")));
    assert!(
        (30..=90).contains(&val_keys.len()),
        "{} of 300 held out",
        val_keys.len()
    );
    assert_eq!(train_keys.len() + val_keys.len(), 300);
    let held_out = |k: &str| minimind_v::ingest::plan::held_out(k, 0.2);
    assert!(val_keys.iter().all(|(k, _)| held_out(k)));
    assert!(train_keys.iter().all(|(k, _)| !held_out(k)));
    let m = read_manifest(&cache).unwrap();
    let count = |ks: &[(String, usize)]| ks.iter().map(|k| k.1).sum::<usize>();
    assert_eq!(m.samples_val, count(&val_keys));
    assert_eq!(m.samples_written, count(&train_keys) + count(&val_keys));
    for dir in ["data", "val"] {
        let names: Vec<_> = std::fs::read_dir(cache.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(names.iter().all(|n| n.ends_with(".parquet")), "{names:?}");
    }
    let verify = Command::new(common::bin())
        .args(["inspect", cache.to_str().unwrap(), "--verify"])
        .output()
        .unwrap();
    common::assert_ok(&verify);

    let p = pipeline(tmp.path(), "run", &cache, 6, 192);
    let text = std::fs::read_to_string(&p).unwrap();
    let val_line = format!("val_shards = {cache:?}\n");
    std::fs::write(&p, text.replace(&val_line, "")).unwrap();
    let out = train(&p, &[]);
    common::assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("(the ingest's held-out split) every 6 steps"),
        "{err}"
    );
    let val = std::fs::read_to_string(tmp.path().join("run/val.jsonl")).unwrap();
    assert_eq!(val.lines().count(), 1, "{val}");
}

/// The checkpoint says which CLIP made its features; chat takes that one when not told, and warns
/// when told another.
#[test]
fn a_checkpoint_remembers_its_clip_and_chat_uses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let p = pipeline(tmp.path(), "run", &cache, 4, 192);
    common::assert_ok(&train(&p, &[]));
    let ckpt = tmp.path().join("run/checkpoint");
    let want = read_meta(&cache.join("data/shard-00000.parquet")).unwrap();
    assert_eq!(minimind_v::checkpoint::trained_on(&ckpt), Some(want));

    let bear = common::repo().join("../shared/assets/eval_images/a-bear.png");
    let chat = |extra: &[&str]| {
        let out = Command::new(common::bin())
            .current_dir(common::repo())
            .args(["chat", "--ckpt", ckpt.to_str().unwrap(), "--device", "cpu"])
            .args(["--image", bear.to_str().unwrap(), "--prompt", "x"])
            .args(["--temperature", "0", "--max-new-tokens", "2"])
            .args(extra)
            .output()
            .unwrap();
        common::assert_ok(&out);
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // No --clip: the training shards' random-small:1 (HF's directory does not exist here).
    let err = chat(&[]);
    assert!(
        err.contains("random-small:1") && !err.contains("WARNING"),
        "{err}"
    );
    let err = chat(&["--clip", "random-small:2"]);
    assert!(
        err.contains("WARNING") && err.contains("trained on features of CLIP random-small:1"),
        "{err}"
    );
    // From a directory without the repository's assets: the built-in tokenizer, the same answer.
    let answer_in = |dir: &Path| {
        let out = Command::new(common::bin())
            .current_dir(dir)
            .args(["chat", "--ckpt", ckpt.to_str().unwrap(), "--device", "cpu"])
            .args(["--image", bear.to_str().unwrap(), "--prompt", "What is it?"])
            .args(["--temperature", "0", "--max-new-tokens", "6"])
            .output()
            .unwrap();
        common::assert_ok(&out);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let elsewhere = tempfile::tempdir().unwrap();
    assert_eq!(answer_in(elsewhere.path()), answer_in(&common::repo()));
}

#[test]
fn shards_that_do_not_fit_the_projector_or_the_training_clip_are_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let p = pipeline(tmp.path(), "bad", &cache, 2, 768);
    let out = train(&p, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("shard-00000.parquet") && err.contains("vision_dim"),
        "{err}"
    );
    assert!(!tmp.path().join("bad/metrics.jsonl").exists());

    // Validation shards from another CLIP precision than the training shards: refused too.
    let (meta, rows) = read_shard(&cache.join("data/shard-00000.parquet")).unwrap();
    let val = tmp.path().join("val-f16");
    let other = ShardMeta {
        clip_precision: ClipPrecision::F16,
        ..meta
    };
    write_shard(&val.join("shard-00000.parquet"), &rows, &other).unwrap();
    let p = pipeline(tmp.path(), "mixed", &cache, 2, 192);
    let out = train(&p, &["--set", &format!("train.val_shards={val:?}")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("val-f16") && err.contains("another CLIP"),
        "{err}"
    );
    assert!(!tmp.path().join("mixed/metrics.jsonl").exists());
}

#[test]
fn a_diverging_run_stops_at_its_first_non_finite_step_and_never_checkpoints_it() {
    // The trainer reads each step's loss and gradient norm only after queueing the next step
    // (no host sync per step); a non-finite one must still stop the run, and no checkpoint may
    // hold that step. Checkpoints every step (read at once) and every 5 (read one step late).
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    for every in ["1", "5"] {
        let name = format!("nan{every}");
        let p = pipeline(tmp.path(), &name, &cache, 12, 192);
        let out = train(
            &p,
            &[
                "--set",
                "train.lr=1e30",
                "--set",
                "train.warmup_steps=0",
                "--set",
                &format!("train.checkpoint_every={every}"),
            ],
        );
        assert!(!out.status.success(), "a run with lr 1e30 finished");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("loss is") && err.contains("last good checkpoint"),
            "{err}"
        );
        let logs = read_metrics(&tmp.path().join(&name)).unwrap();
        assert!(
            !logs.is_empty() && logs.len() < 12,
            "{} steps logged",
            logs.len()
        );
        assert!(logs
            .iter()
            .all(|l| l.loss.is_finite() && l.grad_norm.is_finite()));
        let last = logs.last().unwrap().step;
        assert!(err.contains(&format!("at step {} ", last + 1)), "{err}");
        let state = tmp.path().join(&name).join("checkpoint/state.json");
        if every == "1" {
            let state: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
            assert_eq!(state["step"], last, "checkpoint of the failed step");
        } else {
            assert!(!state.exists(), "no checkpoint step was reached");
        }
    }
}

/// SIGKILL while the run is going: the kill must land mid-run (the process died of the signal,
/// with a checkpoint short of the last step and fewer steps logged than the run has), the resume
/// must start from that checkpoint (not from step 0), and the finished run must equal the
/// uninterrupted one.
#[test]
fn sigkill_mid_run_then_resume_matches_the_uninterrupted_run() {
    use std::os::unix::process::ExitStatusExt;
    const STEPS: usize = 40;
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let whole = pipeline(tmp.path(), "whole", &cache, STEPS, 192);
    assert!(train(&whole, &[]).status.success());
    let want = read_metrics(&tmp.path().join("whole")).unwrap();
    assert_eq!(want.len(), STEPS);

    let p = pipeline(tmp.path(), "killed", &cache, STEPS, 192);
    let state = tmp.path().join("killed/checkpoint/state.json");
    let mut child = Command::new(common::bin())
        .args(["train", p.to_str().unwrap(), "--device", "cpu"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !state.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint written"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL, somewhere after the first checkpoint (step 4)
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the run ended before the kill");
    let logged = read_metrics(&tmp.path().join("killed")).unwrap().len();
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let at = state["step"].as_u64().unwrap() as usize;
    assert!(
        at > 0 && at < STEPS && logged < STEPS,
        "kill at checkpoint step {at}, {logged} steps logged: not mid-run"
    );

    let out = train(&p, &["--resume"]);
    common::assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("resuming at step {at} ")),
        "the resume did not start from the step-{at} checkpoint: {err}"
    );
    assert_eq!(
        losses(&read_metrics(&tmp.path().join("killed")).unwrap()),
        losses(&want)
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("killed"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-") || n == "checkpoint.old")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// bf16 compute with f32 master weights: every step's loss within 3% of the f32 run (same data,
/// same init), the loss falls, and every parameter moves (a cast that dropped gradients would
/// leave some tensor at its initial value).
#[test]
fn bf16_mixed_precision_tracks_f32_and_trains_every_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let run = |name: &str, extra: &[&str]| {
        let p = pipeline(tmp.path(), name, &cache, 16, 192);
        let out = train(&p, extra);
        common::assert_ok(&out);
        read_metrics(&tmp.path().join(name)).unwrap()
    };
    let f32_logs = run("f32", &[]);
    let bf16_logs = run("bf16", &["--set", "train.precision=bf16"]);
    assert_eq!(f32_logs.len(), bf16_logs.len());
    for (a, b) in f32_logs.iter().zip(&bf16_logs) {
        let rel = (a.loss - b.loss).abs() / a.loss;
        assert!(
            rel < 0.03,
            "step {}: f32 {} vs bf16 {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    assert_ne!(losses(&f32_logs), losses(&bf16_logs), "bf16 must differ");
    assert!(bf16_logs.last().unwrap().loss < bf16_logs[0].loss);

    let weights = |name: &str| {
        let p = tmp.path().join(name).join("checkpoint/model.safetensors");
        candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap()
    };
    let (w32, w16) = (weights("f32"), weights("bf16"));
    let cfg_path = tmp.path().join("bf16/checkpoint/config.json");
    let mcfg: minimind_v::model::ModelConfig =
        serde_json::from_slice(&std::fs::read(cfg_path).unwrap()).unwrap();
    let init = minimind_v::model::weights::random_state(&mcfg, 9).unwrap();
    for (name, t) in &w16 {
        assert_eq!(
            t.dtype(),
            candle_core::DType::F32,
            "{name}: master stays f32"
        );
        if name == "output.weight" {
            continue; // the tied copy of tok_embeddings.weight
        }
        // NaN (never > 0) when the weights hold a non-finite value.
        let moved = |w: &candle_core::Tensor| {
            minimind_v::compare::Diff::of_tensors(w, &init[name])
                .unwrap()
                .abs()
        };
        assert!(moved(t) > 0.0, "{name} never moved under bf16");
        assert!(moved(&w32[name]) > 0.0, "{name} never moved under f32");
    }
}

/// Data parallel through the real trainer, two ranks as threads. (1) Ranks that read their own
/// files (`rank_data = "files"`): rank 0 streams shard A, rank 1 a byte copy of A: both see the
/// same batches, the averaged gradient equals each rank's, so the run must reproduce a one-rank
/// run on A bit for bit, with one metrics line per step (only rank 0 writes). (2) Ranks that
/// share each batch (the default) see different rows: the replicas must still end identical,
/// which they would not without the gradient averaging.
#[test]
fn two_data_parallel_ranks_average_gradients_and_only_rank_zero_writes() {
    use minimind_v::config::TrainConfig;
    use minimind_v::train::dist::ThreadGroup;
    use minimind_v::train::{run, run_dist, RunOptions};

    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let first = minimind_v::shards::reader::list_shards(&cache).unwrap()[0].clone();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    for (dir, copies) in [(&one, 1), (&two, 2)] {
        std::fs::create_dir_all(dir).unwrap();
        for i in 0..copies {
            std::fs::copy(&first, dir.join(format!("shard-{i:05}.parquet"))).unwrap();
        }
    }
    let config = |name: &str, shards: &Path| -> TrainConfig {
        let p = pipeline(tmp.path(), name, shards, 8, 192);
        let text = std::fs::read_to_string(p).unwrap();
        let table: toml::Table = text.parse().unwrap();
        table["train"].clone().try_into().unwrap()
    };
    let opts = || RunOptions {
        resume: false,
        overwrite: false,
        force: false,
        interrupt: None,
        stop_after: None,
        progress: false,
        device: candle_core::Device::Cpu,
    };
    let solo = run(&config("solo", &one), &opts()).unwrap();

    let two_ranks = |cfg: TrainConfig| -> Vec<_> {
        let handles: Vec<_> = ThreadGroup::new(2)
            .ranks()
            .into_iter()
            .map(|d| {
                let cfg = cfg.clone();
                std::thread::spawn(move || run_dist(&cfg, &opts(), &d).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let params = |vm: &candle_nn::VarMap| -> Vec<(String, Vec<u32>)> {
        let mut v: Vec<_> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, var)| {
                let t = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (n.clone(), t.iter().map(|x| x.to_bits()).collect())
            })
            .collect();
        v.sort();
        v
    };
    let own_files = TrainConfig {
        rank_data: minimind_v::config::RankData::Files,
        ..config("dp", &two)
    };
    let (logs, vms): (Vec<_>, Vec<_>) = two_ranks(own_files).into_iter().unzip();
    assert_eq!(losses(&logs[0]), losses(&solo), "rank 0 == one rank");
    assert_eq!(losses(&logs[1]), losses(&solo), "rank 1 == one rank");
    let written = read_metrics(&tmp.path().join("dp")).unwrap();
    assert_eq!(losses(&written), losses(&solo), "one metrics line per step");
    let w = |run: &str| {
        let p = tmp.path().join(run).join("checkpoint/model.safetensors");
        std::fs::read(p).unwrap()
    };
    assert_eq!(
        w("dp"),
        w("solo"),
        "the replica rank 0 saved == the one-rank model"
    );
    assert_eq!(params(&vms[0]), params(&vms[1]));

    // Different rows of each batch on each rank.
    let runs = two_ranks(config("dp_split", &cache));
    assert_ne!(losses(&runs[0].0), losses(&solo));
    assert_eq!(losses(&runs[0].0), losses(&runs[1].0));
    assert_eq!(
        params(&runs[0].1),
        params(&runs[1].1),
        "replicas on different data must stay identical"
    );
}

/// `train --ranks 2` starts two processes that meet over TCP: the same result, bit for bit, as
/// two ranks that are threads of one process (both sum in rank order), and one metrics line per
/// step. A rank that fails stops the run with its rank named.
#[test]
fn ranks_as_processes_match_ranks_as_threads() {
    use minimind_v::config::TrainConfig;
    use minimind_v::train::dist::ThreadGroup;
    use minimind_v::train::{run_dist, RunOptions};

    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let p = pipeline(tmp.path(), "procs", &cache, 6, 192);
    let out = train(&p, &["--ranks", "2"]);
    common::assert_ok(&out);
    let procs = read_metrics(&tmp.path().join("procs")).unwrap();
    assert_eq!(procs.len(), 6);

    let threads = pipeline(tmp.path(), "threads", &cache, 6, 192);
    let table: toml::Table = std::fs::read_to_string(threads).unwrap().parse().unwrap();
    let cfg: TrainConfig = table["train"].clone().try_into().unwrap();
    let handles: Vec<_> = ThreadGroup::new(2)
        .ranks()
        .into_iter()
        .map(|d| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let opts = RunOptions {
                    resume: false,
                    overwrite: false,
                    force: false,
                    interrupt: None,
                    stop_after: None,
                    progress: false,
                    device: candle_core::Device::Cpu,
                };
                run_dist(&cfg, &opts, &d).unwrap().0
            })
        })
        .collect();
    let logs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(losses(&procs), losses(&logs[0]));
    let w = |run: &str| std::fs::read(tmp.path().join(run).join("checkpoint/model.safetensors"));
    assert_eq!(w("procs").unwrap(), w("threads").unwrap());

    // A world of one with an address goes through the reduction, and changes nothing.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let one = pipeline(tmp.path(), "world_of_one", &cache, 6, 192);
    let out = Command::new(common::bin())
        .args(["train", one.to_str().unwrap(), "--device", "cpu"])
        .env("MMV_RANK", "0")
        .env("MMV_WORLD_SIZE", "1")
        .env("MMV_MASTER_ADDR", port.to_string())
        .output()
        .unwrap();
    common::assert_ok(&out);
    let solo = pipeline(tmp.path(), "solo", &cache, 6, 192);
    assert!(train(&solo, &[]).status.success());
    let m = |run: &str| losses(&read_metrics(&tmp.path().join(run)).unwrap());
    assert_eq!(m("world_of_one"), m("solo"));

    // Ranks that read their own files, more of them than shard files: every rank refuses, the
    // launcher names one and stops.
    let out = train(&p, &["--ranks", "9", "--set", "train.rank_data=files"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot feed 9 ranks"), "{err}");
    assert!(err.contains("failed"), "{err}");
}

/// A pipeline that does not name `adam_beta2` trains with Adam's 0.999 (upstream's), and the
/// setting reaches the optimizer: the first update is β₂-independent (bias correction), later ones
/// are not. A β₂ of 1 or more is refused, naming the setting.
#[test]
fn adam_beta2_defaults_to_upstreams_and_changes_the_updates() {
    use minimind_v::config::TrainConfig;
    use minimind_v::train::{run, RunOptions};

    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let p = pipeline(tmp.path(), "beta", &cache, 4, 192);
    let table: toml::Table = std::fs::read_to_string(p).unwrap().parse().unwrap();
    let adam: TrainConfig = table["train"].clone().try_into().unwrap();
    assert_eq!(adam.adam_beta2, 0.999);
    let short = TrainConfig {
        adam_beta2: 0.95,
        out: tmp.path().join("short"),
        ..adam.clone()
    };
    let opts = RunOptions {
        resume: false,
        overwrite: false,
        force: false,
        interrupt: None,
        stop_after: None,
        progress: false,
        device: candle_core::Device::Cpu,
    };
    let (a, b) = (run(&adam, &opts).unwrap(), run(&short, &opts).unwrap());
    let one = TrainConfig {
        adam_beta2: 1.0,
        ..adam.clone()
    };
    let err = run(&one, &opts).unwrap_err().to_string();
    assert!(err.contains("adam_beta2 = 1"), "{err}");
    assert_eq!(
        losses(&a)[..2],
        losses(&b)[..2],
        "steps 1-2 see one update at most"
    );
    assert_ne!(
        losses(&a)[3],
        losses(&b)[3],
        "β₂ never reached the optimizer"
    );
}

/// A second `train` into the same `out` without `--resume` is refused (it replaced the run
/// silently before); `--overwrite` starts over, a stale `loss.png` gone with the rest. A resume
/// with a changed learning rate is refused naming it, unless `--force`; one with a changed
/// checkpoint interval is fine; resuming a finished run says so.
#[test]
fn a_run_cannot_be_lost_by_running_again_or_resumed_with_other_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let p = pipeline(tmp.path(), "run", &cache, 4, 192);
    common::assert_ok(&train(&p, &[]));
    let out = tmp.path().join("run");
    assert!(out.join("loss.png").exists());

    let again = train(&p, &[]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success()
            && err.contains("holds a run (a checkpoint at step 4)")
            && err.contains("--resume")
            && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(read_metrics(&out).unwrap().len(), 4, "untouched");

    let finished = train(&p, &["--resume"]);
    common::assert_ok(&finished);
    assert!(String::from_utf8_lossy(&finished.stderr).contains("already finished: step 4 of 4"));

    let changed = train(
        &p,
        &[
            "--resume",
            "--set",
            "train.steps=6",
            "--set",
            "train.lr=2e-3",
        ],
    );
    let err = String::from_utf8_lossy(&changed.stderr);
    assert!(
        !changed.status.success()
            && err.contains("lr 0.001 → 0.002")
            && err.contains("steps 4 → 6"),
        "{err}"
    );
    let harmless = train(&p, &["--resume", "--set", "train.checkpoint_every=2"]);
    common::assert_ok(&harmless);
    let forced = train(&p, &["--resume", "--force", "--set", "train.steps=6"]);
    common::assert_ok(&forced);
    assert!(String::from_utf8_lossy(&forced.stderr).contains("resuming at step 4 "));
    assert_eq!(read_metrics(&out).unwrap().len(), 6);

    std::fs::write(out.join("loss.png"), b"stale").unwrap();
    common::assert_ok(&train(&p, &["--overwrite", "--set", "train.steps=2"]));
    assert_eq!(read_metrics(&out).unwrap().len(), 2);
    assert_ne!(std::fs::read(out.join("loss.png")).unwrap(), b"stale");
}

/// Ctrl-C: the run stops at the next step with a checkpoint of that step and says so (it lost up
/// to `checkpoint_every` steps before); `--resume` then reproduces the uninterrupted run.
#[test]
fn ctrl_c_checkpoints_the_current_step_and_resume_continues_exactly() {
    const STEPS: usize = 60;
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let whole = pipeline(tmp.path(), "whole", &cache, STEPS, 192);
    common::assert_ok(&train(&whole, &["--set", "train.checkpoint_every=1000"]));
    let want = read_metrics(&tmp.path().join("whole")).unwrap();

    let p = pipeline(tmp.path(), "sigint", &cache, STEPS, 192);
    let metrics = tmp.path().join("sigint/metrics.jsonl");
    let child = Command::new(common::bin())
        .args(["train", p.to_str().unwrap(), "--device", "cpu"])
        .args(["--set", "train.checkpoint_every=1000"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 5 {
        assert!(std::time::Instant::now() < deadline, "no steps logged");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("sigint/checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    let at = state["step"].as_u64().unwrap() as usize;
    assert!((5..STEPS).contains(&at), "checkpoint at step {at}");
    assert!(
        err.contains(&format!("interrupted: checkpoint written at step {at} ")),
        "{err}"
    );
    let resumed = train(&p, &["--resume", "--set", "train.checkpoint_every=1000"]);
    common::assert_ok(&resumed);
    assert_eq!(
        losses(&read_metrics(&tmp.path().join("sigint")).unwrap()),
        losses(&want)
    );
}

/// Samples longer than the model reads (two-image samples of 168 tokens, a model of 128) are
/// refused when training starts, with the numbers and the fix (a RoPE `narrow` failed mid-run).
#[test]
fn samples_longer_than_the_model_reads_are_refused_at_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("dataset");
    synth::generate(&SynthConfig {
        out: ds.clone(),
        seed: 3,
        pretrain: 0,
        sft: 0,
        sft_records: 1,
        multi: 40,
        faults: false,
    })
    .unwrap();
    let dir = ds.join("sft_multi_images");
    let p = tmp.path().join("ingest.toml");
    std::fs::write(
        &p,
        format!(
            "[ingest]\nstage = \"sft_multi\"\njson = {:?}\nimages = {:?}\nout = {:?}\ntokenizer = {:?}\nclip = \"random-small:1\"\n",
            dir.join("output.json"),
            dir,
            tmp.path().join("cache"),
            common::tokenizer_dir()
        ),
    )
    .unwrap();
    common::assert_ok(
        &Command::new(common::bin())
            .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
            .output()
            .unwrap(),
    );
    let t = pipeline(tmp.path(), "short", &tmp.path().join("cache"), 2, 192);
    let out = train(&t, &["--set", "train.model.max_seq_len=128"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("holds samples of up to")
            && err.contains("max_seq_len = 128")
            && err.contains("HINT"),
        "{err}"
    );
    assert!(!tmp.path().join("short/metrics.jsonl").exists());
}

#[test]
fn outside_a_terminal_train_says_what_it_will_do_then_prints_plain_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let p = pipeline(tmp.path(), "run", &cache, 6, 192);
    let out = train(&p, &[]);
    common::assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let samples = minimind_v::shards::manifest::read_manifest(&cache)
        .unwrap()
        .samples_written;
    for want in [
        "model: dim 64, 2 layers, 4 heads (2 KV), max_seq_len 512;".to_string(),
        format!("{samples} samples (longest "),
        format!("6 steps × 8 samples ≈ {:.2} epochs", 48.0 / samples as f64),
        "batch 4 per rank × 2 accumulated × 1 rank(s); lr 1e-3 cosine to 1e-4, warmup 2 steps"
            .into(),
        format!(
            "outputs: {}",
            tmp.path().join("run").join("metrics.jsonl").display()
        ),
        "train: 6/6 steps (100.0%)".into(),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    // The first step's line, with a rate and an ETA, then the last.
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("train: ")).collect();
    assert!(lines.len() >= 2, "{err}");
    assert!(
        lines[0].starts_with("train: 1/6 steps") && lines[0].contains("ETA"),
        "{err}"
    );
    // The step's epoch (batch 4 × 2 accumulated: an epoch is ceil(ceil(samples / 4) / 2) steps).
    let per_epoch = samples.div_ceil(4).div_ceil(2);
    let epoch = format!("; epoch 1 (1/{per_epoch}, epoch ETA ");
    assert!(
        lines[0].contains(&epoch) && lines[0].contains(") loss "),
        "{err}"
    );
    assert!(
        err.contains(&format!("(one epoch: {per_epoch} steps)")),
        "{err}"
    );
}

/// Upstream's `get_lr(it, all)` as `1-pretrain_vlm.py` / `2-sft_vlm.py` define it, written out
/// independently of the trainer's schedule: `it = epoch * iter_per_epoch + step`,
/// `all = epochs * iter_per_epoch`.
fn upstream_get_lr(it: usize, all: usize, lr: f64, warmup: usize) -> f64 {
    let min_lr = lr / 10.0;
    if it < warmup {
        return lr * it as f64 / warmup as f64;
    }
    if it > all {
        return min_lr;
    }
    let decay_ratio = (it - warmup) as f64 / (all - warmup) as f64;
    assert!((0.0..=1.0).contains(&decay_ratio));
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * decay_ratio).cos());
    min_lr + coeff * (lr - min_lr)
}

#[test]
fn the_schedule_is_upstreams_get_lr_at_every_step() {
    use minimind_v::train::optim::lr_at;
    for (all, warmup) in [(57, 0), (57, 5), (1, 0), (400, 37)] {
        for it in 0..=all + 2 {
            let (ours, theirs) = (
                lr_at(it, all, 4e-4, warmup),
                upstream_get_lr(it, all, 4e-4, warmup),
            );
            assert_eq!(
                ours.to_bits(),
                theirs.to_bits(),
                "it {it} of {all}, warmup {warmup}: {ours} vs {theirs}"
            );
        }
    }
}

/// `epochs = 3`, batch 16, no accumulation (upstream's setup): one epoch is `ceil(samples / 16)`
/// steps (upstream's `len(train_loader)`, last batch short), every step's lr is upstream's
/// `get_lr(epoch * iter_per_epoch + step, epochs * iter_per_epoch)` exactly, the stream's epoch
/// turns exactly at the step count's epoch boundary, progress names the epoch, and a run stopped
/// in the middle of an epoch resumes bit for bit.
#[test]
fn epochs_follow_upstreams_schedule_and_resume_mid_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = shards(tmp.path());
    let samples = minimind_v::shards::manifest::read_manifest(&cache)
        .unwrap()
        .samples_written;
    let in_epochs = |name: &str| {
        let p = pipeline(tmp.path(), name, &cache, 1, 192);
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text
            .replace("steps = 1\n", "epochs = 3\n")
            .replace("batch_size = 4\n", "batch_size = 16\n")
            .replace("grad_accum = 2\n", "grad_accum = 1\n")
            .replace("warmup_steps = 2\n", "warmup_steps = 0\n")
            .replace("checkpoint_every = 4\n", "checkpoint_every = 10\n");
        std::fs::write(&p, text).unwrap();
        p
    };
    let per_epoch = samples.div_ceil(16);
    let all = 3 * per_epoch;
    let whole = in_epochs("whole");
    let out = train(&whole, &[]);
    common::assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let plan = format!("{samples} samples (longest ");
    let length = format!("3 epochs × {per_epoch} steps = {all} steps × 16 samples");
    assert!(err.contains(&plan) && err.contains(&length), "{err}");
    assert!(
        err.contains(&format!("epoch 3/3 ({per_epoch}/{per_epoch}, epoch ETA ")),
        "{err}"
    );
    let want = read_metrics(&tmp.path().join("whole")).unwrap();
    assert_eq!(want.len(), all);
    for log in &want {
        let (epoch, step) = ((log.step - 1) / per_epoch, (log.step - 1) % per_epoch);
        let lr = upstream_get_lr(epoch * per_epoch + step, all, 1e-3, 0);
        assert_eq!(
            log.lr.to_bits(),
            lr.to_bits(),
            "step {}: {} vs upstream {lr}",
            log.step,
            log.lr
        );
        assert_eq!(log.epoch, epoch as u64, "step {}", log.step);
        assert!(log.loss.is_finite());
    }

    // Stopped five steps into the second epoch (between checkpoints), then resumed.
    let split = in_epochs("split");
    let stop = (per_epoch + 5).to_string();
    common::assert_ok(&train(&split, &["--stop-after", &stop]));
    let out = train(&split, &["--resume"]);
    common::assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("resuming at step {stop} ")), "{err}");
    let got = read_metrics(&tmp.path().join("split")).unwrap();
    assert_eq!(losses(&got), losses(&want), "bit-exact loss sequence");

    // An override of steps replaces the file's epochs (and the other way round).
    let out = train(&split, &["--overwrite", "--set", "train.steps=2"]);
    common::assert_ok(&out);
    assert_eq!(read_metrics(&tmp.path().join("split")).unwrap().len(), 2);
}
