//! Upstream's chat template: which question–answer pairs a record keeps, how they render, the
//! prompt generation starts from, and where the trained answer begins.

use super::{placeholder_text, Stage, Turn, ASSISTANT_IDS, IMAGE_TAG};
use crate::shards::reject::Reason;

/// The Q/A pairs upstream keeps for `stage`.
pub fn select_pairs(
    stage: Stage,
    turns: &[Turn],
) -> std::result::Result<Vec<(&str, &str)>, super::Rejected> {
    if turns.is_empty() {
        return Err((Reason::NoConversations, "conversations is empty".into()));
    }
    if !turns.len().is_multiple_of(2) {
        return Err((
            Reason::MalformedConversation,
            format!("{} turns: expected human/gpt pairs", turns.len()),
        ));
    }
    let mut pairs = Vec::new();
    for (i, pair) in turns.chunks(2).enumerate() {
        if pair[0].from != "human" || pair[1].from != "gpt" {
            return Err((
                Reason::MalformedConversation,
                format!(
                    "pair {i} is from {:?}/{:?}, expected \"human\"/\"gpt\"",
                    pair[0].from, pair[1].from
                ),
            ));
        }
        pairs.push((pair[0].value.as_str(), pair[1].value.as_str()));
    }
    let kept: Vec<_> = match stage {
        // Upstream drops pretrain pairs whose answer is empty.
        Stage::Pretrain => pairs.into_iter().filter(|(_, a)| !a.is_empty()).collect(),
        // Upstream crashes on an empty first answer; we reject it.
        Stage::Sft | Stage::SftMulti => pairs
            .into_iter()
            .take(1)
            .filter(|(_, a)| !a.is_empty())
            .collect(),
    };
    if kept.is_empty() {
        return Err((
            Reason::EmptyAnswer,
            "no pair with a non-empty answer".into(),
        ));
    }
    Ok(kept)
}

/// The chat-template text of the kept pairs, with `<image>` already replaced.
pub fn render(pairs: &[(&str, &str)]) -> String {
    let ph = placeholder_text();
    let mut text = String::new();
    for (q, a) in pairs {
        let q = q.replace(IMAGE_TAG, &ph);
        text.push_str(&format!("<s>user\n{q}</s>\n<s>assistant\n{a}</s>\n"));
    }
    text
}

/// Where the trained answer starts: just after the last `<s>assistant` (upstream's rule).
pub fn answer_start(ids: &[u32]) -> Option<usize> {
    ids.windows(ASSISTANT_IDS.len())
        .rposition(|w| w == ASSISTANT_IDS)
        .map(|p| p + ASSISTANT_IDS.len())
}

/// 1 from `start` through the last token, 0 before.
pub fn loss_mask(len: usize, start: usize) -> Vec<u8> {
    (0..len).map(|i| u8::from(i >= start)).collect()
}

/// The chat prompt upstream's model was trained on, with images placed by `<image>` tags or, if
/// the question has none, one placeholder per image prepended.
pub fn chat_prompt(question: &str, n_images: usize) -> String {
    let tagged = question.matches(IMAGE_TAG).count();
    let q = if tagged == 0 && n_images > 0 {
        format!("{}{question}", format!("{IMAGE_TAG}\n").repeat(n_images))
    } else {
        question.to_string()
    };
    render_placeholders(&format!("<s>user\n{q}</s>\n<s>assistant\n"))
}

/// Replace each `<image>` tag with the 50-token placeholder text the features are spliced into.
pub fn render_placeholders(text: &str) -> String {
    text.replace(IMAGE_TAG, &placeholder_text())
}
