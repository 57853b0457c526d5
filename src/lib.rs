//! minimind-v: train MiniMind-V (a tiny vision-language model) fast by doing the frozen work once.
//!
//! Stages, each a module reading the previous stage's files:
//! `ingest` (JSON + zip, or Parquet rows → CLIP features + tokens → Parquet shards) → `train` (shards → checkpoint)
//! → `generate` and `serve` (checkpoint → answers, in a terminal or over HTTP); `inspect` shows
//! what shards hold (Polars).
//!
//! Shared pieces on the floor below the stages: `text` (chat template, tokenizer, placeholder
//! windows), `vision` (decode, resize, normalise, the frozen CLIP tower), `shards` (the shard
//! format, its manifest and rejects), `checkpoint` (the checkpoint directory), `model`
//! (MiniMind-V in candle), `config` (pipeline files), and under them `compare` (the NaN-strict
//! comparison every check uses), `device`, `error`, `progress` (bars and plain progress lines),
//! `util`.
//!
//! Beside them: `synth` (an upstream-format dataset for tests and the demo), `demo` and
//! `demo_eval` (the offline demo and its held-out scoring), `bench` (throughput, parity with the
//! CPU, where a step's time goes).

pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod demo;
pub mod demo_eval;
pub mod device;
pub mod error;
pub mod export;
pub mod generate;
pub mod ingest;
pub mod inspect;
pub mod model;
pub mod progress;
pub mod serve;
pub mod shards;
pub mod synth;
pub mod text;
pub mod train;
pub mod util;
pub mod vision;

pub use error::{Error, Result};
