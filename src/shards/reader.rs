//! Read shards back: metadata checks first (version, feature shape), then rows streamed one
//! Parquet row group at a time so a shard set never has to fit in memory.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt8Type};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use crate::error::{bad_file, Error, IoContext, Result};
use crate::shards::{Sample, ShardMeta, ShardRow, SCHEMA_VERSION};

/// Shard files, sorted by name: the file itself, or in a directory the `shard-*.parquet` files
/// it holds — an ingest's `out` holds them in `data/` (older ones directly), and a `data/` or
/// `val/` directory can be named itself. The held-out split (`out/val/`) is not included.
pub fn list_shards(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = shards_in(path)?;
    let data = path.join(crate::shards::DATA_DIR);
    if data.is_dir() {
        files.extend(shards_in(&data)?);
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The held-out split an ingest made beside the shards in `path` (`[ingest] val_fraction`), if
/// any.
pub fn held_out_split(path: &Path) -> Result<Option<PathBuf>> {
    let val = path.join(crate::shards::VAL_DIR);
    Ok(match val.is_dir() && !shards_in(&val)?.is_empty() {
        true => Some(val),
        false => None,
    })
}

fn shards_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shard-") && n.ends_with(".parquet"))
        })
        .collect())
}

/// The key-value metadata of a shard, checked for a supported schema version.
pub fn read_meta(path: &Path) -> Result<ShardMeta> {
    let file = File::open(path).at(path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad_file(path, e.to_string()))?;
    meta_of(path, &builder)
}

fn meta_of<T>(
    path: &Path,
    builder: &parquet::arrow::arrow_reader::ArrowReaderBuilder<T>,
) -> Result<ShardMeta> {
    let kv: HashMap<String, String> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kvs| {
            kvs.iter()
                .filter_map(|kv| kv.value.clone().map(|v| (kv.key.clone(), v)))
                .collect()
        })
        .unwrap_or_default();
    let version = kv.get("schema_version").cloned();
    if version.as_deref() != Some(SCHEMA_VERSION) {
        return Err(Error::SchemaVersion {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    ShardMeta::from_kv(&kv).map_err(|e| bad_file(path, e))
}

/// Streams the rows of one shard, a row group at a time.
pub struct ShardReader {
    pub path: PathBuf,
    pub meta: ShardMeta,
    batches: ParquetRecordBatchReader,
    pending: std::vec::IntoIter<ShardRow>,
}

impl ShardReader {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).at(path)?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| bad_file(path, e.to_string()))?;
        let meta = meta_of(path, &builder)?;
        let batches = builder
            .with_batch_size(crate::shards::writer::ROW_GROUP_ROWS)
            .build()
            .map_err(|e| bad_file(path, e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            meta,
            batches,
            pending: Vec::new().into_iter(),
        })
    }
}

impl Iterator for ShardReader {
    type Item = Result<ShardRow>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.pending.next() {
                return Some(Ok(row));
            }
            let batch = match self.batches.next()? {
                Ok(b) => b,
                Err(e) => return Some(Err(bad_file(&self.path, e.to_string()))),
            };
            match rows_of(&batch, self.meta.feature_bytes()) {
                Ok(rows) => self.pending = rows.into_iter(),
                Err(e) => return Some(Err(bad_file(&self.path, e))),
            }
        }
    }
}

/// Read a whole shard (tests, inspection of small shards).
pub fn read_shard(path: &Path) -> Result<(ShardMeta, Vec<ShardRow>)> {
    let reader = ShardReader::open(path)?;
    let meta = reader.meta.clone();
    let rows = reader.collect::<Result<Vec<_>>>()?;
    Ok((meta, rows))
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> std::result::Result<&'a dyn Array, String> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| format!("column {name} missing"))
}

fn rows_of(
    batch: &RecordBatch,
    feature_bytes: usize,
) -> std::result::Result<Vec<ShardRow>, String> {
    let keys = column(batch, "image_key")?.as_string::<i32>();
    let images = column(batch, "images")?.as_list::<i32>();
    let features = column(batch, "features")?.as_list::<i32>();
    let samples = column(batch, "samples")?.as_list::<i32>();
    let mut rows = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let names = images.value(r);
        let names = names.as_string::<i32>();
        let feats = features.value(r);
        let feats = feats.as_binary::<i32>();
        let mut feature_vecs = Vec::with_capacity(feats.len());
        for f in feats.iter() {
            let f = f.ok_or("null feature")?;
            if f.len() != feature_bytes {
                return Err(format!(
                    "feature of {} bytes, metadata says {feature_bytes}",
                    f.len()
                ));
            }
            feature_vecs.push(f.to_vec());
        }
        let s = samples.value(r);
        let s = s.as_struct();
        let ids = s.column(0).as_string::<i32>();
        let input_ids = s.column(1).as_list::<i32>();
        let loss_mask = s.column(2).as_list::<i32>();
        let samples = (0..s.len())
            .map(|i| Sample {
                id: ids.value(i).to_string(),
                input_ids: input_ids
                    .value(i)
                    .as_primitive::<UInt16Type>()
                    .values()
                    .to_vec(),
                loss_mask: loss_mask
                    .value(i)
                    .as_primitive::<UInt8Type>()
                    .values()
                    .to_vec(),
            })
            .collect();
        rows.push(ShardRow {
            image_key: keys.value(r).to_string(),
            images: names
                .iter()
                .map(|n| n.unwrap_or_default().to_string())
                .collect(),
            features: feature_vecs,
            samples,
        });
    }
    Ok(rows)
}
