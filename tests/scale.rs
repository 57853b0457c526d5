//! The recipes of docs/SCALE.md, run with local processes standing in for nodes: ingest as a Slurm
//! job array (deploy/slurm/ingest.sbatch) and as a Kubernetes Indexed Job
//! (deploy/k8s/ingest-job.yaml's command), three workers at once into one shared directory, then
//! `inspect --verify`; and data-parallel training launched the torchrun way
//! (deploy/launch-node.sh on two "nodes"), which must equal `--ranks 2` on one machine.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use minimind_v::synth::{self, SynthConfig};

const WORKERS: usize = 3;

fn dataset(tmp: &Path) -> PathBuf {
    let ds = tmp.join("dataset");
    synth::generate(&SynthConfig {
        out: ds.clone(),
        seed: 5,
        pretrain: 120,
        sft: 0,
        sft_records: 3,
        multi: 0,
        faults: true,
    })
    .unwrap();
    ds
}

/// An ingest pipeline into `out`, small shards so that every worker has several.
fn ingest_pipeline(tmp: &Path, ds: &Path, out: &str) -> PathBuf {
    let p = tmp.join(format!("{out}.toml"));
    std::fs::write(
        &p,
        format!(
            "[ingest]\nstage = \"pretrain\"\njson = {:?}\nimages = {:?}\nout = {:?}\ntokenizer = {:?}\nclip = \"random-small:1\"\nrows_per_shard = 10\n",
            ds.join("LLaVA-Pretrain/chat-translated.json"),
            ds.join("pretrain_images.zip"),
            tmp.join(out),
            common::tokenizer_dir()
        ),
    )
    .unwrap();
    p
}

/// `ingest_pipeline` run once, in one process; its output directory.
fn ingest_once(tmp: &Path, ds: &Path, out: &str) -> PathBuf {
    let p = ingest_pipeline(tmp, ds, out);
    common::assert_ok(
        &Command::new(common::bin())
            .args(["ingest", p.to_str().unwrap(), "--device", "cpu"])
            .output()
            .unwrap(),
    );
    tmp.join(out)
}

/// Start `cmd` as a node or pod would run, its output kept for `finish`.
fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    common::assert_ok(&out);
    out
}

fn verify(dir: &Path) -> Output {
    Command::new(common::bin())
        .args(["inspect", dir.to_str().unwrap(), "--verify"])
        .output()
        .unwrap()
}

/// Every shard file under `dir`'s data/ with its bytes.
fn shards(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(f).unwrap())
        })
        .collect()
}

/// The script a scheduler would run, with `env` as the scheduler sets it.
fn script(path: &str, args: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = Command::new("bash");
    c.arg(common::repo().join(path))
        .args(args)
        .current_dir(common::repo())
        .env("MINIMIND_V", common::bin())
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

#[test]
fn ingest_as_a_slurm_array_and_as_an_indexed_job_equals_one_ingest() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path());
    let want = shards(&ingest_once(tmp.path(), &ds, "single"));
    assert!(want.len() >= 2 * WORKERS, "{} shards", want.len());

    // Slurm: the array's tasks 0 and 2 run at once; the check fails while task 1 is missing.
    let slurm = ingest_pipeline(tmp.path(), &ds, "slurm");
    let task = |i: usize| {
        script(
            "deploy/slurm/ingest.sbatch",
            &[],
            &[
                ("SLURM_ARRAY_TASK_ID", i.to_string()),
                ("SLURM_ARRAY_TASK_COUNT", WORKERS.to_string()),
                ("PIPELINE", slurm.display().to_string()),
                ("DEVICE", "cpu".into()),
                ("RAYON_NUM_THREADS", "1".into()),
            ],
        )
        .output()
        .unwrap()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| task(0));
        let b = s.spawn(|| task(2));
        (a.join().unwrap(), b.join().unwrap())
    });
    common::assert_ok(&a);
    common::assert_ok(&b);
    let out = verify(&tmp.path().join("slurm"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the ingest is not complete") && err.contains("HINT"),
        "{err}"
    );
    common::assert_ok(&task(1));
    let out = verify(&tmp.path().join("slurm"));
    common::assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("shards match the manifest"));
    assert_eq!(shards(&tmp.path().join("slurm")), want);

    // Kubernetes: the Job's own command, completions and WORKERS, pods started all at once.
    let yaml = std::fs::read_to_string(common::repo().join("deploy/k8s/ingest-job.yaml")).unwrap();
    let field = |key: &str| {
        yaml.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} missing"))
            .trim()
            .to_string()
    };
    assert_eq!(field("completionMode:"), "Indexed");
    let completions = field("completions:");
    let workers = yaml
        .split("- name: WORKERS")
        .nth(1)
        .and_then(|rest| rest.lines().nth(1))
        .and_then(|l| l.trim().strip_prefix("value:"))
        .map(|v| v.trim().trim_matches('"').to_string());
    assert_eq!(
        workers.as_deref(),
        Some(completions.as_str()),
        "WORKERS = completions"
    );
    let command: Vec<String> = serde_json::from_str(&field("command:")).unwrap();
    assert_eq!(
        command,
        [
            "deploy/ingest-worker.sh",
            "pipelines/pretrain.toml",
            "--device",
            "cuda"
        ]
    );
    // Run with the test's pipeline and the CPU in place of the real dataset and a GPU.
    let k8s = ingest_pipeline(tmp.path(), &ds, "k8s");
    let pods: Vec<Child> = (0..WORKERS)
        .map(|i| {
            spawn(script(
                &command[0],
                &[k8s.to_str().unwrap(), "--device", "cpu"],
                &[
                    ("JOB_COMPLETION_INDEX", i.to_string()),
                    ("WORKERS", WORKERS.to_string()),
                    ("RAYON_NUM_THREADS", "1".into()),
                ],
            ))
        })
        .collect();
    for pod in pods {
        finish(pod);
    }
    common::assert_ok(&verify(&tmp.path().join("k8s")));
    assert_eq!(shards(&tmp.path().join("k8s")), want);

    // Without an index the worker script refuses, saying what it needs.
    let out = script("deploy/ingest-worker.sh", &[k8s.to_str().unwrap()], &[])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("JOB_COMPLETION_INDEX"),
        "{err}"
    );
}

/// A small training run of a tiny model on `shards`, into `tmp/out`.
fn train_pipeline(tmp: &Path, shards: &Path, out: &str) -> PathBuf {
    let p = tmp.join(format!("{out}.toml"));
    std::fs::write(
        &p,
        format!(
            "[train]\nshards = {shards:?}\nout = {:?}\nsteps = 5\nbatch_size = 4\nlr = 1e-3\nshuffle_buffer = 32\nseed = 3\n\n[train.model]\npreset = \"tiny\"\ndim = 64\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nvision_dim = 192\n",
            tmp.join(out)
        ),
    )
    .unwrap();
    p
}

fn losses(dir: &Path) -> Vec<(usize, u32)> {
    minimind_v::train::read_metrics(dir)
        .unwrap()
        .iter()
        .map(|l| (l.step, l.loss.to_bits()))
        .collect()
}

/// deploy/launch-node.sh gives each process torchrun's environment (RANK, WORLD_SIZE,
/// LOCAL_RANK, MASTER_ADDR, MASTER_PORT): two "nodes" of one process and one node of two both
/// train exactly as `--ranks 2` does on one machine (losses and weights bit for bit).
#[test]
fn training_launched_the_torchrun_way_equals_ranks_on_one_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path());
    let cache = ingest_once(tmp.path(), &ds, "cache");

    let local = train_pipeline(tmp.path(), &cache, "local");
    common::assert_ok(
        &Command::new(common::bin())
            .args([
                "train",
                local.to_str().unwrap(),
                "--device",
                "cpu",
                "--ranks",
                "2",
            ])
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap(),
    );
    let want = losses(&tmp.path().join("local"));
    assert_eq!(want.len(), 5);

    let port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    for (name, nodes, per_node) in [("two_nodes", 2, 1), ("one_node", 1, 2)] {
        let p = train_pipeline(tmp.path(), &cache, name);
        let port = port();
        let launchers: Vec<Child> = (0..nodes)
            .map(|node| {
                spawn(script(
                    "deploy/launch-node.sh",
                    &[p.to_str().unwrap()],
                    &[
                        ("NNODES", nodes.to_string()),
                        ("NODE_RANK", node.to_string()),
                        ("NPROC_PER_NODE", per_node.to_string()),
                        ("MASTER_ADDR", "127.0.0.1".into()),
                        ("MASTER_PORT", port.clone()),
                        ("DEVICE", "cpu".into()),
                        ("RAYON_NUM_THREADS", "1".into()),
                    ],
                ))
            })
            .collect();
        for l in launchers {
            finish(l);
        }
        assert_eq!(losses(&tmp.path().join(name)), want, "{name}");
        let w = |run: &str| {
            std::fs::read(tmp.path().join(run).join("checkpoint/model.safetensors")).unwrap()
        };
        assert!(w(name) == w("local"), "{name}: weights differ");
    }

    // A node without MASTER_ADDR is refused by the launcher, naming it.
    let p = train_pipeline(tmp.path(), &cache, "refused");
    let out = script(
        "deploy/launch-node.sh",
        &[p.to_str().unwrap()],
        &[("NNODES", "1".into()), ("NODE_RANK", "0".into())],
    )
    .env_remove("MASTER_ADDR")
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("MASTER_ADDR"),
        "{err}"
    );
}
