//! Small shared helpers: hashing and atomic file writes.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

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

/// Write `path` so that readers see either the old file or the whole new one. On any failure
/// (a full disk, say) the temporary file is removed and the error names the file.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let tmp = tmp_path(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp).at(&tmp)?;
        write(&mut file).map_err(|e| naming(e, path))?;
        file.flush().at(&tmp)?;
        file.sync_all().at(&tmp)?;
        drop(file);
        std::fs::rename(&tmp, path).at(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `e`, naming `path` if it does not name a file already.
pub fn naming(e: Error, path: &Path) -> Error {
    match e {
        Error::Io { .. } | Error::BadFile { .. } => e,
        other => Error::BadFile {
            path: path.to_path_buf(),
            msg: format!("writing: {other}"),
        },
    }
}

pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |f| f.write_all(bytes).at(path))
}

/// Remove leftovers (files or directories, `name.tmp-PID`) of writers that were killed
/// mid-write: those whose process is no longer running on this machine. A live writer's
/// temporary file (another worker of the same ingest, say) is left alone.
pub fn remove_stale_tmp(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    if !dir.exists() {
        return Ok(0);
    }
    for entry in std::fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((_, pid)) = name.rsplit_once(".tmp-") else {
            continue;
        };
        if pid.parse::<u32>().is_ok_and(pid_alive) {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path).at(&path)?;
        } else {
            std::fs::remove_file(&path).at(&path)?;
        }
        removed += 1;
    }
    Ok(removed)
}

/// Whether a process `pid` runs on this machine (Linux: `/proc/<pid>`).
pub fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this machine".into())
}

/// A lock file saying which process holds a piece of work (`pid host unix-seconds`). Taking it is
/// atomic (`create_new`); a lock whose process is gone from this machine is taken over; it is
/// removed when dropped.
#[derive(Debug)]
pub struct LockFile {
    path: PathBuf,
}

impl LockFile {
    /// Take `path`; `what` names the work in the refusal ("an ingest of shards 0 mod 1").
    pub fn acquire(path: &Path, what: &str) -> Result<Self> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let me = format!("{} {} {now}\n", std::process::id(), hostname());
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut f) => {
                    f.write_all(me.as_bytes()).at(path)?;
                    return Ok(Self {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(path).unwrap_or_default();
                    let mut parts = holder.split_whitespace();
                    let (pid, host, since) = (parts.next(), parts.next(), parts.next());
                    let pid: Option<u32> = pid.and_then(|p| p.parse().ok());
                    let here = host == Some(hostname().as_str());
                    if here && !pid.is_some_and(pid_alive) {
                        // Its process is gone: a leftover of a killed run.
                        let _ = std::fs::remove_file(path);
                        continue;
                    }
                    let age = since
                        .and_then(|s| s.parse::<u64>().ok())
                        .map_or(String::new(), |s| {
                            format!(", for {} s", now.saturating_sub(s))
                        });
                    return Err(Error::Config(format!(
                        "{what} is already running: process {} on {}{age} holds {}\nHINT: wait for it to finish, or stop it; if no such process is running, delete the lock file",
                        pid.map_or("?".into(), |p| p.to_string()),
                        host.unwrap_or("?"),
                        path.display()
                    )));
                }
                Err(e) => return Err(e).at(path),
            }
        }
        Err(Error::Config(format!(
            "{}: could not take the lock",
            path.display()
        )))
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Run `f` on a thread of rayon's global pool, the caller waiting, unless this thread is one
/// already. CPU tensor code called from outside the pool hands each parallel operation to a
/// sleeping pool thread and sleeps until it is done; thousands of small operations (a training
/// step, a generated token) paid that hand-off every time. On a pool thread they start where
/// they are. `f` must not wait for other threads that need the pool (it would hold a thread of
/// it while waiting).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off the pool `on_pool` moves to one of its threads; on it, it stays where it is.
    #[test]
    fn on_pool_runs_on_a_pool_thread_and_nests_in_place() {
        assert_eq!(rayon::current_thread_index(), None);
        let here = std::thread::current().id();
        let (outer, inner, thread) = on_pool(|| {
            let outer = rayon::current_thread_index();
            let inner = on_pool(|| (rayon::current_thread_index(), std::thread::current().id()));
            (outer, inner.0, inner.1)
        });
        assert!(outer.is_some());
        assert_eq!(inner, outer);
        assert_ne!(thread, here);
    }

    /// A full disk (here `/dev/full` behind the temporary name): the error names the file, and
    /// neither a temporary file nor a half-written one is left.
    #[test]
    fn a_lock_is_refused_while_held_and_taken_over_from_a_process_that_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".ingest.lock");
        let held = LockFile::acquire(&path, "an ingest").unwrap();
        let err = LockFile::acquire(&path, "an ingest")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("an ingest is already running")
                && err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(held);
        assert!(!path.exists());
        // Left by a process that is gone (pid 2^22 + 1 is above Linux's pid_max).
        std::fs::write(&path, format!("4194305 {} 0\n", hostname())).unwrap();
        let _taken = LockFile::acquire(&path, "an ingest").unwrap();
        // Held on another machine: refused (its process cannot be checked from here).
        drop(_taken);
        std::fs::write(&path, "1 elsewhere 0\n").unwrap();
        assert!(LockFile::acquire(&path, "an ingest").is_err());
    }

    #[test]
    fn a_failed_atomic_write_names_the_file_and_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("manifest.json");
        std::os::unix::fs::symlink("/dev/full", tmp_path(&path)).unwrap();
        let err = write_bytes_atomic(&path, &[7u8; 1 << 16])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("manifest.json") && err.contains("No space left"),
            "{err}"
        );
        assert!(!path.exists());
        assert!(
            std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
            "left behind"
        );
    }
}
