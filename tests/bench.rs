//! `bench parity` (the first check on a GPU machine) runs end to end; on CPU against CPU the
//! CLIP features, the f32 loss curve and the embedding are exactly equal (the same code), the
//! CPU kernels (causal softmax, RMSNorm, SwiGLU) agree with the portable forms to f32 rounding,
//! and bf16 stays within its tolerance.

mod common;

use std::process::Command;

#[test]
fn parity_on_cpu_is_exact_where_the_code_is_shared_and_bf16_within_tolerance() {
    let out = Command::new(common::bin())
        .args([
            "bench",
            "parity",
            "--model",
            "tiny",
            "--clip",
            "random-small:0",
            "--images",
            "3",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--bf16-steps",
            "12",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    common::assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text.lines().filter(|l| l.ends_with("| yes |")).collect();
    // CLIP, 5 kernel checks × (f32, bf16), the f32 curve, bf16 vs f32.
    assert_eq!(rows.len(), 13, "{text}");
    let row = |what: &str| *rows.iter().find(|r| r.contains(what)).expect(what);
    for exact in ["CLIP", "f32 steps", "embedding 50×16, 2×7 ids, f32"] {
        assert!(row(exact).contains("| 0.000e0 |"), "{}", row(exact));
    }
    // The CPU kernels against the portable forms: within 1e-6 of the largest value (the rows'
    // own tolerance is 1e-4), summed in another order.
    for kernel in [
        "causal softmax 2×3×5×8, f32",
        "causal softmax 2×3×(2·5)×8, grouped heads, f32",
        "RMSNorm 2×5×64, f32",
        "SwiGLU 3×40, f32",
    ] {
        let diff: f64 = row(kernel)
            .split('|')
            .nth(3)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(diff < 1e-6, "{}", row(kernel));
    }
    // bf16 inputs and arithmetic against f32: close, not equal.
    assert!(!row("RMSNorm 2×5×64, bf16").contains("| 0.000e0 |"));
}

/// The step the `train` and `breakdown` benches time here: tiny model, two samples, two steps.
const TINY_STEP: [&str; 8] = [
    "--model",
    "tiny",
    "--batch-size",
    "2",
    "--steps",
    "2",
    "--mean-len",
    "60",
];

/// `minimind-v bench <what> <TINY_STEP> <args> --device cpu`.
fn bench(what: &str, args: &[&str]) -> String {
    let out = Command::new(common::bin())
        .args(["bench", what])
        .args(TINY_STEP)
        .args(args)
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    common::assert_ok(&out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Markdown row's numeric cells.
fn numbers(row: &str) -> Vec<f64> {
    row.split('|')
        .filter_map(|c| c.split_whitespace().next()?.trim_matches('*').parse().ok())
        .collect()
}

#[test]
fn breakdown_times_every_phase_and_operation_of_a_step() {
    let text = bench("breakdown", &[]);
    for phase in ["collate", "forward", "backward", "AdamW", "**sum**"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {phase}")))
            .unwrap_or_else(|| panic!("no {phase} row in\n{text}"));
        assert!(numbers(row).first().is_some_and(|&ms| ms >= 0.0), "{row}");
    }
    // Every operation row has a time; the model's forms are there beside the elementary ones.
    let ops: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("| operation"))
        .skip(2)
        .collect();
    assert!(ops.len() >= 16, "{text}");
    assert!(ops
        .iter()
        .all(|r| numbers(r).last().is_some_and(|&v| v > 0.0)));
    assert_eq!(
        ops.iter()
            .filter(|r| r.contains("the model's form"))
            .count(),
        4
    );
}

#[test]
fn train_bench_rows_come_per_padding_and_tf32_runs_on_cpu() {
    let dynamic = bench("train", &["--precision", "tf32", "--padding", "dynamic"]);
    let rows: Vec<&str> = dynamic.lines().filter(|l| l.contains("| Tf32 |")).collect();
    assert_eq!(rows.len(), 1, "{dynamic}");
    assert!(rows[0].starts_with("| dynamic |"));
    let both = bench("train", &["--padding", "both"]);
    let rows: Vec<&str> = both.lines().filter(|l| l.contains("| F32 |")).collect();
    assert_eq!(rows.len(), 2, "{both}");
    assert!(rows[1].starts_with("| pad to "), "{both}");
    // Rates are measured, not compared here (timing asserts flake): each row has two.
    assert!(rows
        .iter()
        .all(|r| numbers(r).iter().rev().take(2).all(|&v| v > 0.0)));
}

/// A row that fails (here: samples longer than the tiny model's 128 positions) is printed as
/// failed and makes the whole command fail; a table with a hole is never a result.
#[test]
fn a_failed_train_bench_row_fails_the_command() {
    let out = Command::new(common::bin())
        .args(["bench", "train", "--model", "tiny", "--batch-size", "2"])
        .args(["--steps", "1", "--mean-len", "200", "--padding", "dynamic"])
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a failed row exited 0");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("| dynamic |") && stdout.contains("failed: "),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 of 1 rows failed") && stderr.contains("max_seq_len 128"),
        "{stderr}"
    );
}

/// `bench parity --require` is for GPU scripts: on the CPU the device's forms are the portable
/// ones, every check passes trivially, and `--require` refuses to call that a result.
#[test]
fn parity_require_refuses_a_device_that_is_not_a_gpu() {
    let out = Command::new(common::bin())
        .args(["bench", "parity", "--require", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a GPU"), "{err}");
}
