//! Conversation → token ids + loss mask, exactly as upstream MiniMind-V v1 builds them, with
//! upstream's failure modes turned into corrections or typed rejects.
//!
//! Upstream: `<image>` becomes `'<'*25 + '>'*25`; the template is
//! `<s>user\n{q}</s>\n<s>assistant\n{a}</s>\n` per kept pair; the loss mask is 1 from just after
//! the last `<s>assistant` through the last token. Pretrain keeps every pair with an answer, SFT
//! keeps the first pair only.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{bad_file, Result};
use crate::ingest::reject::Reason;

pub const IMAGE_TAG: &str = "<image>";
/// Tokens one image occupies in the text: 25 × `<` (id 30) then 25 × `>` (id 32).
pub const PLACEHOLDER_LEN: usize = 50;
pub const PLACEHOLDER_OPEN_ID: u32 = 30;
pub const PLACEHOLDER_CLOSE_ID: u32 = 32;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
/// `<s>assistant` tokenized in context.
pub const ASSISTANT_IDS: [u32; 4] = [1, 1078, 538, 501];

pub fn placeholder_text() -> String {
    format!("{}{}", "<".repeat(25), ">".repeat(25))
}

pub fn placeholder_ids() -> Vec<u32> {
    let mut ids = vec![PLACEHOLDER_OPEN_ID; 25];
    ids.extend([PLACEHOLDER_CLOSE_ID; 25]);
    ids
}

/// Which of upstream's three data sets a record comes from; decides which Q/A pairs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Pretrain,
    Sft,
    SftMulti,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pretrain => "pretrain",
            Stage::Sft => "sft",
            Stage::SftMulti => "sft_multi",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

/// One tokenized training sample: unpadded ids and the unshifted per-token loss mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    /// The text had to be tokenized around the placeholders because upstream's tokenization
    /// merged one (a space before `<image>` gives `' <'`, id 3386).
    pub repaired: bool,
}

/// A typed reason plus detail, before it is attached to a record.
pub type Rejected = (Reason, String);

/// The Q/A pairs upstream keeps for `stage`.
pub fn select_pairs(
    stage: Stage,
    turns: &[Turn],
) -> std::result::Result<Vec<(&str, &str)>, Rejected> {
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

/// Start positions of complete placeholder windows in `ids`.
pub fn placeholder_starts(ids: &[u32]) -> Vec<usize> {
    find_windows(ids, &placeholder_ids())
}

/// Start positions of complete, non-overlapping occurrences of `window` in `ids`, left to right.
pub fn find_windows(ids: &[u32], window: &[u32]) -> Vec<usize> {
    let n = window.len();
    let mut starts = Vec::new();
    let mut i = 0;
    while n > 0 && i + n <= ids.len() {
        if &ids[i..i + n] == window {
            starts.push(i);
            i += n;
        } else {
            i += 1;
        }
    }
    starts
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

/// The MiniMind tokenizer plus the rules above.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    /// sha256 of `tokenizer.json`, recorded in shard metadata.
    pub sha256: String,
}

impl ChatTokenizer {
    /// Load `tokenizer.json` from a directory (or the file itself).
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| {
            bad_file(
                &file,
                format!(
                    "{e}\nHINT: the MiniMind tokenizer ships in the repo under assets/tokenizer/"
                ),
            )
        })?;
        let tokenizer =
            Tokenizer::from_bytes(&bytes).map_err(|e| bad_file(&file, e.to_string()))?;
        Ok(Self {
            tokenizer,
            sha256: crate::util::sha256_hex(&bytes),
        })
    }

    /// Upstream's tokenization of a full text (no special tokens added: the template has them).
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }

    /// Tokenize with every placeholder as its own piece, so no neighbouring text can merge with it.
    fn encode_around_placeholders(&self, text: &str) -> Vec<u32> {
        let ph = placeholder_text();
        let mut ids = Vec::new();
        for (i, piece) in text.split(ph.as_str()).enumerate() {
            if i > 0 {
                ids.extend(placeholder_ids());
            }
            if !piece.is_empty() {
                ids.extend(self.encode_text(piece));
            }
        }
        ids
    }

    /// Build one training sample, or say why it cannot be one.
    pub fn encode_sample(
        &self,
        stage: Stage,
        turns: &[Turn],
        n_images: usize,
        max_seq_len: usize,
    ) -> std::result::Result<Encoded, Rejected> {
        let pairs = select_pairs(stage, turns)?;
        let tags: usize = pairs
            .iter()
            .map(|(q, _)| q.matches(IMAGE_TAG).count())
            .sum();
        if tags != n_images {
            return Err((
                Reason::ImageTagMismatch,
                format!("{tags} <image> tags in the kept questions, {n_images} images"),
            ));
        }
        let text = render(&pairs);
        let mut ids = self.encode_text(&text);
        let mut repaired = false;
        if placeholder_starts(&ids).len() != n_images {
            ids = self.encode_around_placeholders(&text);
            repaired = true;
            if placeholder_starts(&ids).len() != n_images {
                return Err((
                    Reason::ImageTagMismatch,
                    "placeholder not found after tokenization".into(),
                ));
            }
        }
        let Some(assistant) = ids
            .windows(ASSISTANT_IDS.len())
            .rposition(|w| w == ASSISTANT_IDS)
        else {
            return Err((
                Reason::MalformedConversation,
                "no <s>assistant in the tokenized text".into(),
            ));
        };
        let answer_start = assistant + ASSISTANT_IDS.len();
        let full_len = ids.len();
        ids.truncate(max_seq_len);
        if placeholder_starts(&ids).len() != n_images {
            return Err((
                Reason::PlaceholderTruncated,
                format!("{full_len} tokens truncated to {max_seq_len} cut an image placeholder"),
            ));
        }
        if answer_start >= ids.len() {
            // Upstream would fall back to an earlier `<s>assistant` or none and train the prompt.
            return Err((
                Reason::AnswerTruncated,
                format!("{full_len} tokens truncated to {max_seq_len} leave no answer token"),
            ));
        }
        let mut loss_mask = vec![0u8; ids.len()];
        loss_mask[answer_start..].fill(1);
        Ok(Encoded {
            input_ids: ids,
            loss_mask,
            repaired,
        })
    }
}
