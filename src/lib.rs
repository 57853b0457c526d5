//! minimind-v: train MiniMind-V (a tiny vision-language model) fast by doing the frozen work once.
//!
//! Stages, each a module reading the previous stage's files:
//! `ingest` (JSON + zip → CLIP features + tokens → Parquet shards) → `shards` (schema, reader) →
//! `inspect` (Polars view of shards). `synth` makes an upstream-format dataset for tests and demos.

pub mod bench;
pub mod compare;
pub mod config;
pub mod demo;
pub mod demo_eval;
pub mod device;
pub mod error;
pub mod generate;
pub mod ingest;
pub mod inspect;
pub mod model;
pub mod serve;
pub mod shards;
pub mod synth;
pub mod train;
pub mod util;

pub use error::{Error, Result};
