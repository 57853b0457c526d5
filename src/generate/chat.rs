//! `minimind-v chat`: one answer for `--prompt`, or an interactive session that answers a question
//! per input line. The images' features are computed once for the session. A question the
//! session cannot answer (too long, `<image>` tags that do not match the images) is reported and
//! the session goes on; an answer cut short by the model's context length says so.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use candle_core::Tensor;

use super::{generate, image_features, Engine, Sampling, TextStream, MAX_IMAGES};
use crate::error::{Error, Result};
use crate::model::vlm::Images;
use crate::text::{chat_prompt, IMAGE_TAG, MAX_TOKEN_BYTES};

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The model ended it (`</s>`).
    End,
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The sequence reached the model's `max_seq_len`.
    MaxSeqLen,
}

/// A chat about a fixed set of images.
pub struct Session<'a> {
    engine: &'a Engine,
    feats: Option<Tensor>,
    n_images: usize,
    sampling: Sampling,
}

impl<'a> Session<'a> {
    pub fn new(engine: &'a Engine, images: &[PathBuf], sampling: Sampling) -> Result<Self> {
        sampling.validate().map_err(|(setting, msg)| {
            let flag = match setting {
                "top_p" => "--top-p",
                "repetition_penalty" => "--rp",
                "max_tokens" => "--max-new-tokens",
                _ => "--temperature",
            };
            Error::Config(format!("{flag}: {msg}"))
        })?;
        if images.len() > MAX_IMAGES {
            return Err(Error::Config(format!(
                "{} images given; the model was trained with at most {MAX_IMAGES}",
                images.len()
            )));
        }
        let feats = match &engine.tower {
            Some(tower) => image_features(tower, images)?,
            None if !images.is_empty() => {
                return Err(Error::Config(
                    "images given but no CLIP tower loaded (--clip none)".into(),
                ))
            }
            None => None,
        };
        Ok(Self {
            engine,
            feats,
            n_images: images.len(),
            sampling,
        })
    }

    /// Answer `question`, streaming the text to `out` as it is generated.
    pub fn answer(&self, question: &str, out: &mut impl Write) -> Result<Stop> {
        let (vlm, tok) = (&self.engine.vlm, &self.engine.tokenizer);
        let tags = question.matches(IMAGE_TAG).count();
        if tags > 0 && tags != self.n_images {
            return Err(Error::Config(format!(
                "the question has {tags} {IMAGE_TAG} tag(s) for {} image(s): give one tag per image, or none (the images then come first)",
                self.n_images
            )));
        }
        // Refused by its length in bytes before it is tokenized (a huge line costs memory and
        // time to tokenize): more than `limit` tokens' worth of bytes cannot fit.
        let limit = vlm.cfg.max_seq_len;
        if question.len() > limit * MAX_TOKEN_BYTES {
            return Err(Error::Config(format!(
                "the question is {} bytes, more than the model's max_seq_len of {limit} tokens can hold",
                question.len()
            )));
        }
        let ids = tok.encode_text(&chat_prompt(question, self.n_images));
        if ids.len() >= limit {
            return Err(Error::Config(format!(
                "the prompt is {} tokens; the model's max_seq_len is {limit}",
                ids.len()
            )));
        }
        let imgs = match &self.feats {
            Some(f) => Images::for_rows(&[&ids], std::slice::from_ref(f), &vlm.cfg.image_ids)?,
            None => None,
        };
        let mut stream = TextStream::new(tok);
        let generated = generate(vlm, &ids, imgs.as_ref(), &self.sampling, true, |t| {
            if let Some(piece) = stream.push(t) {
                let _ = write!(out, "{piece}");
                let _ = out.flush();
            }
            true
        })?;
        writeln!(out).map_err(|e| Error::Config(format!("writing the answer: {e}")))?;
        Ok(if ids.len() + generated.len() >= limit {
            Stop::MaxSeqLen
        } else if generated.len() >= self.sampling.max_new_tokens {
            Stop::MaxNewTokens
        } else {
            Stop::End
        })
    }

    /// Answer each non-empty line of `input`; problems and cut-short answers go to `notes`, and
    /// the session goes on until `input` ends.
    pub fn interactive(
        &self,
        input: impl BufRead,
        out: &mut impl Write,
        notes: &mut impl Write,
    ) -> Result<()> {
        let _ = writeln!(notes, "ask a question per line (Ctrl-D to quit)");
        for line in input.lines() {
            let line = line.map_err(|e| Error::Config(format!("reading the question: {e}")))?;
            let question = line.trim();
            if question.is_empty() {
                continue;
            }
            match self.answer(question, out) {
                Ok(stop) => {
                    if let Some(note) = stop.note(self.engine.vlm.cfg.max_seq_len) {
                        let _ = writeln!(notes, "{note}");
                    }
                }
                Err(e) => {
                    let _ = writeln!(notes, "error: {e}");
                }
            }
        }
        Ok(())
    }
}

impl Stop {
    /// What to tell the user about an answer that did not end by itself.
    pub fn note(self, max_seq_len: usize) -> Option<String> {
        match self {
            Stop::End => None,
            Stop::MaxNewTokens => {
                Some("[the answer was cut at --max-new-tokens; raise it for longer answers]".into())
            }
            Stop::MaxSeqLen => Some(format!(
                "[the answer was cut at the model's max_seq_len of {max_seq_len} tokens]"
            )),
        }
    }
}
