//! Reads image bytes straight out of upstream's zip (no unzip to disk), from a directory, or from
//! the Parquet rows that carry them (upstream's later format).
//! Reading is sequential and cheap; decoding happens in parallel elsewhere.
//!
//! Datasets come from strangers, so a name resolves only inside the images root: a name with a
//! `..` component or an absolute path, a symlink that leads out of the directory, or anything that
//! is not a regular file (a FIFO would hang the read, `/dev/zero` never ends) is an `unsafe_path`
//! reject. Bytes are read through a bounded reader: a zip header's size claim is never trusted
//! for an allocation, and an entry that inflates past `max_bytes` is an `image_too_large` reject.
//! A directory is searched the way the zip is: by its path inside the root, or by its file name
//! alone where that is unique (upstream's unzipped layout keeps the images in a folder).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use super::parquet_input::{ParquetInput, RowImages};
use crate::config::{IngestConfig, InputFormat};
use crate::error::{bad_file, IoContext, Result};
use crate::shards::reject::Reason;

/// Names inside the images root, each with its entry's index.
type Names = Vec<(String, usize)>;

/// Why an image could not be read.
pub type Unreadable = (Reason, String);

pub struct ImageSource {
    root: PathBuf,
    kind: Kind,
    /// Name inside the root → entry, plus the file name alone where unique, so `a.jpg` finds
    /// `pretrain_images/a.jpg`.
    index: HashMap<String, usize>,
    max_bytes: u64,
}

enum Kind {
    Zip(Box<zip::ZipArchive<BufReader<File>>>),
    /// Parquet rows carrying their images (upstream's later format), read by row.
    Rows(Box<RowImages>),
    /// One per file found under the root.
    Dir(Vec<DirEntry>),
}

enum DirEntry {
    File(PathBuf),
    /// Found, but not to be read: why.
    Unsafe(String),
}

impl ImageSource {
    /// Where the images of `cfg`'s input are: the zip or directory of `images` for v1's JSON, the
    /// rows themselves for Parquet.
    pub fn for_input(cfg: &IngestConfig) -> Result<Self> {
        match super::input_format(cfg)? {
            InputFormat::Parquet => Ok(Self {
                root: cfg.input.clone(),
                kind: Kind::Rows(Box::new(RowImages::new(ParquetInput::open(&cfg.input)?))),
                index: HashMap::new(),
                max_bytes: cfg.image_limits.max_bytes,
            }),
            _ => Self::open(&cfg.images, cfg.image_limits.max_bytes),
        }
    }

    /// The zip or directory at `path`; images over `max_bytes` (as stored, or inflated) are
    /// refused.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self> {
        let (kind, names) = if path.is_dir() {
            let (entries, names) = walk(path)?;
            (Kind::Dir(entries), names)
        } else {
            let file = File::open(path).map_err(|e| {
                bad_file(path, format!("{e}\nHINT: `images` must be upstream's zip (e.g. dataset/pretrain_images.zip) or a directory of images"))
            })?;
            let archive = zip::ZipArchive::new(BufReader::new(file))
                .map_err(|e| bad_file(path, format!("not a readable zip: {e}")))?;
            let names = (0..archive.len())
                .filter_map(|i| Some((archive.name_for_index(i)?.ok()?.to_string(), i)))
                .filter(|(name, _)| !name.ends_with('/'))
                .collect();
            (Kind::Zip(Box::new(archive)), names)
        };
        Ok(Self {
            root: path.to_path_buf(),
            kind,
            index: index_names(names),
            max_bytes,
        })
    }

    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Zip(_) => format!("zip {}", self.root.display()),
            Kind::Dir(_) => format!("directory {}", self.root.display()),
            Kind::Rows(r) => r.describe(),
        }
    }

    /// The images `names` of the record at `record` (its row, where the rows hold the images).
    pub fn read_set(
        &mut self,
        record: usize,
        names: &[String],
    ) -> std::result::Result<Vec<Vec<u8>>, Unreadable> {
        let Kind::Rows(rows) = &mut self.kind else {
            return names.iter().map(|n| self.read(n)).collect();
        };
        let images = rows
            .read(record)
            .map_err(|e| (Reason::CorruptImage, format!("row {record}: {e}")))?;
        if images.len() != names.len() {
            let detail = format!(
                "row {record} holds {} images, not {}",
                images.len(),
                names.len()
            );
            return Err((Reason::MissingImage, detail));
        }
        for (bytes, name) in images.iter().zip(names) {
            if bytes.len() as u64 > self.max_bytes {
                return Err((
                    Reason::ImageTooLarge,
                    format!(
                        "{name}: {} bytes, over the limit of {} (max_image_bytes)",
                        bytes.len(),
                        self.max_bytes
                    ),
                ));
            }
            if bytes.is_empty() {
                return Err((Reason::EmptyImage, format!("{name} has zero bytes")));
            }
        }
        Ok(images)
    }

    /// The raw bytes of one image, or why there are none.
    pub fn read(&mut self, name: &str) -> std::result::Result<Vec<u8>, Unreadable> {
        check_name(name)?;
        let Some(&i) = self.index.get(name) else {
            return Err((
                Reason::MissingImage,
                format!("{name} is not in {}", self.describe()),
            ));
        };
        let max = self.max_bytes;
        let too_large = |n: u64| {
            (
                Reason::ImageTooLarge,
                format!("{name}: {n} bytes or more, over the limit of {max} (max_image_bytes)"),
            )
        };
        let bytes = match &mut self.kind {
            // Rows have no names to look up (`read_set` reads them by record).
            Kind::Rows(_) => return Err((Reason::MissingImage, format!("{name}: read by row"))),
            Kind::Dir(entries) => {
                let path = match &entries[i] {
                    DirEntry::File(p) => p,
                    DirEntry::Unsafe(why) => {
                        return Err((Reason::UnsafePath, format!("{name}: {why}")))
                    }
                };
                let unreadable =
                    |e: std::io::Error| (Reason::MissingImage, format!("{}: {e}", path.display()));
                let file = File::open(path).map_err(unreadable)?;
                let meta = file.metadata().map_err(unreadable)?;
                if !meta.is_file() {
                    return Err((Reason::UnsafePath, format!("{name}: not a regular file")));
                }
                if meta.len() > max {
                    return Err(too_large(meta.len()));
                }
                read_bounded(file, meta.len(), max).map_err(|e| match e {
                    Bounded::TooLarge => too_large(max + 1),
                    Bounded::Io(e) => unreadable(e),
                })?
            }
            Kind::Zip(archive) => {
                let entry = archive
                    .by_index(i)
                    .map_err(|e| (Reason::CorruptImage, format!("zip entry {name}: {e}")))?;
                // The header's size is a claim: refuse it when over the limit, but never
                // allocate from it.
                let claimed = entry.size();
                if claimed > max {
                    return Err(too_large(claimed));
                }
                read_bounded(entry, claimed, max).map_err(|e| match e {
                    Bounded::TooLarge => too_large(max + 1),
                    Bounded::Io(e) => (Reason::CorruptImage, format!("zip entry {name}: {e}")),
                })?
            }
        };
        if bytes.is_empty() {
            return Err((Reason::EmptyImage, format!("{name} has zero bytes")));
        }
        Ok(bytes)
    }
}

impl ImageSource {
    /// A fingerprint of the images `names` as the source holds them now, without reading their
    /// bytes: a zip entry's CRC-32 and sizes, a file's size and modification time. Names that
    /// cannot be found count as absent (a reject either way).
    pub fn fingerprint<'n>(&mut self, names: impl Iterator<Item = &'n str>) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for name in names {
            let i = self.index.get(name).copied();
            let line = match (&mut self.kind, i) {
                // The rows are part of the input, whose identity the plan holds.
                (Kind::Rows(_), _) => return String::new(),
                (_, None) => "absent".to_string(),
                (Kind::Zip(archive), Some(i)) => match archive.by_index_raw(i) {
                    Ok(e) => format!("{:08x} {} {}", e.crc32(), e.compressed_size(), e.size()),
                    Err(_) => "unreadable".into(),
                },
                (Kind::Dir(entries), Some(i)) => match &entries[i] {
                    DirEntry::File(p) => std::fs::metadata(p).map_or("unreadable".into(), |m| {
                        let t = m
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                        format!("{} {}", m.len(), t.map_or(0, |t| t.as_nanos()))
                    }),
                    DirEntry::Unsafe(_) => "unsafe".into(),
                },
            };
            h.update(name.as_bytes());
            h.update([0]);
            h.update(line.as_bytes());
            h.update([b'\n']);
        }
        hex::encode(h.finalize())
    }
}

enum Bounded {
    TooLarge,
    Io(std::io::Error),
}

/// All of `r`, but at most `max` bytes; the first allocation is `expected` capped at 1 MiB.
fn read_bounded(r: impl Read, expected: u64, max: u64) -> std::result::Result<Vec<u8>, Bounded> {
    let mut bytes = Vec::with_capacity(expected.min(1 << 20) as usize);
    r.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(Bounded::Io)?;
    if bytes.len() as u64 > max {
        return Err(Bounded::TooLarge);
    }
    Ok(bytes)
}

/// A name from the dataset must stay inside the images root: relative, without `..`.
fn check_name(name: &str) -> std::result::Result<(), Unreadable> {
    let path = Path::new(name);
    let escapes = path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if escapes || name.contains('\0') {
        return Err((
            Reason::UnsafePath,
            format!("{name:?}: image names must be relative and stay inside the images root (no '..', no absolute path)"),
        ));
    }
    Ok(())
}

/// Every name (path inside the root, `/`-separated) with its entry index, plus each file name
/// alone where it is unique.
fn index_names(names: Names) -> HashMap<String, usize> {
    let mut index = HashMap::with_capacity(names.len() * 2);
    let mut by_base: HashMap<String, Option<usize>> = HashMap::new();
    for (name, i) in names {
        let base = name.rsplit('/').next().unwrap_or(&name).to_string();
        by_base
            .entry(base)
            .and_modify(|v| *v = None)
            .or_insert(Some(i));
        index.insert(name, i);
    }
    for (base, i) in by_base {
        if let Some(i) = i {
            index.entry(base).or_insert(i);
        }
    }
    index
}

/// The files under `root`, recursively: regular files, and symlinks that resolve to a regular
/// file inside `root`. Other symlinks and special files are kept as unsafe entries (so that a
/// name pointing at one is an `unsafe_path` reject, not a missing image); symlinked directories
/// are not followed.
fn walk(root: &Path) -> Result<(Vec<DirEntry>, Names)> {
    let canonical_root = std::fs::canonicalize(root).at(root)?;
    let (mut entries, mut names) = (Vec::new(), Vec::new());
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).at(&dir)? {
            let e = e.at(&dir)?;
            let rel = rel.join(e.file_name());
            let path = e.path();
            let kind = e.file_type().at(&path)?;
            let entry = if kind.is_dir() {
                dirs.push(rel);
                continue;
            } else if kind.is_file() {
                DirEntry::File(path)
            } else if kind.is_symlink() {
                match std::fs::canonicalize(&path) {
                    Ok(target) if !target.starts_with(&canonical_root) => {
                        DirEntry::Unsafe(format!(
                            "a symlink to {} (outside the images directory)",
                            target.display()
                        ))
                    }
                    Ok(target) if target.is_file() => DirEntry::File(target),
                    Ok(_) => continue, // a symlinked directory inside the root: its files are walked
                    Err(e) => DirEntry::Unsafe(format!("a broken symlink ({e})")),
                }
            } else {
                DirEntry::Unsafe("not a regular file".into())
            };
            let Some(name) = rel.to_str() else { continue };
            names.push((name.replace(std::path::MAIN_SEPARATOR, "/"), entries.len()));
            entries.push(entry);
        }
    }
    names.sort();
    Ok((entries, names))
}

/// Check an images path exists before a long run starts.
pub fn check_exists(path: &Path) -> Result<()> {
    std::fs::metadata(path).at(path).map(|_| ())
}
