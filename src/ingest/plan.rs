//! Records → deduplicated image sets with their tokenized samples, and the split into shards.
//! The plan is a pure function of the inputs and settings, which is what makes an interrupted
//! ingest resumable: a re-run computes the same shards and skips the finished ones.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use rayon::prelude::*;

use crate::config::{IngestConfig, InputFormat};
use crate::error::{IoContext, Result};
use crate::ingest::input_format;
use crate::ingest::parquet_input::{ParquetInput, Window};
use crate::ingest::records::{parse_records, ImageNaming, Record};
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

impl Group {
    /// What the held-out split hashes: the image set's key, or for a text-only row its record.
    fn split_key(&self) -> String {
        match self.images.is_empty() {
            true => format!("text:{}", self.first_record),
            false => self.image_key.clone(),
        }
    }
}

#[derive(Debug)]
pub struct Plan {
    pub records_read: usize,
    /// The training image sets in source order, then the held-out ones (`val_from..`).
    pub groups: Vec<Group>,
    /// Where the held-out image sets (`val_fraction`) begin in `groups`.
    pub val_from: usize,
    /// Rejects found before any image is read.
    pub record_rejects: Vec<Reject>,
    pub placeholders_repaired: usize,
    /// `system` turns of Parquet rows left out of v1's template.
    pub system_turns: usize,
    /// The global index of this window's first shard.
    pub first_shard: usize,
    pub plan_id: String,
}

impl Plan {
    /// This window's shards: training ones, then held-out ones. Indices are global (the
    /// windows' shards one after the other), and so file names unique.
    pub fn shards(&self, rows_per_shard: usize) -> Range<usize> {
        self.first_shard..self.first_shard + self.n_shards(rows_per_shard)
    }

    pub fn n_shards(&self, rows_per_shard: usize) -> usize {
        self.n_train_shards(rows_per_shard)
            + (self.groups.len() - self.val_from).div_ceil(rows_per_shard)
    }

    fn n_train_shards(&self, rows_per_shard: usize) -> usize {
        self.val_from.div_ceil(rows_per_shard)
    }

    /// Whether shard `index` belongs to the held-out split.
    pub fn is_val(&self, index: usize, rows_per_shard: usize) -> bool {
        index - self.first_shard >= self.n_train_shards(rows_per_shard)
    }

    /// The positions in `groups` of shard `index`'s rows.
    pub fn shard_range(&self, index: usize, rows_per_shard: usize) -> Range<usize> {
        let (train, index) = (
            self.n_train_shards(rows_per_shard),
            index - self.first_shard,
        );
        let (base, end, i) = match index < train {
            true => (0, self.val_from, index),
            false => (self.val_from, self.groups.len(), index - train),
        };
        let start = base + i * rows_per_shard;
        start..(start + rows_per_shard).min(end)
    }

    pub fn shard(&self, index: usize, rows_per_shard: usize) -> &[Group] {
        &self.groups[self.shard_range(index, rows_per_shard)]
    }

    /// Shard `index`'s path relative to the ingest's `out`.
    pub fn shard_file(&self, index: usize, rows_per_shard: usize) -> String {
        crate::shards::shard_file(index, self.is_val(index, rows_per_shard))
    }
}

/// Whether an image set falls in the held-out share `fraction`: a hash of its key, so the split
/// is the same whatever the order or number of records.
pub fn held_out(image_key: &str, fraction: f64) -> bool {
    let h = crate::util::sha256_hex(format!("val:{image_key}").as_bytes());
    let x = u64::from_str_radix(&h[..16], 16).expect("hex") as f64 / u64::MAX as f64;
    x < fraction
}

/// The input, read one window at a time: v1's JSON is one window (it is one document), Parquet
/// is cut at row-group boundaries into windows of about `plan_window` rows, so that planning
/// holds one window's records, never the corpus. Deduplication and the held-out split work
/// within a window; a window's shards follow the previous window's.
pub struct Planner {
    input: Input,
    pub n_windows: usize,
    pub plan_id: String,
    naming: ImageNaming,
}

enum Input {
    /// The file's bytes, until the one window is planned.
    Json(Option<Vec<u8>>),
    Parquet(ParquetInput, Vec<Window>),
}

impl Planner {
    pub fn open(cfg: &IngestConfig, tokenizer: &ChatTokenizer, clip_id: &str) -> Result<Self> {
        let (input, identity) = match input_format(cfg)? {
            InputFormat::Parquet => {
                let parquet = ParquetInput::open(&cfg.input)?;
                let windows = parquet.windows(cfg.plan_window);
                let identity = ("parquet_sha256", parquet.identity.clone());
                (Input::Parquet(parquet, windows), identity)
            }
            _ => {
                // Read once: the same bytes are hashed (plan identity) and parsed.
                let bytes = std::fs::read(&cfg.input).at(&cfg.input)?;
                let identity = ("json_sha256", crate::util::sha256_hex(&bytes));
                (Input::Json(Some(bytes)), identity)
            }
        };
        let mut settings = serde_json::json!({
            identity.0: identity.1,
            "stage": cfg.stage,
            "image_prefix": cfg.image_prefix,
            "max_seq_len": cfg.max_seq_len,
            "max_images": cfg.max_images(),
            "rows_per_shard": cfg.rows_per_shard,
            "tokenizer_sha256": tokenizer.sha256,
            "clip": clip_id,
        });
        // Only when set, so plans (and directories) made before the split keep their identity.
        if cfg.val_fraction > 0.0 {
            settings["val_fraction"] = cfg.val_fraction.into();
        }
        let n_windows = match &input {
            Input::Json(_) => 1,
            Input::Parquet(_, windows) => {
                settings["plan_window"] = cfg.plan_window.into();
                windows.len()
            }
        };
        Ok(Self {
            input,
            n_windows,
            plan_id: crate::util::sha256_hex(settings.to_string().as_bytes())[..16].to_string(),
            naming: ImageNaming {
                prefix: cfg.image_prefix.clone(),
                max_images: cfg.max_images(),
            },
        })
    }

    /// The rows the windows hold, where known before reading them (Parquet).
    pub fn rows(&self) -> Option<(usize, Vec<usize>)> {
        match &self.input {
            Input::Json(_) => None,
            Input::Parquet(p, w) => Some((p.rows, w.iter().map(|w| w.rows).collect())),
        }
    }

    /// Window `k`'s plan, its shards numbered from `first_shard`. Windows are planned in order.
    pub fn window(
        &mut self,
        k: usize,
        cfg: &IngestConfig,
        tokenizer: &ChatTokenizer,
        first_shard: usize,
    ) -> Result<Plan> {
        let (records, rejects, system_turns) = match &mut self.input {
            Input::Json(bytes) => {
                let bytes = bytes.take().expect("one window");
                let (records, rejects) = parse_records(&cfg.input, &bytes, &self.naming)?;
                (records, rejects, 0)
            }
            Input::Parquet(p, windows) => p.records(&windows[k], &self.naming)?,
        };
        let mut plan = group(cfg, tokenizer, records, rejects);
        plan.system_turns = system_turns;
        plan.first_shard = first_shard;
        plan.plan_id = self.plan_id.clone();
        Ok(plan)
    }
}

/// Tokenize `records` and gather them into rows of unique image sets, training ones first.
fn group(
    cfg: &IngestConfig,
    tokenizer: &ChatTokenizer,
    records: Vec<Record>,
    mut record_rejects: Vec<Reject>,
) -> Plan {
    let records_read = records.len() + record_rejects.len();
    // Each record's text is dropped once it is tokenized.
    let encoded: Vec<_> = records
        .into_par_iter()
        .map(|r| {
            let enc = tokenizer.encode_sample(cfg.stage, &r.turns, r.images.len(), cfg.max_seq_len);
            let sample = enc.map(|e| {
                let sample = Sample {
                    id: r.id.clone(),
                    input_ids: e.input_ids.iter().map(|&t| t as u16).collect(),
                    loss_mask: e.loss_mask,
                };
                (sample, e.repaired)
            });
            let Record {
                index,
                id,
                image_key,
                images,
                ..
            } = r;
            (index, id, image_key, images, sample)
        })
        .collect();

    let mut groups: Vec<Group> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut placeholders_repaired = 0;
    for (index, id, image_key, images, enc) in encoded {
        let (sample, repaired) = match enc {
            Ok(e) => e,
            Err((reason, detail)) => {
                record_rejects.push(Reject {
                    reason,
                    record: index,
                    ids: vec![id],
                    image: image_key,
                    detail,
                });
                continue;
            }
        };
        placeholders_repaired += repaired as usize;
        // Samples sharing an image set share a row; a text-only sample has a row of its own (so
        // that rows stay small and spread over shards).
        let g = match images.is_empty() {
            true => None,
            false => by_key.get(&image_key).copied(),
        };
        let g = g.unwrap_or_else(|| {
            if !images.is_empty() {
                by_key.insert(image_key.clone(), groups.len());
            }
            groups.push(Group {
                image_key,
                images,
                first_record: index,
                samples: Vec::new(),
            });
            groups.len() - 1
        });
        groups[g].samples.push(sample);
    }
    drop(by_key);
    record_rejects.sort_by_key(|r| r.record);
    // Held-out image sets go last, each part in source order.
    let (train, val): (Vec<Group>, Vec<Group>) = groups
        .into_iter()
        .partition(|g| !held_out(&g.split_key(), cfg.val_fraction));
    let val_from = train.len();
    let mut groups = train;
    groups.extend(val);
    Plan {
        records_read,
        groups,
        val_from,
        record_rejects,
        placeholders_repaired,
        system_turns: 0,
        first_shard: 0,
        plan_id: String::new(),
    }
}

/// What a plan holds, for `ingest --plan-only`.
#[derive(Debug, Clone, Default)]
pub struct PlanSummary {
    pub windows: usize,
    pub records_read: usize,
    pub rows: usize,
    pub rows_val: usize,
    pub samples: usize,
    pub images: usize,
    pub shards: usize,
    pub rejects_by_reason: BTreeMap<String, usize>,
    pub system_turns: usize,
    pub seconds: f64,
}

impl std::fmt::Display for PlanSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "planned in {:.1} s: {} records → {} samples in {} rows ({} held out) with {} images, {} shards; {} window{}",
            self.seconds, self.records_read, self.samples, self.rows, self.rows_val, self.images, self.shards,
            self.windows, if self.windows == 1 { "" } else { "s" }
        )?;
        for (reason, n) in &self.rejects_by_reason {
            writeln!(f, "  rejected before reading images, {reason}: {n}")?;
        }
        if self.system_turns > 0 {
            writeln!(f, "  system turns left out: {}", self.system_turns)?;
        }
        if let Some(rss) = crate::bench::peak_rss() {
            writeln!(f, "peak resident memory {:.0} MB", rss as f64 / 1e6)?;
        }
        writeln!(f, "nothing written (--plan-only); images are decoded, and may be rejected, when the shards are made")
    }
}

/// Read, tokenize and plan `cfg`'s input, writing nothing: what the shards would hold.
pub fn plan_only(cfg: &IngestConfig) -> Result<PlanSummary> {
    cfg.validate()?;
    input_format(cfg)?;
    let tokenizer = ChatTokenizer::load(&cfg.tokenizer)?;
    let started = std::time::Instant::now();
    let mut planner = Planner::open(cfg, &tokenizer, &cfg.clip)?;
    let mut sum = PlanSummary {
        windows: planner.n_windows,
        ..PlanSummary::default()
    };
    for k in 0..planner.n_windows {
        let plan = planner.window(k, cfg, &tokenizer, sum.shards)?;
        for r in &plan.record_rejects {
            *sum.rejects_by_reason
                .entry(r.reason.as_str().to_string())
                .or_insert(0) += r.ids.len();
        }
        sum.records_read += plan.records_read;
        sum.rows += plan.groups.len();
        sum.rows_val += plan.groups.len() - plan.val_from;
        sum.samples += plan.groups.iter().map(|g| g.samples.len()).sum::<usize>();
        sum.images += plan.groups.iter().map(|g| g.images.len()).sum::<usize>();
        sum.shards += plan.n_shards(cfg.rows_per_shard);
        sum.system_turns += plan.system_turns;
    }
    sum.seconds = started.elapsed().as_secs_f64();
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_then_held_out_shards_cover_every_group_once() {
        let group = |i: usize| Group {
            image_key: format!("{i}.jpg"),
            images: vec![format!("{i}.jpg")],
            first_record: i,
            samples: Vec::new(),
        };
        let plan = Plan {
            records_read: 10,
            groups: (0..10).map(group).collect(),
            val_from: 7,
            record_rejects: Vec::new(),
            placeholders_repaired: 0,
            system_turns: 0,
            first_shard: 0,
            plan_id: "p".into(),
        };
        assert_eq!(plan.n_shards(3), 4);
        let ranges: Vec<_> = (0..4).map(|i| plan.shard_range(i, 3)).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..7, 7..10]);
        let files: Vec<_> = (0..4).map(|i| plan.shard_file(i, 3)).collect();
        assert_eq!(
            files,
            [
                "data/shard-00000.parquet",
                "data/shard-00001.parquet",
                "data/shard-00002.parquet",
                "val/shard-00003.parquet"
            ]
        );
        // No held-out split: the shards of before.
        let plain = Plan {
            val_from: 10,
            ..plan
        };
        assert_eq!(plain.n_shards(3), 4);
        assert_eq!(plain.shard_range(3, 3), 9..10);
        assert!(!plain.is_val(3, 3));
    }

    #[test]
    fn the_held_out_share_is_near_the_fraction_and_fixed_by_the_key() {
        let n = (0..10_000)
            .filter(|i| held_out(&format!("{i}.jpg"), 0.1))
            .count();
        assert!((900..=1100).contains(&n), "{n}");
        assert!((0..1000).all(|i| !held_out(&format!("{i}.jpg"), 0.0)));
    }
}
