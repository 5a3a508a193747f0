//! Property test: every window sampled from the de-duplicated layout equals
//! the window a naive raw buffer (full obs and next_obs per transition)
//! returns — across episode ends, ring wrap-around, early eviction when a
//! stream runs out of rows, compression, and windows of any length, width
//! and stride.

use gm_buffers::{col, BufferConfig, DType, FieldSpec, ReplayBuffer, Schema};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;

#[derive(Debug, Clone)]
struct Case {
    windows: Vec<(usize, usize)>, // (window, features)
    frame: usize,                 // features of a frame obs (window 1)
    capacity: usize,
    rows_per_stream: Option<usize>,
    budget: Option<u64>,
    seed: u64,
    steps: usize,
    max_stride: usize,
    restart_p: f64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((1usize..9, 1usize..4), 1..3),
        1usize..5,
        1usize..40,
        prop::option::of(0usize..4),
        prop::option::of(1u64..200_000),
        any::<u64>(),
        1usize..400,
    )
        .prop_map(|(windows, frame, capacity, rows, budget, seed, steps)| {
            let wmax = windows.iter().map(|w| w.0).max().unwrap();
            // rows: None = default, or a tight value that forces early eviction
            let rows_per_stream = rows.map(|k| 2 * wmax + 1 + k * capacity / 2);
            Case {
                windows,
                frame,
                capacity,
                rows_per_stream,
                budget,
                seed,
                steps,
                max_stride: 3,
                restart_p: 0.05,
            }
        })
}

/// One raw transition as a naive buffer stores it.
#[derive(Debug, Clone, PartialEq)]
struct Raw {
    id: i64,
    obs: Vec<Vec<f32>>,
    next: Vec<Vec<f32>>,
}

fn run(c: Case) -> Result<gm_buffers::BufferStats, TestCaseError> {
    let mut fields: Vec<FieldSpec> = c
        .windows
        .iter()
        .enumerate()
        .map(|(i, &(w, f))| FieldSpec::window(format!("w{i}"), DType::F32, &[w, f]))
        .collect();
    fields.push(FieldSpec::obs("frame", DType::F32, &[c.frame]));
    fields.push(FieldSpec::plain("id", DType::I64, &[]));
    let schema = Schema::new(fields).unwrap();
    let cfg = BufferConfig {
        capacity: c.capacity,
        rows_per_stream: c.rows_per_stream,
        chunk_bytes: 4096,
        byte_budget: c.budget,
        ..BufferConfig::default()
    };
    let mut buf = ReplayBuffer::new(schema, cfg).unwrap();
    let mut model: VecDeque<Raw> = VecDeque::new();
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    // Per stream: a series of rows and the current window end.
    let dims: Vec<(usize, usize)> = c.windows.iter().copied().chain([(1, c.frame)]).collect();
    let mut series: Vec<Vec<f32>> = vec![Vec::new(); dims.len()];
    let mut ends = vec![0usize; dims.len()];
    let mut value = 0.0f32;
    let mut new_row = |rng: &mut ChaCha8Rng, f: usize| -> Vec<f32> {
        (0..f)
            .map(|_| {
                // small alphabet so accidental equalities happen too
                value += 1.0;
                if rng.random_bool(0.2) {
                    0.0
                } else {
                    value
                }
            })
            .collect()
    };
    let start_episode =
        |rng: &mut ChaCha8Rng,
         series: &mut Vec<Vec<f32>>,
         ends: &mut Vec<usize>,
         nr: &mut dyn FnMut(&mut ChaCha8Rng, usize) -> Vec<f32>| {
            for (k, &(w, f)) in dims.iter().enumerate() {
                series[k].clear();
                for _ in 0..w {
                    let r = nr(rng, f);
                    series[k].extend(r);
                }
                ends[k] = w; // window = rows [end - w, end)
            }
        };
    start_episode(&mut rng, &mut series, &mut ends, &mut new_row);
    let window = |series: &Vec<Vec<f32>>, k: usize, end: usize| -> Vec<f32> {
        let (w, f) = dims[k];
        series[k][(end - w) * f..end * f].to_vec()
    };
    let mut batch = buf.new_batch();
    // Transitions waiting to go in with one add_batch (flushed at random
    // sizes, and before every episode mark and every check).
    let mut pending: Vec<Raw> = Vec::new();
    let flush = |buf: &mut ReplayBuffer, pending: &mut Vec<Raw>| {
        if pending.is_empty() {
            return;
        }
        let nk = pending[0].obs.len();
        let mut owned: Vec<Vec<f32>> = Vec::new();
        for k in 0..nk {
            owned.push(
                pending
                    .iter()
                    .flat_map(|r| r.obs[k].iter().copied())
                    .collect(),
            );
            owned.push(
                pending
                    .iter()
                    .flat_map(|r| r.next[k].iter().copied())
                    .collect(),
            );
        }
        let ids: Vec<i64> = pending.iter().map(|r| r.id).collect();
        let mut cols: Vec<_> = owned.iter().map(|v| col(v)).collect();
        cols.push(col(&ids));
        assert_eq!(buf.add_batch(&cols).unwrap(), pending.len());
        pending.clear();
    };
    let batch_mode = c.seed.is_multiple_of(2);
    for step in 0..c.steps {
        let obs: Vec<Vec<f32>> = (0..dims.len())
            .map(|k| window(&series, k, ends[k]))
            .collect();
        // advance each stream by a random stride (0, 1, 2 or 3 rows)
        for (k, &(_, f)) in dims.iter().enumerate() {
            let stride = rng.random_range(0..=c.max_stride);
            for _ in 0..stride {
                let r = new_row(&mut rng, f);
                series[k].extend(r);
            }
            ends[k] += stride;
        }
        let next: Vec<Vec<f32>> = (0..dims.len())
            .map(|k| window(&series, k, ends[k]))
            .collect();
        let id = step as i64;
        let mut cols = Vec::new();
        for k in 0..dims.len() {
            cols.push(col(&obs[k]));
            cols.push(col(&next[k]));
        }
        let idv = [id];
        cols.push(col(&idv));
        if batch_mode {
            pending.push(Raw {
                id,
                obs: obs.clone(),
                next: next.clone(),
            });
            if rng.random_bool(0.3) {
                flush(&mut buf, &mut pending);
            }
        } else {
            buf.add(&cols).unwrap();
        }
        model.push_back(Raw {
            id,
            obs: obs.clone(),
            next,
        });
        if model.len() > c.capacity {
            model.pop_front();
        }
        let ep_end = rng.random_bool(c.restart_p);
        let check = step % 7 == 0 || step + 1 == c.steps;
        if ep_end || check || rng.random_bool(0.02) {
            flush(&mut buf, &mut pending);
        }
        if ep_end {
            buf.mark_episode_end();
            start_episode(&mut rng, &mut series, &mut ends, &mut new_row);
        } else if rng.random_bool(c.restart_p * 0.5) {
            // an episode that restarts without being marked
            start_episode(&mut rng, &mut series, &mut ends, &mut new_row);
        }
        if pending.is_empty() && rng.random_bool(0.02) {
            buf.compress_cold(0);
        }
        if !pending.is_empty() {
            continue;
        }
        // The live set is the newest `len` transitions of the model.
        let len = buf.len();
        prop_assert!(
            len >= 1 && len <= model.len(),
            "len {} model {}",
            len,
            model.len()
        );
        if buf.stats().evicted_early == 0 {
            prop_assert_eq!(len, model.len(), "only a stream out of rows evicts early");
        }
        let oldest_live = id - len as i64 + 1;
        if check {
            buf.sample_into(&mut batch, 32, &mut rng).unwrap();
            for i in 0..32 {
                let sid = batch.item::<i64>("id", i).unwrap()[0];
                prop_assert!(
                    sid >= oldest_live && sid <= id,
                    "sampled dead id {} (live {}..={})",
                    sid,
                    oldest_live,
                    id
                );
                let raw = &model[model.len() - 1 - (id - sid) as usize];
                prop_assert_eq!(raw.id, sid);
                for k in 0..dims.len() {
                    let name = if k < c.windows.len() {
                        format!("w{k}")
                    } else {
                        "frame".to_string()
                    };
                    prop_assert_eq!(
                        batch.item::<f32>(&name, i).unwrap(),
                        &raw.obs[k][..],
                        "obs {} of id {}",
                        name,
                        sid
                    );
                    prop_assert_eq!(
                        batch.item::<f32>(&format!("next_{name}"), i).unwrap(),
                        &raw.next[k][..],
                        "next {} of id {}",
                        name,
                        sid
                    );
                }
                prop_assert_eq!(
                    batch.episode_ends()[i],
                    buf.is_episode_end(batch.indices()[i])
                );
            }
        }
    }
    Ok(buf.stats())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn dedup_windows_equal_raw_windows(c in case()) {
        run(c)?;
    }
}

#[test]
fn long_run_wraps_the_ring_many_times_with_compression() {
    run(Case {
        windows: vec![(48, 8), (60, 7)],
        frame: 13,
        capacity: 500,
        rows_per_stream: None,
        budget: Some(60_000),
        seed: 8,
        steps: 6000,
        max_stride: 3,
        restart_p: 0.05,
    })
    .unwrap();
}

#[test]
fn long_episodes_never_run_out_of_rows_with_default_rows() {
    // Bars arrive one per step, episodes are long: the default
    // rows_per_stream (2 * capacity + 4 * window) always suffices.
    let c = Case {
        windows: vec![(48, 8), (60, 7)],
        frame: 13,
        capacity: 300,
        rows_per_stream: None,
        budget: None,
        seed: 11,
        steps: 3000,
        max_stride: 1,
        restart_p: 0.004,
    };
    let stats = run(c).unwrap();
    assert_eq!(stats.evicted_early, 0);
    assert_eq!(stats.len, 300);
    // ~1 stored row per step per stream: close to the ideal 2 * window
    for s in &stats.streams[..2] {
        assert!(s.dedup_ratio() > 1.6 * s.window as f64, "{s:?}");
    }
}
