//! Template text, token ids and loss masks against `../shared/reference/tokenizer/` (upstream's
//! numbers, produced with transformers 4.44): all 10 cases, exact.

mod common;

use minimind_v::shards::reject::Reason;
use minimind_v::text::{self as chat, ChatTokenizer, Stage, Turn};
use serde_json::Value;

fn cases() -> Value {
    let path = common::reference().join("tokenizer/tokenizer_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn stage(mode: &str) -> Stage {
    serde_json::from_value(Value::String(mode.into())).unwrap()
}

fn turns(case: &Value) -> Vec<Turn> {
    serde_json::from_value(case["conversation"].clone()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_file_is_upstreams() {
    let c = cases();
    let tok = ChatTokenizer::load(&common::tokenizer_dir()).unwrap();
    assert_eq!(
        tok.sha256,
        c["tokenizer_files_sha256"]["tokenizer.json"]
            .as_str()
            .unwrap()
    );
    assert_eq!(
        tok.encode_text(&chat::placeholder_text()),
        chat::placeholder_ids()
    );
    for (text, expected) in c["pieces"].as_object().unwrap() {
        assert_eq!(tok.encode_text(text), ids(expected), "piece {text:?}");
    }
}

#[test]
fn all_cases_match_upstream_template_ids_and_mask() {
    let c = cases();
    let tok = ChatTokenizer::load(&common::tokenizer_dir()).unwrap();
    let samples = c["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 10);
    let mut checked = 0;
    for case in samples {
        let name = case["name"].as_str().unwrap();
        let st = stage(case["mode"].as_str().unwrap());
        let t = turns(case);
        if case.get("error").is_some() {
            // Upstream crashes (IndexError) on this one; we reject it with a reason.
            assert!(chat::select_pairs(st, &t).is_err(), "{name}");
            let err = tok.encode_sample(st, &t, 1, 512).unwrap_err();
            assert_eq!(err.0, Reason::EmptyAnswer, "{name}");
            checked += 1;
            continue;
        }
        let pairs = chat::select_pairs(st, &t).unwrap();
        let text = chat::render(&pairs);
        assert_eq!(
            text,
            case["prompt"].as_str().unwrap(),
            "{name}: template text"
        );

        let padded = ids(&case["input_ids_padded"]);
        let n = 512 - case["padding_len"].as_u64().unwrap() as usize;
        let mut got = tok.encode_text(&text);
        assert_eq!(
            got.len(),
            case["prompt_token_count_untruncated"].as_u64().unwrap() as usize,
            "{name}"
        );
        got.truncate(512);
        assert_eq!(got, padded[..n], "{name}: input_ids");
        assert!(
            padded[n..].iter().all(|&x| x == 0),
            "{name}: padding is id 0"
        );

        let starts: Vec<usize> = ids(&case["image_placeholder_starts_in_X"])
            .into_iter()
            .map(|x| x as usize)
            .collect();
        assert_eq!(
            chat::placeholder_starts(&got),
            starts,
            "{name}: placeholder positions"
        );

        let mask_ref: Vec<u8> = ids(&case["loss_mask_unshifted"])
            .into_iter()
            .map(|x| x as u8)
            .collect();
        let n_images = case["n_image_tags_in_text"].as_u64().unwrap() as usize;
        // Upstream's rule on upstream's ids.
        let start = chat::answer_start(&tok.encode_text(&text)).unwrap();
        assert_eq!(
            chat::loss_mask(n, start),
            mask_ref[..n],
            "{name}: loss mask"
        );
        let enc = tok.encode_sample(st, &t, n_images, 512).unwrap();
        assert!(mask_ref[n..].iter().all(|&x| x == 0));
        assert_eq!(
            enc.loss_mask.iter().map(|&x| x as u64).sum::<u64>(),
            case["loss_mask_sum"].as_u64().unwrap()
        );

        if name.ends_with("_BROKEN") {
            // Upstream merged ' <' and lost the image; we tokenize around the placeholder.
            assert!(starts.is_empty());
            assert!(enc.repaired, "{name}");
            assert_eq!(chat::placeholder_starts(&enc.input_ids).len(), 1);
            assert_ne!(enc.input_ids, got);
            let start = chat::answer_start(&enc.input_ids).unwrap();
            assert_eq!(enc.loss_mask, chat::loss_mask(enc.input_ids.len(), start));
            assert_eq!(
                enc.loss_mask.iter().filter(|&&m| m == 1).count(),
                case["loss_mask_sum"].as_u64().unwrap() as usize
            );
        } else {
            assert_eq!(enc.loss_mask, mask_ref[..n], "{name}: loss mask");
            assert_eq!(
                enc.loss_mask.iter().map(|&x| x as u64).sum::<u64>(),
                case["loss_mask_sum"].as_u64().unwrap()
            );
            assert!(!enc.repaired, "{name}");
            assert_eq!(enc.input_ids, got, "{name}: sample ids");
        }
        checked += 1;
    }
    assert_eq!(checked, 10);
}

#[test]
fn truncation_that_cuts_the_answer_or_placeholder_is_rejected() {
    let tok = ChatTokenizer::load(&common::tokenizer_dir()).unwrap();
    let long_q = format!("<image>\n{}", "很长的问题。".repeat(200));
    let t = vec![
        Turn {
            from: "human".into(),
            value: long_q,
        },
        Turn {
            from: "gpt".into(),
            value: "答案。".into(),
        },
    ];
    assert_eq!(
        tok.encode_sample(Stage::Sft, &t, 1, 512).unwrap_err().0,
        Reason::AnswerTruncated
    );

    let late_image = format!("{}<image>", "很长的问题。".repeat(200));
    let t = vec![
        Turn {
            from: "human".into(),
            value: late_image,
        },
        Turn {
            from: "gpt".into(),
            value: "答案。".into(),
        },
    ];
    assert_eq!(
        tok.encode_sample(Stage::Sft, &t, 1, 512).unwrap_err().0,
        Reason::PlaceholderTruncated
    );
}

#[test]
fn malformed_conversations_are_rejected_with_reasons() {
    let tok = ChatTokenizer::load(&common::tokenizer_dir()).unwrap();
    let h = |v: &str| Turn {
        from: "human".into(),
        value: v.into(),
    };
    let g = |v: &str| Turn {
        from: "gpt".into(),
        value: v.into(),
    };
    assert_eq!(
        tok.encode_sample(Stage::Sft, &[], 1, 512).unwrap_err().0,
        Reason::NoConversations
    );
    assert_eq!(
        tok.encode_sample(Stage::Sft, &[h("<image>")], 1, 512)
            .unwrap_err()
            .0,
        Reason::MalformedConversation
    );
    assert_eq!(
        tok.encode_sample(Stage::Sft, &[g("a"), h("<image>")], 1, 512)
            .unwrap_err()
            .0,
        Reason::MalformedConversation
    );
    assert_eq!(
        tok.encode_sample(Stage::Sft, &[h("no tag"), g("a")], 1, 512)
            .unwrap_err()
            .0,
        Reason::ImageTagMismatch
    );
    assert_eq!(
        tok.encode_sample(Stage::SftMulti, &[h("<image>"), g("a")], 2, 512)
            .unwrap_err()
            .0,
        Reason::ImageTagMismatch
    );
    let ok = tok
        .encode_sample(
            Stage::SftMulti,
            &[h("<image>\n<image>\nDiff?"), g("Colour.")],
            2,
            512,
        )
        .unwrap();
    assert_eq!(chat::placeholder_starts(&ok.input_ids), vec![4, 55]);
}
