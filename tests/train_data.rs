//! Streaming batches: every sample exactly once per epoch, deterministic for a seed, length
//! buckets that cut padding, upstream's shift; and the learning-rate schedule.

use std::collections::BTreeMap;

use candle_core::Device;
use minimind_v::shards::writer::write_shard;
use minimind_v::shards::{
    f32_to_f16_bytes, ClipPrecision, Sample, ShardMeta, ShardRow, SCHEMA_VERSION,
};
use minimind_v::train::data::{check_shards, collate, DataConfig, Item, Share, Stream};
use minimind_v::train::optim::lr_at;

fn meta() -> ShardMeta {
    ShardMeta {
        schema_version: SCHEMA_VERSION.into(),
        stage: "pretrain".into(),
        clip_source: "t".into(),
        clip_weights: "t".into(),
        clip_random: true,
        tokenizer_sha256: String::new(),
        image_size: 224,
        feature_dtype: "f16".into(),
        feature_shape: [50, 4],
        placeholder_ids: minimind_v::text::placeholder_ids(),
        max_seq_len: 512,
        clip_precision: ClipPrecision::F32,
    }
}

/// 3 shards × 40 rows × 2 samples with lengths 60..=160.
fn shard_dir() -> (tempfile::TempDir, usize) {
    let tmp = tempfile::tempdir().unwrap();
    let ph: Vec<u16> = minimind_v::text::placeholder_ids()
        .iter()
        .map(|&t| t as u16)
        .collect();
    let mut n = 0;
    for s in 0..3 {
        let rows: Vec<ShardRow> = (0..40)
            .map(|r| ShardRow {
                image_key: format!("{s}-{r}"),
                images: vec![format!("{s}-{r}.jpg")],
                features: vec![f32_to_f16_bytes(&[r as f32; 200])],
                samples: (0..2)
                    .map(|k| {
                        n += 1;
                        let len = 60 + (s * 40 + r) * 7 % 101 + k;
                        let mut ids = vec![1u16, 320, 275, 201];
                        ids.extend(&ph);
                        ids.extend((ids.len()..len).map(|i| (i % 500 + 100) as u16));
                        Sample {
                            id: format!("{s}-{r}-{k}"),
                            loss_mask: (0..len).map(|i| u8::from(i > len / 2)).collect(),
                            input_ids: ids,
                        }
                    })
                    .collect(),
            })
            .collect();
        write_shard(
            &tmp.path().join(format!("shard-{s:05}.parquet")),
            &rows,
            &meta(),
        )
        .unwrap();
    }
    (tmp, n)
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    minimind_v::shards::reader::list_shards(dir).unwrap()
}

fn cfg(bucket: usize) -> DataConfig {
    DataConfig {
        batch_size: 8,
        share: Share::WHOLE,
        shuffle_buffer: 32,
        bucket_batches: bucket,
        seed: 4,
        pad_to: None,
        verify: false,
    }
}

#[test]
fn each_epoch_yields_every_sample_once_in_a_seeded_order() {
    let (tmp, n) = shard_dir();
    let mut s = Stream::new(files(tmp.path()), cfg(4)).unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut order = Vec::new();
    while s.epoch() == 0 {
        let b = s.next_items().unwrap();
        if s.epoch() > 0 {
            break;
        }
        assert!(b.len() <= 8 && !b.is_empty());
        for it in b {
            order.push(it.id.clone());
            *seen.entry(it.id).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), n);
    assert!(seen.values().all(|&c| c == 1));
    // Same seed, same order; skip_to lands on the same batch.
    let mut again = Stream::new(files(tmp.path()), cfg(4)).unwrap();
    let first: Vec<String> = again
        .next_items()
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(first, order[..first.len()]);
    let mut a = Stream::new(files(tmp.path()), cfg(4)).unwrap();
    let mut b = Stream::new(files(tmp.path()), cfg(4)).unwrap();
    for _ in 0..7 {
        a.next_items().unwrap();
    }
    b.skip_to(7).unwrap();
    let ids =
        |v: Vec<minimind_v::train::data::Item>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(ids(a.next_items().unwrap()), ids(b.next_items().unwrap()));
}

#[test]
fn length_buckets_cut_padding() {
    let (tmp, _) = shard_dir();
    let padded = |bucket: usize| {
        let mut s = Stream::new(files(tmp.path()), cfg(bucket)).unwrap();
        let (mut pad, mut real) = (0, 0);
        for _ in 0..20 {
            let b = s.next_items().unwrap();
            let longest = b.iter().map(|i| i.ids.len()).max().unwrap();
            pad += b.iter().map(|i| longest - i.ids.len()).sum::<usize>();
            real += b.iter().map(|i| i.ids.len()).sum::<usize>();
        }
        pad as f64 / real as f64
    };
    let (bucketed, plain) = (padded(8), padded(1));
    assert!(
        bucketed * 3.0 < plain,
        "bucketed padding {bucketed:.3} vs unbucketed {plain:.3}"
    );
}

/// The epoch's batches of each of `world` ranks reading every shard, until the epoch rolls over.
fn epoch_shares(dir: &std::path::Path, cfg: &DataConfig, world: usize) -> Vec<Vec<Vec<Item>>> {
    let mut streams: Vec<Stream> = (0..world)
        .map(|rank| {
            let cfg = DataConfig {
                share: Share { rank, world },
                ..cfg.clone()
            };
            Stream::new(files(dir), cfg).unwrap()
        })
        .collect();
    let mut steps = Vec::new();
    loop {
        let step: Vec<Vec<Item>> = streams
            .iter_mut()
            .map(|s| s.next_items().unwrap())
            .collect();
        if streams[0].epoch() > 0 {
            assert!(
                streams.iter().all(|s| s.epoch() > 0),
                "ranks left the epoch together"
            );
            return steps;
        }
        steps.push(step);
    }
}

/// Ranks that read every shard split each global batch: over an epoch every sample reaches
/// exactly one rank once, every rank gets rows at every step (an epoch's last batch with fewer
/// rows than ranks joins the one before: 240 samples over 7 ranks, batch 1, leave 2), the step
/// count is `steps_per_epoch`'s, and with length buckets the ranks' batches are of nearly equal
/// length — unlike ranks that read their own files, whose batches differ (each step waits for
/// the longest).
#[test]
fn ranks_reading_every_shard_share_each_batch_evenly() {
    let (tmp, n) = shard_dir();
    let train = |batch: usize, rank_data: &str| -> minimind_v::config::TrainConfig {
        let text = format!(
            "shards = \"x\"\nout = \"y\"\nepochs = 1\nbatch_size = {batch}\nrank_data = \"{rank_data}\"\n"
        );
        toml::from_str(&text).unwrap()
    };
    for (world, batch) in [(2, 8), (3, 8), (7, 1)] {
        let cfg = DataConfig {
            batch_size: batch,
            ..cfg(4)
        };
        let steps = epoch_shares(tmp.path(), &cfg, world);
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for step in &steps {
            for share in step {
                assert!(!share.is_empty() && share.len() <= batch + 1);
                for it in share {
                    *seen.entry(it.id.clone()).or_default() += 1;
                }
            }
        }
        assert_eq!(seen.len(), n, "world {world}");
        assert!(seen.values().all(|&c| c == 1), "world {world}");
        assert_eq!(
            steps.len(),
            train(batch, "batches").steps_per_epoch(n, world)
        );
    }
    assert_eq!(240 % 7, 2, "the merged last batch is exercised");

    // How far apart the ranks' batch lengths are, summed over an epoch's steps.
    let spread = |steps: &[Vec<Vec<Item>>]| -> usize {
        steps
            .iter()
            .map(|step| {
                let longest: Vec<usize> = step
                    .iter()
                    .map(|s| s.iter().map(|i| i.ids.len()).max().unwrap())
                    .collect();
                longest.iter().max().unwrap() - longest.iter().min().unwrap()
            })
            .sum()
    };
    let shared = spread(&epoch_shares(tmp.path(), &cfg(4), 2));
    let own: Vec<Vec<Vec<Item>>> = {
        let all = files(tmp.path());
        let mut streams: Vec<Stream> = (0..2)
            .map(|r| {
                let mine = all.iter().skip(r).step_by(2).cloned().collect();
                Stream::new(mine, cfg(4)).unwrap()
            })
            .collect();
        (0..10)
            .map(|_| {
                streams
                    .iter_mut()
                    .map(|s| s.next_items().unwrap())
                    .collect()
            })
            .collect()
    };
    let (shared, own) = (shared as f64 / 15.0, spread(&own) as f64 / 10.0);
    assert!(
        shared * 5.0 < own,
        "mean gap between the ranks' longest samples: shared batches {shared:.1} tokens, own files {own:.1}"
    );
}

#[test]
fn collate_shifts_like_upstream_and_splices_images() {
    let (tmp, _) = shard_dir();
    let mut s = Stream::new(files(tmp.path()), cfg(1)).unwrap();
    let items = s.next_items().unwrap();
    let ph = minimind_v::text::placeholder_ids();
    let b = collate(&items, &meta(), None, false, &ph, &Device::Cpu).unwrap();
    let t = items.iter().map(|i| i.ids.len() - 1).max().unwrap();
    assert_eq!(b.x.dims(), &[items.len(), t]);
    let x = b.x.to_vec2::<u32>().unwrap();
    let y = b.y.to_vec2::<u32>().unwrap();
    let m = b.mask.to_vec2::<f32>().unwrap();
    for (r, it) in items.iter().enumerate() {
        let n = it.ids.len() - 1;
        assert_eq!(
            x[r][..n].iter().map(|&v| v as u16).collect::<Vec<_>>(),
            it.ids[..n]
        );
        assert_eq!(
            y[r][..n].iter().map(|&v| v as u16).collect::<Vec<_>>(),
            it.ids[1..]
        );
        assert_eq!(
            m[r][..n].iter().map(|&v| v as u8).collect::<Vec<_>>(),
            it.mask[1..]
        );
        assert!(x[r][n..].iter().all(|&v| v == 0) && m[r][n..].iter().all(|&v| v == 0.0));
    }
    let imgs = b.images.unwrap();
    assert_eq!(
        imgs.slots,
        (0..items.len()).map(|r| (r, 4)).collect::<Vec<_>>()
    );
    assert_eq!(imgs.feats.dims(), &[items.len(), 50, 4]);
    let padded = collate(&items, &meta(), Some(512), false, &ph, &Device::Cpu).unwrap();
    assert_eq!(padded.x.dims(), &[items.len(), 512]);
    assert_eq!(padded.tokens, b.tokens);
}

#[test]
fn shards_of_another_clip_or_clip_precision_are_refused_naming_both_files() {
    let (tmp, _) = shard_dir();
    assert_eq!(check_shards(&files(tmp.path()), 4).unwrap(), meta());
    let rows = |n: usize| -> Vec<ShardRow> {
        (0..n)
            .map(|r| ShardRow {
                image_key: format!("x-{r}"),
                images: vec![format!("x-{r}.jpg")],
                features: vec![f32_to_f16_bytes(&[0.5; 200])],
                samples: vec![],
            })
            .collect()
    };
    for other in [
        ShardMeta {
            clip_precision: ClipPrecision::Tf32,
            ..meta()
        },
        ShardMeta {
            clip_weights: "u".into(),
            ..meta()
        },
    ] {
        let odd = tmp.path().join("shard-00003.parquet");
        write_shard(&odd, &rows(2), &other).unwrap();
        let err = check_shards(&files(tmp.path()), 4).unwrap_err().to_string();
        assert!(
            err.contains("shard-00003.parquet")
                && err.contains("shard-00000.parquet")
                && err.contains("another CLIP")
                && err.contains("HINT"),
            "{err}"
        );
    }
}

#[test]
fn cosine_schedule_matches_upstream() {
    assert_eq!(lr_at(0, 100, 4e-4, 0), 4e-4);
    assert!((lr_at(100, 100, 4e-4, 0) - 4e-5).abs() < 1e-12);
    assert!((lr_at(50, 100, 4e-4, 0) - (4e-5 + 0.5 * 3.6e-4)).abs() < 1e-12);
    assert_eq!(lr_at(5, 100, 4e-4, 10), 2e-4);
    assert_eq!(lr_at(10, 100, 4e-4, 10), 4e-4);
    assert_eq!(lr_at(150, 100, 4e-4, 0), 4e-5);
}
