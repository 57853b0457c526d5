//! Small shared helpers: hashing and atomic file writes.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).at(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).at(path)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The temporary name a file is written under before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Write `path` so that readers see either the old file or the whole new one.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let tmp = tmp_path(path);
    let mut file = std::fs::File::create(&tmp).at(&tmp)?;
    write(&mut file)?;
    file.flush().at(&tmp)?;
    file.sync_all().at(&tmp)?;
    drop(file);
    std::fs::rename(&tmp, path).at(path)?;
    Ok(())
}

pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |f| f.write_all(bytes).at(path))
}

/// Remove leftovers (files or directories) of writers that were killed mid-write.
pub fn remove_stale_tmp(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    if !dir.exists() {
        return Ok(0);
    }
    for entry in std::fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".tmp-"))
        {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).at(&path)?;
            } else {
                std::fs::remove_file(&path).at(&path)?;
            }
            removed += 1;
        }
    }
    Ok(removed)
}
