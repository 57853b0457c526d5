//! The cells of upstream's later Parquet format: each file's columns checked before a long run,
//! then each row read as a record — `conversations` (JSON text, or a list of `{role, content}`)
//! in v1's turns, `image_bytes` (one binary, or a list) as images, `id` and `image` (v1's names)
//! when present.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use serde::Deserialize;

use super::records::{make_record, ImageNaming, Record};
use crate::error::{bad_file, Result};
use crate::shards::reject::{Reason, Reject};
use crate::text::Turn;

pub const CONVERSATIONS: &str = "conversations";
pub const IMAGE_BYTES: &str = "image_bytes";
pub const ID: &str = "id";
pub const NAMES: &str = "image";

/// The columns a file must have, of types we read; anything else fails before a long run.
pub fn check_schema(path: &std::path::Path, schema: &arrow_schema::Schema) -> Result<()> {
    let hint = "HINT: upstream's later format has `conversations` (JSON text, or a list of {role, content}) and `image_bytes` (binary, or a list of binary); optional `id` and `image` (v1's image names)";
    let field = |name: &str| {
        schema
            .field_with_name(name)
            .ok()
            .map(|f| f.data_type().clone())
    };
    let fail = |what: String| Err(bad_file(path, format!("{what}\n{hint}")));
    match field(CONVERSATIONS) {
        None => return fail(format!("no `{CONVERSATIONS}` column")),
        Some(t) if is_text(&t) || turn_struct(&t).is_some() => {}
        Some(t) => return fail(format!("`{CONVERSATIONS}` is {t}")),
    }
    match field(IMAGE_BYTES) {
        None => return fail(format!("no `{IMAGE_BYTES}` column")),
        Some(t) if is_binary(&t) || list_item(&t).is_some_and(is_binary) => {}
        Some(t) => return fail(format!("`{IMAGE_BYTES}` is {t}")),
    }
    if let Some(t) = field(NAMES).filter(|t| !is_text(t)) {
        return fail(format!("`{NAMES}` is {t}, not text"));
    }
    match field(ID) {
        Some(t) if !is_text(&t) && !t.is_integer() => fail(format!("`{ID}` is {t}")),
        _ => Ok(()),
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

fn list_item(t: &DataType) -> Option<&DataType> {
    match t {
        DataType::List(f) | DataType::LargeList(f) => Some(f.data_type()),
        _ => None,
    }
}

/// A list of structs with text `role` and `content`.
fn turn_struct(t: &DataType) -> Option<()> {
    let DataType::Struct(fields) = list_item(t)? else {
        return None;
    };
    let text = |name| {
        fields
            .iter()
            .any(|f| f.name() == name && is_text(f.data_type()))
    };
    (text("role") && text("content")).then_some(())
}

/// One batch's columns.
pub struct Columns {
    conversations: ArrayRef,
    images: ArrayRef,
    id: Option<ArrayRef>,
    names: Option<ArrayRef>,
}

impl Columns {
    pub fn of(batch: &RecordBatch) -> Self {
        let col = |name| batch.column_by_name(name).cloned();
        Self {
            conversations: col(CONVERSATIONS).expect("checked"),
            images: col(IMAGE_BYTES).expect("checked"),
            id: col(ID),
            names: col(NAMES),
        }
    }

    /// Row `i` of the batch, input row `row`: a record and the system turns it left out.
    pub fn record(
        &self,
        row: usize,
        i: usize,
        naming: &ImageNaming,
    ) -> std::result::Result<(Record, usize), Reject> {
        let id = match &self.id {
            Some(c) if c.is_valid(i) => text(c, i).unwrap_or_else(|| integer(c, i)),
            _ => row.to_string(),
        };
        let malformed = |detail: String| Reject {
            reason: Reason::MalformedRecord,
            record: row,
            ids: vec![id.clone()],
            image: String::new(),
            detail,
        };
        let turns = turns(&self.conversations, i).map_err(malformed)?;
        let images = binaries(&self.images, i)
            .map_err(malformed)?
            .unwrap_or_default();
        let named = self.names.as_ref().and_then(|c| text(c, i));
        let (image, naming) = match (named, images.is_empty()) {
            (Some(names), _) => (Some(names), naming.clone()),
            (None, true) => (None, naming.clone()),
            // Named by their bytes; `image_prefix` is for names.
            (None, false) => {
                let names: Vec<String> = images.iter().map(|b| content_name(b)).collect();
                let naming = ImageNaming {
                    prefix: String::new(),
                    ..naming.clone()
                };
                (Some(names.join(", ")), naming)
            }
        };
        let (turns, system) = v1_turns(turns);
        let record = make_record(row, id.clone(), image, turns, &naming)?;
        if record.images.len() != images.len() {
            let detail = format!(
                "{} names in `{NAMES}`, {} images in `{IMAGE_BYTES}`",
                record.images.len(),
                images.len()
            );
            return Err(Reject {
                image: record.image_key,
                ..malformed(detail)
            });
        }
        Ok((record, system))
    }
}

/// An image's name from its bytes.
pub fn content_name(bytes: &[u8]) -> String {
    format!("sha256:{}", &crate::util::sha256_hex(bytes)[..16])
}

/// Upstream's roles in v1's terms; `system` turns are left out and counted.
fn v1_turns(turns: Vec<(String, String)>) -> (Vec<Turn>, usize) {
    let n = turns.len();
    let kept: Vec<Turn> = turns
        .into_iter()
        .filter(|(role, _)| role != "system")
        .map(|(role, value)| Turn {
            from: match role.as_str() {
                "user" => "human".into(),
                "assistant" => "gpt".into(),
                _ => role,
            },
            value,
        })
        .collect();
    let system = n - kept.len();
    (kept, system)
}

fn text(col: &ArrayRef, i: usize) -> Option<String> {
    if col.is_null(i) {
        return None;
    }
    Some(match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(i).to_string(),
        DataType::LargeUtf8 => col.as_string::<i64>().value(i).to_string(),
        DataType::Utf8View => col.as_string_view().value(i).to_string(),
        _ => return None,
    })
}

/// An integer cell as text (the `id` column may be any integer type).
fn integer(col: &ArrayRef, i: usize) -> String {
    use arrow_array::types::*;
    macro_rules! int {
        ($($t:ident => $p:ty),*) => {
            match col.data_type() {
                $(DataType::$t => col.as_primitive::<$p>().value(i).to_string(),)*
                _ => i.to_string(),
            }
        };
    }
    int!(Int8 => Int8Type, Int16 => Int16Type, Int32 => Int32Type, Int64 => Int64Type,
         UInt8 => UInt8Type, UInt16 => UInt16Type, UInt32 => UInt32Type, UInt64 => UInt64Type)
}

/// The `(role, content)` turns of row `i`: a JSON text or a list of structs.
fn turns(col: &ArrayRef, i: usize) -> std::result::Result<Vec<(String, String)>, String> {
    #[derive(Deserialize)]
    struct JsonTurn {
        role: String,
        #[serde(default)]
        content: Option<String>,
    }
    if col.is_null(i) {
        return Ok(Vec::new());
    }
    if let Some(json) = text(col, i) {
        let turns: Vec<JsonTurn> = serde_json::from_str(&json).map_err(|e| {
            format!("`{CONVERSATIONS}` is not a JSON list of {{role, content}}: {e}")
        })?;
        return Ok(turns
            .into_iter()
            .map(|t| (t.role, t.content.unwrap_or_default()))
            .collect());
    }
    let list = list_value(col, i).ok_or("`conversations` is neither text nor a list")?;
    let s = list.as_struct();
    let (role, content) = (
        s.column_by_name("role").expect("checked"),
        s.column_by_name("content").expect("checked"),
    );
    (0..s.len())
        .map(|k| {
            let role = text(role, k).ok_or(format!("turn {k} has no role"))?;
            Ok((role, text(content, k).unwrap_or_default()))
        })
        .collect()
}

fn list_value(col: &ArrayRef, i: usize) -> Option<ArrayRef> {
    match col.data_type() {
        DataType::List(_) => Some(col.as_list::<i32>().value(i)),
        DataType::LargeList(_) => Some(col.as_list::<i64>().value(i)),
        _ => None,
    }
}

/// The images of row `i`: none when null, one binary, or a list of them.
pub fn binaries(col: &ArrayRef, i: usize) -> std::result::Result<Option<Vec<Vec<u8>>>, String> {
    if col.is_null(i) {
        return Ok(None);
    }
    let one = |c: &ArrayRef, k: usize| -> Option<Vec<u8>> {
        Some(match c.data_type() {
            DataType::Binary => c.as_binary::<i32>().value(k).to_vec(),
            DataType::LargeBinary => c.as_binary::<i64>().value(k).to_vec(),
            DataType::BinaryView => c.as_binary_view().value(k).to_vec(),
            _ => return None,
        })
    };
    if let Some(b) = one(col, i) {
        return Ok(Some(vec![b]));
    }
    let list: Arc<dyn Array> = list_value(col, i).ok_or("`image_bytes` is not binary")?;
    (0..list.len())
        .map(|k| match list.is_null(k) {
            true => Err(format!("image {k} of `{IMAGE_BYTES}` is null")),
            false => one(&list, k).ok_or_else(|| "`image_bytes` is not binary".to_string()),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Some)
}
