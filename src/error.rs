//! Typed errors of the library. Each variant names the file or value at fault and, where
//! there is one, the fix (`HINT:`), so the binary can print it as is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    #[error(
        "CLIP vision tower not found at {path}\nHINT: put the HF `clip-vit-base-patch32` directory \
         (config.json + model.safetensors or pytorch_model.bin) there, point `clip` at it, or pass \
         `--clip random:<seed>` for a random-initialised tower (tests and demos only)"
    )]
    ClipMissing { path: PathBuf },
    #[error("{path}: shard schema_version {found:?} is not supported (this build reads {supported})\nHINT: re-run `minimind-v ingest` with this version to rebuild the shards")]
    SchemaVersion {
        path: PathBuf,
        found: Option<String>,
        supported: &'static str,
    },
    #[error("config: {0}")]
    Config(String),
    /// Input data that is wrong or inconsistent (a dataset, shards, an ingest's own counts).
    #[error("data: {0}")]
    Data(String),
    /// Talking to another process failed: a port that cannot be bound, a rank that cannot be
    /// reached or that failed.
    #[error("network: {0}")]
    Network(String),
    /// Numbers that went wrong: a non-finite loss, a benchmark or check that missed.
    #[error("numerics: {0}")]
    Numerics(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attach a path to an I/O error.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}

pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
    Error::BadFile {
        path: path.into(),
        msg: msg.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind of failure says which kind it is first, so a user (and a script) can tell a
    /// bad setting from bad data, a numerical failure or a network one.
    #[test]
    fn errors_name_their_kind() {
        let cases = [
            (Error::Config("x".into()), "config: x"),
            (Error::Data("x".into()), "data: x"),
            (Error::Numerics("x".into()), "numerics: x"),
            (Error::Network("x".into()), "network: x"),
            (bad_file("/a/b.json", "x"), "/a/b.json: x"),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
        let io: Result<()> = Err(std::io::Error::other("disk full")).at("/out/x");
        assert_eq!(io.unwrap_err().to_string(), "/out/x: disk full");
    }
}
