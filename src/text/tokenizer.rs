//! The MiniMind tokenizer with upstream's sample-building rules: conversation → token ids + loss
//! mask, exactly as upstream builds them, with upstream's failure modes turned into corrections or
//! typed rejects.

use std::path::Path;

use tokenizers::Tokenizer;

use super::template::{render, select_pairs};
use super::{
    placeholder_ids, placeholder_starts, placeholder_text, Stage, Turn, ASSISTANT_IDS, IMAGE_TAG,
    MAX_TOKEN_BYTES,
};
use crate::error::{bad_file, Result};
use crate::shards::reject::Reason;

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

/// The most text bytes a sample may hold before it is tokenised: four times what `max_seq_len`
/// tokens can hold. Records this long are far beyond upstream's data (its longest are a few KB);
/// they are `text_too_long` rejects.
pub fn max_text_bytes(max_seq_len: usize) -> usize {
    4 * max_seq_len * MAX_TOKEN_BYTES
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
        Self::from_bytes(&bytes).map_err(|e| bad_file(&file, e))
    }

    /// Upstream's MiniMind tokenizer (`assets/tokenizer/tokenizer.json`), built into the program so
    /// that `chat` and `serve` work from any directory.
    pub fn builtin() -> Self {
        Self::from_bytes(include_bytes!("../../assets/tokenizer/tokenizer.json"))
            .expect("the built-in tokenizer parses")
    }

    /// A `tokenizer.json`'s bytes, and their sha256.
    fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        Ok(Self {
            tokenizer: Tokenizer::from_bytes(bytes).map_err(|e| e.to_string())?,
            sha256: crate::util::sha256_hex(bytes),
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
        // Tokenising megabytes costs memory and time (and a parallel planner multiplies it), and
        // anything past max_seq_len tokens is cut anyway: a text this much longer than the
        // model can read is refused by its byte length, before it is tokenised.
        let bytes: usize = pairs.iter().map(|(q, a)| q.len() + a.len()).sum();
        let cap = max_text_bytes(max_seq_len);
        if bytes > cap {
            return Err((
                Reason::TextTooLong,
                format!("{bytes} bytes of text, over {cap} (4 × max_seq_len tokens of at most {MAX_TOKEN_BYTES} bytes)"),
            ));
        }
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
