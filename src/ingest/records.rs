//! Upstream's dataset JSON (`[{"id", "image", "conversations": [{"from","value"}, …]}, …]`) →
//! typed records. A malformed element becomes a reject, never a failed run. A record without
//! `image` whose text has no `<image>` is a text-only sample (no image features).

use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{bad_file, Result};
use crate::shards::reject::{Reason, Reject};
use crate::text::Turn;

#[derive(Debug, Clone)]
pub struct Record {
    /// Position in the source JSON array.
    pub index: usize,
    pub id: String,
    /// The `image` field as written in the JSON (the shard's `image_key`); empty for text only.
    pub image_key: String,
    /// Image paths inside the zip or directory, prefix applied, in order; none for text only.
    pub images: Vec<String>,
    pub turns: Vec<Turn>,
}

#[derive(Deserialize)]
struct RawRecord {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    conversations: Option<Vec<Turn>>,
}

/// How image names in the JSON map to files.
#[derive(Debug, Clone)]
pub struct ImageNaming {
    /// Prepended to every name (`COCO_train2014_` for upstream's SFT set).
    pub prefix: String,
    pub max_images: usize,
}

impl ImageNaming {
    /// Upstream splits multi-image fields on `", "`.
    pub fn split(&self, field: &str) -> Vec<String> {
        field
            .split(", ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| format!("{}{}", self.prefix, s))
            .collect()
    }
}

/// Parse the whole JSON array (`bytes` of the file at `path`); good records and rejects, in
/// source order.
pub fn parse_records(
    path: &Path,
    bytes: &[u8],
    naming: &ImageNaming,
) -> Result<(Vec<Record>, Vec<Reject>)> {
    let elements: Vec<&RawValue> = serde_json::from_slice(bytes)
        .map_err(|e| bad_file(path, format!("not a JSON array of records: {e}")))?;
    let mut records = Vec::with_capacity(elements.len());
    let mut rejects = Vec::new();
    for (index, raw) in elements.into_iter().enumerate() {
        match parse_record(index, raw, naming) {
            Ok(r) => records.push(r),
            Err(r) => rejects.push(r),
        }
    }
    Ok((records, rejects))
}

fn parse_record(
    index: usize,
    raw: &RawValue,
    naming: &ImageNaming,
) -> std::result::Result<Record, Reject> {
    let rec: RawRecord = serde_json::from_str(raw.get()).map_err(|e| Reject {
        reason: Reason::MalformedRecord,
        record: index,
        ids: vec![index.to_string()],
        image: String::new(),
        detail: e.to_string(),
    })?;
    let id = match rec.id {
        Some(serde_json::Value::String(s)) => s,
        Some(v) if !v.is_null() => v.to_string(),
        _ => index.to_string(),
    };
    make_record(
        index,
        id,
        rec.image,
        rec.conversations.unwrap_or_default(),
        naming,
    )
}

/// A record from its fields, whatever the input format: `image` is v1's field (names joined by
/// `", "`), absent for a text-only record.
pub fn make_record(
    index: usize,
    id: String,
    image: Option<String>,
    turns: Vec<Turn>,
    naming: &ImageNaming,
) -> std::result::Result<Record, Reject> {
    let reject = |reason, id: String, image: String, detail: String| Reject {
        reason,
        record: index,
        ids: vec![id],
        image,
        detail,
    };
    let Some(image_key) = image else {
        // Text only: a sample without image features, unless its text expects an image.
        if turns
            .iter()
            .any(|t| t.value.contains(crate::text::IMAGE_TAG))
        {
            return Err(reject(
                Reason::NoImage,
                id,
                String::new(),
                "record has no image, but its text has <image>".into(),
            ));
        }
        if turns.is_empty() {
            let detail = "no conversations".into();
            return Err(reject(Reason::NoConversations, id, String::new(), detail));
        }
        return Ok(Record {
            index,
            id,
            image_key: String::new(),
            images: Vec::new(),
            turns,
        });
    };
    let images = naming.split(&image_key);
    if images.is_empty() {
        return Err(reject(
            Reason::NoImage,
            id,
            image_key,
            "\"image\" is empty".into(),
        ));
    }
    if images.len() > naming.max_images {
        let detail = format!(
            "{} images, at most {} allowed",
            images.len(),
            naming.max_images
        );
        return Err(reject(Reason::TooManyImages, id, image_key, detail));
    }
    if turns.is_empty() {
        return Err(reject(
            Reason::NoConversations,
            id,
            image_key,
            "no conversations".into(),
        ));
    }
    Ok(Record {
        index,
        id,
        image_key,
        images,
        turns,
    })
}
