//! Rows → one Parquet shard file, written atomically (temp file + rename).

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, ListBuilder, StringBuilder};
use arrow_array::{
    ArrayRef, ListArray, RecordBatch, StringArray, StructArray, UInt16Array, UInt8Array,
};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::error::Result;
use crate::shards::{sample_fields, schema, ShardMeta, ShardRow};

/// Rows per Parquet row group: ~10 MB of features, the unit the trainer streams.
pub const ROW_GROUP_ROWS: usize = 128;

fn item(dt: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", dt, false))
}

fn list(
    dt: DataType,
    lengths: impl IntoIterator<Item = usize>,
    values: ArrayRef,
) -> Result<ListArray> {
    Ok(ListArray::try_new(
        item(dt),
        OffsetBuffer::from_lengths(lengths),
        values,
        None,
    )?)
}

/// Build the Arrow batch of shard schema v1.
pub fn to_record_batch(rows: &[ShardRow]) -> Result<RecordBatch> {
    let schema = Arc::new(schema());
    let image_key = StringArray::from_iter_values(rows.iter().map(|r| r.image_key.as_str()));

    let mut images = ListBuilder::new(StringBuilder::new()).with_field(item(DataType::Utf8));
    let mut features = ListBuilder::new(BinaryBuilder::new()).with_field(item(DataType::Binary));
    for r in rows {
        for name in &r.images {
            images.values().append_value(name);
        }
        images.append(true);
        for f in &r.features {
            features.values().append_value(f);
        }
        features.append(true);
    }

    let samples: Vec<_> = rows.iter().flat_map(|r| &r.samples).collect();
    let ids = StringArray::from_iter_values(samples.iter().map(|s| s.id.as_str()));
    let tokens =
        UInt16Array::from_iter_values(samples.iter().flat_map(|s| s.input_ids.iter().copied()));
    let input_ids = list(
        DataType::UInt16,
        samples.iter().map(|s| s.input_ids.len()),
        Arc::new(tokens),
    )?;
    let mask =
        UInt8Array::from_iter_values(samples.iter().flat_map(|s| s.loss_mask.iter().copied()));
    let loss_mask = list(
        DataType::UInt8,
        samples.iter().map(|s| s.loss_mask.len()),
        Arc::new(mask),
    )?;
    let structs = StructArray::try_new(
        sample_fields(),
        vec![Arc::new(ids), Arc::new(input_ids), Arc::new(loss_mask)],
        None,
    )?;
    let samples = list(
        DataType::Struct(sample_fields()),
        rows.iter().map(|r| r.samples.len()),
        Arc::new(structs),
    )?;

    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(image_key),
            Arc::new(images.finish()),
            Arc::new(features.finish()),
            Arc::new(samples),
        ],
    )?)
}

/// Write `rows` to `path` atomically; returns (bytes, sha256) of the file.
pub fn write_shard(path: &Path, rows: &[ShardRow], meta: &ShardMeta) -> Result<(u64, String)> {
    let batch = to_record_batch(rows)?;
    let kv = meta
        .to_kv()
        .into_iter()
        .map(|(k, v)| KeyValue::new(k, v))
        .collect();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        // Features are unique per row: dictionary pages would only cost time.
        .set_dictionary_enabled(false)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_key_value_metadata(Some(kv))
        .build();
    crate::util::write_atomic(path, |file| {
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))?;
        writer.write(&batch)?;
        writer.close()?;
        Ok(())
    })?;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok((bytes, crate::util::sha256_file(path)?))
}
