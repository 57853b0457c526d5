//! Records → deduplicated image sets with their tokenized samples, and the split into shards.
//! The plan is a pure function of the inputs and settings, which is what makes an interrupted
//! ingest resumable: a re-run computes the same shards and skips the finished ones.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::config::IngestConfig;
use crate::error::{IoContext, Result};
use crate::ingest::records::{parse_records, ImageNaming};
use crate::shards::reject::Reject;
use crate::shards::Sample;
use crate::text::ChatTokenizer;

/// One future shard row: a unique image set and every sample that uses it.
#[derive(Debug, Clone)]
pub struct Group {
    pub image_key: String,
    pub images: Vec<String>,
    /// Source index of the first record using this image set.
    pub first_record: usize,
    pub samples: Vec<Sample>,
}

#[derive(Debug)]
pub struct Plan {
    pub records_read: usize,
    pub groups: Vec<Group>,
    /// Rejects found before any image is read.
    pub record_rejects: Vec<Reject>,
    pub placeholders_repaired: usize,
    pub plan_id: String,
}

impl Plan {
    pub fn n_shards(&self, rows_per_shard: usize) -> usize {
        self.groups.len().div_ceil(rows_per_shard)
    }

    pub fn shard(&self, index: usize, rows_per_shard: usize) -> &[Group] {
        let start = index * rows_per_shard;
        &self.groups[start..(start + rows_per_shard).min(self.groups.len())]
    }
}

pub fn make_plan(cfg: &IngestConfig, tokenizer: &ChatTokenizer, clip_id: &str) -> Result<Plan> {
    let naming = ImageNaming {
        prefix: cfg.image_prefix.clone(),
        max_images: cfg.max_images(),
    };
    // Read once: the same bytes are hashed (plan identity) and parsed.
    let bytes = std::fs::read(&cfg.json).at(&cfg.json)?;
    let json_sha = crate::util::sha256_hex(&bytes);
    let (records, mut record_rejects) = parse_records(&cfg.json, &bytes, &naming)?;
    drop(bytes);
    let records_read = records.len() + record_rejects.len();

    let encoded: Vec<_> = records
        .par_iter()
        .map(|r| tokenizer.encode_sample(cfg.stage, &r.turns, r.images.len(), cfg.max_seq_len))
        .collect();

    let mut groups: Vec<Group> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut placeholders_repaired = 0;
    for (r, enc) in records.iter().zip(encoded) {
        let enc = match enc {
            Ok(e) => e,
            Err((reason, detail)) => {
                record_rejects.push(Reject {
                    reason,
                    record: r.index,
                    ids: vec![r.id.clone()],
                    image: r.image_key.clone(),
                    detail,
                });
                continue;
            }
        };
        placeholders_repaired += enc.repaired as usize;
        let sample = Sample {
            id: r.id.clone(),
            input_ids: enc.input_ids.iter().map(|&t| t as u16).collect(),
            loss_mask: enc.loss_mask,
        };
        let g = *by_key.entry(r.image_key.clone()).or_insert_with(|| {
            groups.push(Group {
                image_key: r.image_key.clone(),
                images: r.images.clone(),
                first_record: r.index,
                samples: Vec::new(),
            });
            groups.len() - 1
        });
        groups[g].samples.push(sample);
    }
    record_rejects.sort_by_key(|r| r.record);

    let settings = serde_json::json!({
        "json_sha256": json_sha,
        "stage": cfg.stage,
        "image_prefix": cfg.image_prefix,
        "max_seq_len": cfg.max_seq_len,
        "max_images": cfg.max_images(),
        "rows_per_shard": cfg.rows_per_shard,
        "tokenizer_sha256": tokenizer.sha256,
        "clip": clip_id,
    });
    let plan_id = crate::util::sha256_hex(settings.to_string().as_bytes())[..16].to_string();
    Ok(Plan {
        records_read,
        groups,
        record_rejects,
        placeholders_repaired,
        plan_id,
    })
}
