//! `bench parity` (the GPU session's first check) runs end to end; on CPU against CPU every
//! difference must be exactly zero, and bf16 must stay within its tolerance.

mod common;

use std::process::Command;

#[test]
fn parity_on_cpu_is_exact_and_bf16_within_tolerance() {
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
    assert_eq!(rows.len(), 3, "{text}");
    assert!(
        rows[0].contains("| 0.000e0 |"),
        "CLIP cpu vs cpu: {}",
        rows[0]
    );
    assert!(
        rows[1].contains("| 0.000e0 |"),
        "train cpu vs cpu: {}",
        rows[1]
    );
}
