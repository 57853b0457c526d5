//! Upstream's later dataset format: Parquet rows of `conversations` (a JSON text, or a list of
//! `{role, content}` structs) and `image_bytes` (one binary, or a list of them), the images
//! inside the rows. Reads a file or every `*.parquet` in a directory (in name order), row group by
//! row group, as records (for the plan, a window at a time) and as image bytes by row (for the
//! pipeline); `parquet_rows` reads the cells.
//!
//! The model is v1's, so the turns go into v1's template: `user` becomes v1's `human`, `assistant`
//! its `gpt`, and `system` turns are left out (v1's template has no system prompt). Optional
//! columns: `id` (else the row's position), and `image` — v1's image names, so that a dataset
//! converted from v1 keeps its names and makes the same shards. Without `image` an image is
//! named by its bytes (`sha256:` and the first 16 hex digits of their SHA-256), so that rows
//! holding the same image share a shard row and one CLIP pass.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use arrow_array::{Array, ArrayRef};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;

use super::parquet_rows::{binaries, check_schema, Columns, CONVERSATIONS, ID, IMAGE_BYTES, NAMES};
use super::records::{ImageNaming, Record};
use crate::error::{bad_file, IoContext, Result};
use crate::shards::reject::Reject;

/// Rows decoded at a time.
const BATCH_ROWS: usize = 256;

/// Whether `path` is Parquet: a file starting with Parquet's magic, or a directory holding
/// `*.parquet` files.
pub fn is_parquet(path: &Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(!list_files(path)?.is_empty());
    }
    let mut magic = [0u8; 4];
    let mut f = File::open(path).at(path)?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"PAR1")
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "parquet") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// One file of the input: where its rows begin among all the input's rows, and its row groups'
/// sizes.
#[derive(Debug, Clone)]
struct Part {
    path: PathBuf,
    first_row: usize,
    row_groups: Vec<usize>,
}

/// Consecutive row groups planned together: rows `first_row..first_row + rows` of the input.
#[derive(Debug, Clone)]
pub struct Window {
    pub first_row: usize,
    pub rows: usize,
    /// (file, row group in it, the group's first input row).
    groups: Vec<(usize, usize, usize)>,
}

/// The Parquet files of one input, their rows numbered across them in order.
#[derive(Debug, Clone)]
pub struct ParquetInput {
    parts: Vec<Part>,
    pub rows: usize,
    /// SHA-256 over each file's name, size and footer (row counts, column chunk offsets and
    /// statistics): the input's identity for the plan, without reading the images.
    pub identity: String,
}

impl ParquetInput {
    pub fn open(path: &Path) -> Result<Self> {
        let files = match path.is_dir() {
            true => list_files(path)?,
            false => vec![path.to_path_buf()],
        };
        if files.is_empty() {
            return Err(bad_file(path, "no *.parquet files in this directory"));
        }
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut parts = Vec::with_capacity(files.len());
        let mut rows = 0;
        for file in files {
            let builder = builder(&file)?;
            check_schema(&file, builder.schema())?;
            let row_groups: Vec<usize> = builder
                .metadata()
                .row_groups()
                .iter()
                .map(|g| g.num_rows() as usize)
                .collect();
            h.update(file.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(footer(&file)?);
            parts.push(Part {
                path: file,
                first_row: rows,
                row_groups: row_groups.clone(),
            });
            rows += row_groups.iter().sum::<usize>();
        }
        Ok(Self {
            parts,
            rows,
            identity: hex::encode(h.finalize()),
        })
    }

    /// The input cut at row-group boundaries into windows of at least `rows` rows (the last may
    /// hold fewer).
    pub fn windows(&self, rows: usize) -> Vec<Window> {
        let mut windows: Vec<Window> = Vec::new();
        let mut row = 0;
        for (p, part) in self.parts.iter().enumerate() {
            for (g, &n) in part.row_groups.iter().enumerate() {
                match windows.last_mut() {
                    Some(w) if w.rows < rows => {
                        w.rows += n;
                        w.groups.push((p, g, row));
                    }
                    _ => windows.push(Window {
                        first_row: row,
                        rows: n,
                        groups: vec![(p, g, row)],
                    }),
                }
                row += n;
            }
        }
        windows
    }

    /// The rows of `window` as records, or rejects, in row order; `system` turns left out are
    /// counted.
    pub fn records(
        &self,
        window: &Window,
        naming: &ImageNaming,
    ) -> Result<(Vec<Record>, Vec<Reject>, usize)> {
        let (mut records, mut rejects, mut system) = (Vec::new(), Vec::new(), 0);
        for &(p, g, first_row) in &window.groups {
            let part = &self.parts[p];
            let reader = batches(
                &part.path,
                &[CONVERSATIONS, IMAGE_BYTES, ID, NAMES],
                Some(g),
            )?;
            let mut row = first_row;
            for batch in reader {
                let batch = batch.map_err(|e| bad_file(&part.path, e.to_string()))?;
                let cols = Columns::of(&batch);
                for i in 0..batch.num_rows() {
                    match cols.record(row, i, naming) {
                        Ok((r, s)) => {
                            records.push(r);
                            system += s;
                        }
                        Err(r) => rejects.push(r),
                    }
                    row += 1;
                }
            }
        }
        Ok((records, rejects, system))
    }
}

/// The images of rows, read forward through the files: the pipeline asks for rows in rising
/// order (a shard's rows, then the next shard's), so one reader per row group serves them.
pub struct RowImages {
    input: ParquetInput,
    cursor: Option<Cursor>,
}

struct Cursor {
    part: usize,
    group: usize,
    reader: ParquetRecordBatchReader,
    /// The batch read last, and the input row its first row is.
    batch: Option<(ArrayRef, usize)>,
    next_row: usize,
}

impl RowImages {
    pub fn new(input: ParquetInput) -> Self {
        Self {
            input,
            cursor: None,
        }
    }

    pub fn describe(&self) -> String {
        let first = &self.input.parts[0].path;
        format!("Parquet {} ({} rows)", first.display(), self.input.rows)
    }

    /// The images of input row `row`, in order.
    pub fn read(&mut self, row: usize) -> std::result::Result<Vec<Vec<u8>>, String> {
        let (part, group, group_start) = self.locate(row)?;
        let reusable = self.cursor.as_ref().is_some_and(|c| {
            c.part == part
                && c.group == group
                && c.batch.as_ref().map_or(c.next_row, |b| b.1) <= row
        });
        if !reusable {
            let path = &self.input.parts[part].path;
            let reader = batches(path, &[IMAGE_BYTES], Some(group)).map_err(|e| e.to_string())?;
            self.cursor = Some(Cursor {
                part,
                group,
                reader,
                batch: None,
                next_row: group_start,
            });
        }
        let c = self.cursor.as_mut().expect("cursor");
        loop {
            if let Some((col, start)) = &c.batch {
                if row < start + col.len() {
                    return binaries(col, row - start).map(Option::unwrap_or_default);
                }
            }
            let batch = c
                .reader
                .next()
                .ok_or_else(|| format!("row {row} is past the end of its row group"))?
                .map_err(|e| e.to_string())?;
            let col = batch.column(0).clone();
            c.batch = Some((col, c.next_row));
            c.next_row += batch.num_rows();
        }
    }

    /// The file, row group, and that group's first input row holding `row`.
    fn locate(&self, row: usize) -> std::result::Result<(usize, usize, usize), String> {
        let part = self
            .input
            .parts
            .iter()
            .rposition(|p| p.first_row <= row)
            .ok_or_else(|| format!("no row {row}"))?;
        let mut start = self.input.parts[part].first_row;
        for (g, &n) in self.input.parts[part].row_groups.iter().enumerate() {
            if row < start + n {
                return Ok((part, g, start));
            }
            start += n;
        }
        Err(format!("no row {row} (the input has {})", self.input.rows))
    }
}

fn builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).at(path)?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad_file(path, format!("not a readable Parquet file: {e}")))
}

/// The columns `names` (those the file has) of `path`, one row group or all, in batches.
fn batches(path: &Path, names: &[&str], group: Option<usize>) -> Result<ParquetRecordBatchReader> {
    let builder = builder(path)?;
    let roots: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| names.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let mut builder = builder.with_projection(mask).with_batch_size(BATCH_ROWS);
    if let Some(g) = group {
        builder = builder.with_row_groups(vec![g]);
    }
    builder
        .build()
        .map_err(|e| bad_file(path, format!("cannot read its rows: {e}")))
}

/// The file's footer: its metadata, as written.
fn footer(path: &Path) -> Result<Vec<u8>> {
    let mut f = File::open(path).at(path)?;
    let len = f.metadata().at(path)?.len();
    let mut tail = [0u8; 8];
    f.seek(SeekFrom::End(-8)).at(path)?;
    f.read_exact(&mut tail).at(path)?;
    let n = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    if n + 8 > len {
        return Err(bad_file(path, "its footer length is past the file's start"));
    }
    let mut meta = vec![0u8; n as usize];
    f.seek(SeekFrom::End(-8 - n as i64)).at(path)?;
    f.read_exact(&mut meta).at(path)?;
    meta.extend_from_slice(&len.to_le_bytes());
    Ok(meta)
}
