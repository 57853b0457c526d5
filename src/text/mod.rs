//! Text: the pieces of upstream MiniMind-V v1's text side that every stage shares — the chat
//! template, the tokenizer, and the 50-token image placeholder whose windows the model splices
//! image features into. Ingest, the model, generation, serving and synth use it; it reads only
//! the tokenizer file and depends on nothing above `shards` (whose reject reasons it returns).
//!
//! Upstream: `<image>` becomes `'<'*25 + '>'*25`; the template is
//! `<s>user\n{q}</s>\n<s>assistant\n{a}</s>\n` per kept pair; the loss mask is 1 from just after
//! the last `<s>assistant` through the last token. Pretrain keeps every pair with an answer, SFT
//! keeps the first pair only.

pub mod template;
pub mod tokenizer;

use serde::{Deserialize, Serialize};

pub use template::{
    answer_start, chat_prompt, loss_mask, render, render_placeholders, select_pairs,
};
pub use tokenizer::{ChatTokenizer, Encoded, Rejected};

pub const IMAGE_TAG: &str = "<image>";
/// Tokens one image occupies in the text: 25 × `<` (id 30) then 25 × `>` (id 32).
pub const PLACEHOLDER_LEN: usize = 50;
pub const PLACEHOLDER_OPEN_ID: u32 = 30;
pub const PLACEHOLDER_CLOSE_ID: u32 = 32;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
/// Bytes of the longest token in the MiniMind vocabulary (`Ġrecommendations`): a text of more
/// than `n * MAX_TOKEN_BYTES` bytes is more than `n` tokens, so it can be refused before it is
/// tokenized.
pub const MAX_TOKEN_BYTES: usize = 16;
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
