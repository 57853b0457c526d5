//! Reads image bytes straight out of upstream's zip (no unzip to disk) or from a directory.
//! Reading is sequential and cheap; decoding happens in parallel elsewhere.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{bad_file, IoContext, Result};
use crate::shards::reject::Reason;

pub enum ImageSource {
    Zip {
        path: PathBuf,
        archive: zip::ZipArchive<BufReader<File>>,
        /// Entry name → index, plus the file name alone where unique, so `a.jpg` finds
        /// `pretrain_images/a.jpg`.
        index: HashMap<String, usize>,
    },
    Dir(PathBuf),
}

impl ImageSource {
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let file = File::open(path).map_err(|e| {
            bad_file(path, format!("{e}\nHINT: `images` must be upstream's zip (e.g. dataset/pretrain_images.zip) or a directory of images"))
        })?;
        let archive = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| bad_file(path, format!("not a readable zip: {e}")))?;
        let mut index = HashMap::new();
        let mut by_base: HashMap<String, Option<usize>> = HashMap::new();
        for i in 0..archive.len() {
            let Some(Ok(name)) = archive.name_for_index(i) else {
                continue;
            };
            let name = name.to_string();
            if name.ends_with('/') {
                continue;
            }
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
        Ok(Self::Zip {
            path: path.to_path_buf(),
            archive,
            index,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Zip { path, .. } => format!("zip {}", path.display()),
            Self::Dir(p) => format!("directory {}", p.display()),
        }
    }

    /// The raw bytes of one image, or why there are none.
    pub fn read(&mut self, name: &str) -> std::result::Result<Vec<u8>, (Reason, String)> {
        let bytes = match self {
            Self::Dir(dir) => {
                let path = dir.join(name);
                std::fs::read(&path)
                    .map_err(|e| (Reason::MissingImage, format!("{}: {e}", path.display())))?
            }
            Self::Zip {
                path,
                archive,
                index,
            } => {
                let Some(&i) = index.get(name) else {
                    return Err((
                        Reason::MissingImage,
                        format!("{name} is not in {}", path.display()),
                    ));
                };
                let mut entry = archive
                    .by_index(i)
                    .map_err(|e| (Reason::CorruptImage, format!("zip entry {name}: {e}")))?;
                let mut bytes = Vec::with_capacity(entry.size() as usize);
                entry
                    .read_to_end(&mut bytes)
                    .map_err(|e| (Reason::CorruptImage, format!("zip entry {name}: {e}")))?;
                bytes
            }
        };
        if bytes.is_empty() {
            return Err((Reason::EmptyImage, format!("{name} has zero bytes")));
        }
        Ok(bytes)
    }
}

/// Check an images path exists before a long run starts.
pub fn check_exists(path: &Path) -> Result<()> {
    std::fs::metadata(path).at(path).map(|_| ())
}
