//! Generation: the KV cache changes nothing (greedy tokens identical to full recomputation),
//! upstream `.pth` and safetensors weights generate the same tokens, sampling is seeded, and
//! streamed text never splits a UTF-8 character.

mod common;

use candle_core::{DType, Device, IndexOp};
use minimind_v::generate::{generate, sample, Sampling, TextStream};
use minimind_v::model::vlm::Images;
use minimind_v::model::{weights, ModelConfig};
use minimind_v::text::chat_prompt;
use minimind_v::text::{placeholder_text, ChatTokenizer};
use rand::SeedableRng;

fn model(file: &str) -> minimind_v::model::vlm::Vlm {
    let dir = common::reference().join("tiny_llm");
    weights::load(&dir.join(file), &ModelConfig::tiny(), false, &Device::Cpu)
        .unwrap()
        .0
}

fn setup() -> (Vec<u32>, Images) {
    let tok = ChatTokenizer::load(&common::tokenizer_dir()).unwrap();
    let prompt = tok.encode_text(&chat_prompt("这张图片里有什么？", 1));
    let case = candle_core::safetensors::load(
        common::reference().join("tiny_llm/case.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let feats = case["image_feats"]
        .i(0)
        .unwrap()
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let imgs = Images::for_rows(&[&prompt], &[feats], &ModelConfig::tiny().image_ids)
        .unwrap()
        .unwrap();
    (prompt, imgs)
}

#[test]
fn kv_cache_generation_equals_recomputation() {
    let m = model("model.safetensors");
    let (prompt, imgs) = setup();
    let s = Sampling::greedy(40);
    let cached = generate(&m, &prompt, Some(&imgs), &s, true, |_| true).unwrap();
    let full = generate(&m, &prompt, Some(&imgs), &s, false, |_| true).unwrap();
    assert!(!cached.is_empty());
    assert_eq!(cached, full);
    // Sampled, seeded: same seed, same tokens, with and without the cache.
    let s = Sampling {
        seed: 7,
        max_new_tokens: 30,
        ..Sampling::upstream_chat()
    };
    let a = generate(&m, &prompt, Some(&imgs), &s, true, |_| true).unwrap();
    assert_eq!(
        a,
        generate(&m, &prompt, Some(&imgs), &s, false, |_| true).unwrap()
    );
    let other = Sampling {
        seed: 8,
        ..s.clone()
    };
    assert_ne!(
        a,
        generate(&m, &prompt, Some(&imgs), &other, true, |_| true).unwrap()
    );
}

#[test]
fn pth_and_safetensors_generate_the_same_tokens() {
    let (prompt, imgs) = setup();
    let s = Sampling::greedy(30);
    let a = generate(
        &model("model.safetensors"),
        &prompt,
        Some(&imgs),
        &s,
        true,
        |_| true,
    )
    .unwrap();
    let b = generate(&model("model.pth"), &prompt, Some(&imgs), &s, true, |_| {
        true
    })
    .unwrap();
    assert_eq!(a, b);
}

#[test]
fn sampling_rules() {
    let logits = candle_core::Tensor::new(&[1.0f32, 3.0, 2.0, -1.0], &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    assert_eq!(
        sample(&logits, &[], &Sampling::greedy(1), &mut rng).unwrap(),
        1
    );
    // Upstream's repetition penalty divides seen tokens' logits: 3/4 < 2.
    let rp = Sampling {
        repetition_penalty: 4.0,
        ..Sampling::greedy(1)
    };
    assert_eq!(sample(&logits, &[1, 1], &rp, &mut rng).unwrap(), 2);
    // top-k 1 is greedy whatever the temperature; top-p keeps only the head.
    let k1 = Sampling {
        temperature: 5.0,
        top_k: Some(1),
        ..Sampling::greedy(1)
    };
    let p = Sampling {
        temperature: 1.0,
        top_p: Some(0.5),
        ..Sampling::greedy(1)
    };
    for _ in 0..50 {
        assert_eq!(sample(&logits, &[], &k1, &mut rng).unwrap(), 1);
        assert_eq!(sample(&logits, &[], &p, &mut rng).unwrap(), 1);
    }
}

#[test]
fn prompts_place_images_like_upstream() {
    let ph = placeholder_text();
    assert_eq!(
        chat_prompt("What is it?", 1),
        format!("<s>user\n{ph}\nWhat is it?</s>\n<s>assistant\n")
    );
    assert_eq!(
        chat_prompt("Compare <image> and <image>", 2),
        format!("<s>user\nCompare {ph} and {ph}</s>\n<s>assistant\n")
    );
    assert_eq!(chat_prompt("hi", 0), "<s>user\nhi</s>\n<s>assistant\n");
}

#[test]
fn streamed_text_never_splits_a_character() {
    let tok = ChatTokenizer::load(&common::tokenizer_dir()).unwrap();
    let text = "一只橙色的猫🐱躺在灰色的沙发上晒太阳。A cat.";
    let ids = tok.encode_text(text);
    let mut stream = TextStream::new(&tok);
    let mut pieces = Vec::new();
    for id in ids {
        if let Some(p) = stream.push(id) {
            assert!(!p.contains('\u{FFFD}'), "half a character emitted: {p:?}");
            pieces.push(p);
        }
    }
    assert_eq!(pieces.concat(), text);
    assert_eq!(stream.text(), text);
}

#[test]
fn chat_cli_answers_and_refuses_bad_input_clearly() {
    let pth = common::reference().join("tiny_llm/model.pth");
    let bear = common::repo().join("../shared/assets/eval_images/a-bear.png");
    let run = |extra: &[&str]| {
        std::process::Command::new(common::bin())
            .current_dir(common::repo())
            .args([
                "chat",
                "--ckpt",
                pth.to_str().unwrap(),
                "--model",
                "tiny",
                "--clip",
                "random:1",
                "--device",
                "cpu",
            ])
            .args(["--temperature", "0", "--max-new-tokens", "8"])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&[
        "--image",
        bear.to_str().unwrap(),
        "--prompt",
        "这张图片里有什么？",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!String::from_utf8_lossy(&ok.stdout).trim().is_empty());
    assert!(String::from_utf8_lossy(&ok.stderr).contains("RANDOM-INITIALISED"));

    let b = bear.to_str().unwrap();
    let three = run(&["--image", b, "--image", b, "--image", b, "--prompt", "x"]);
    assert!(
        !three.status.success() && String::from_utf8_lossy(&three.stderr).contains("at most 2")
    );
    let missing = run(&["--image", "/no/such.png", "--prompt", "x"]);
    assert!(
        !missing.status.success()
            && String::from_utf8_lossy(&missing.stderr).contains("/no/such.png")
    );
    let corrupt = run(&[
        "--image",
        common::repo().join("Cargo.toml").to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(
        !corrupt.status.success()
            && String::from_utf8_lossy(&corrupt.stderr).contains("not a readable image")
    );
    let long = "很长".repeat(400);
    let too_long = run(&["--prompt", &long]);
    assert!(
        !too_long.status.success()
            && String::from_utf8_lossy(&too_long.stderr).contains("max_seq_len")
    );
}

/// An interactive session reports what it cannot answer and goes on: `<image>` tags that do not
/// match the images, a line far longer than the model reads (refused before it is tokenized), a
/// prompt over `max_seq_len`; an answer cut short by the context length says so.
#[test]
fn an_interactive_chat_reports_bad_questions_and_goes_on() {
    use std::io::Write;
    let pth = common::reference().join("tiny_llm/model.pth");
    let bear = common::repo().join("../shared/assets/eval_images/a-bear.png");
    let mut child = std::process::Command::new(common::bin())
        .current_dir(common::repo())
        .args(["chat", "--ckpt", pth.to_str().unwrap(), "--model", "tiny"])
        .args([
            "--clip",
            "random:1",
            "--device",
            "cpu",
            "--temperature",
            "0",
        ])
        .args(["--image", bear.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = [
        "Compare <image> and <image>.".to_string(),
        "x".repeat(1 << 20),
        "很长".repeat(60),
        "What is it?".to_string(),
    ];
    let mut stdin = child.stdin.take().unwrap();
    for l in &lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    common::assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 <image> tag(s) for 1 image(s)"),
        "tag mismatch not reported: {err}"
    );
    assert!(
        err.contains("1048576 bytes, more than the model's max_seq_len of 128 tokens"),
        "{err}"
    );
    assert!(err.contains("the model's max_seq_len is 128"), "{err}");
    // The last question is answered: the tiny random model runs to the context limit.
    assert!(
        err.contains("cut at the model's max_seq_len of 128 tokens"),
        "{err}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

/// `chat` and `serve` check sampling settings with one validation: NaN, a top-p over 1 and a
/// repetition penalty of 0 are refused, naming the option.
#[test]
fn chat_refuses_sampling_settings_that_serve_refuses() {
    let pth = common::reference().join("tiny_llm/model.pth");
    for (flag, value, want) in [
        ("--temperature", "nan", "--temperature: temperature NaN"),
        ("--top-p", "5", "--top-p: top_p 5 must be in (0, 1]"),
        ("--rp", "0", "--rp: repetition_penalty 0"),
        ("--max-new-tokens", "0", "--max-new-tokens"),
    ] {
        let out = std::process::Command::new(common::bin())
            .current_dir(common::repo())
            .args(["chat", "--ckpt", pth.to_str().unwrap(), "--model", "tiny"])
            .args(["--device", "cpu", "--prompt", "x", flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{flag} {value}: {err}"
        );
    }
    let mut s = minimind_v::generate::Sampling::upstream_chat();
    assert!(s.validate().is_ok());
    s.repetition_penalty = f64::NAN;
    assert_eq!(s.validate().unwrap_err().0, "repetition_penalty");
}
