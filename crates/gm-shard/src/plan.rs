//! The shard planner: splits named tensors into shards of at most
//! [`PlanConfig::max_shard_bytes`] and assigns the shards to ranks balanced
//! by bytes, within per-rank budgets. Deterministic and serialisable, so
//! every rank computes (and can check) the same [`ShardPlan`].

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;

/// The most ranks a plan (or a group) may have.
pub const MAX_RANKS: usize = 1 << 16;

/// One named tensor to shard: its element count and its size in bytes
/// (`bytes` must be a whole multiple of `elements`, so a tensor can be cut
/// at element boundaries).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Unique name (the planner orders tensors by it).
    pub name: String,
    /// Number of elements.
    pub elements: u64,
    /// Size in bytes (`elements` × bytes per element).
    pub bytes: u64,
}

impl TensorSpec {
    /// A tensor of `elements` elements of `element_bytes` bytes each.
    /// Saturates at `u64::MAX` bytes (which the planner then rejects).
    pub fn new(name: impl Into<String>, elements: u64, element_bytes: u64) -> Self {
        Self {
            name: name.into(),
            elements,
            bytes: elements.saturating_mul(element_bytes),
        }
    }
}

/// Settings of [`plan`].
///
/// | field | default | allowed |
/// |---|---|---|
/// | `max_shard_bytes` | 100 MB (10⁸ bytes) | ≥ 1, and ≥ the largest element |
/// | `ranks` | 1 | 1 ..= [`MAX_RANKS`] |
/// | `rank_budget_bytes` | `None` (unlimited) | `Some` with exactly `ranks` entries |
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// Largest shard in bytes. Tensors up to this size are never split;
    /// larger ones are cut into contiguous element ranges. Default 10⁸.
    pub max_shard_bytes: u64,
    /// Number of ranks to assign shards to. Default 1.
    pub ranks: usize,
    /// Bytes each rank may hold (index = rank); `None` = unlimited.
    pub rank_budget_bytes: Option<Vec<u64>>,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            max_shard_bytes: 100_000_000,
            ranks: 1,
            rank_budget_bytes: None,
        }
    }
}

impl PlanConfig {
    /// Checks every field against the table above; the error names the
    /// key, the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        if self.max_shard_bytes == 0 {
            return Err(Error::config("max_shard_bytes", 0u64, "at least 1 byte"));
        }
        if self.ranks == 0 || self.ranks > MAX_RANKS {
            return Err(Error::config(
                "ranks",
                self.ranks,
                format!("1 ..= {MAX_RANKS}"),
            ));
        }
        if let Some(b) = &self.rank_budget_bytes {
            if b.len() != self.ranks {
                return Err(Error::config(
                    "rank_budget_bytes",
                    format!("{} entries", b.len()),
                    format!("one entry per rank ({} entries)", self.ranks),
                ));
            }
        }
        Ok(())
    }
}

/// A contiguous element range `start..end` of one tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Piece {
    /// The tensor's name.
    pub tensor: String,
    /// First element (inclusive).
    pub start: u64,
    /// One past the last element.
    pub end: u64,
    /// Bytes of the range.
    pub bytes: u64,
}

/// A unit of assignment: pieces of one or more tensors, at most
/// `max_shard_bytes` in all, owned by one rank.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    /// Position in [`ShardPlan::shards`] (shards follow tensor name order).
    pub index: usize,
    /// The owning rank.
    pub rank: usize,
    /// Sum of the pieces' bytes.
    pub bytes: u64,
    /// The pieces, in tensor name order then element order.
    pub pieces: Vec<Piece>,
}

/// The result of [`plan`]: shards in tensor name order, each with its rank,
/// and the bytes each rank holds. Equal inputs (in any order) give equal
/// plans, with equal [`ShardPlan::fingerprint`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    max_shard_bytes: u64,
    ranks: usize,
    shards: Vec<Shard>,
    rank_bytes: Vec<u64>,
}

impl ShardPlan {
    /// All shards, by index.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }
    /// The shards `rank` owns, by index.
    pub fn shards_of(&self, rank: usize) -> impl Iterator<Item = &Shard> + '_ {
        self.shards.iter().filter(move |s| s.rank == rank)
    }
    /// Bytes assigned to each rank (index = rank).
    pub fn rank_bytes(&self) -> &[u64] {
        &self.rank_bytes
    }
    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }
    /// The shard size limit the plan was made with.
    pub fn max_shard_bytes(&self) -> u64 {
        self.max_shard_bytes
    }
    /// Bytes of all shards.
    pub fn total_bytes(&self) -> u64 {
        self.rank_bytes.iter().sum()
    }
    /// Most-loaded rank's bytes minus least-loaded rank's bytes.
    pub fn imbalance_bytes(&self) -> u64 {
        let max = self.rank_bytes.iter().max().copied().unwrap_or(0);
        let min = self.rank_bytes.iter().min().copied().unwrap_or(0);
        max - min
    }
    /// A 64-bit FNV-1a hash of the whole plan, stable across platforms and
    /// runs: ranks can exchange it to check they hold the same plan.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.u64(self.max_shard_bytes);
        h.u64(self.ranks as u64);
        h.u64(self.shards.len() as u64);
        for s in &self.shards {
            h.u64(s.index as u64);
            h.u64(s.rank as u64);
            h.u64(s.bytes);
            h.u64(s.pieces.len() as u64);
            for p in &s.pieces {
                h.u64(p.tensor.len() as u64);
                h.bytes(p.tensor.as_bytes());
                h.u64(p.start);
                h.u64(p.end);
                h.u64(p.bytes);
            }
        }
        h.0
    }
}

struct Fnv(u64);

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// Plans `tensors` onto `config.ranks` ranks.
///
/// 1. Tensors are ordered by name (so the input order does not matter) and
///    names must be unique.
/// 2. Shards are filled in that order: a tensor of at most
///    `max_shard_bytes` joins the open shard if it fits, else opens a new
///    one; a larger tensor closes the open shard and is cut into ranges of
///    `max_shard_bytes / element size` elements, each full range a shard of
///    its own, the last (partial) one left open for the next tensors.
/// 3. Shards are assigned largest first (ties: lower index first), each to
///    the least-loaded rank whose budget still holds it (ties: lower rank).
///
/// Errors: [`Error::Config`], [`Error::DuplicateTensor`],
/// [`Error::TensorSize`], [`Error::Overflow`], [`Error::BudgetShort`] when
/// the shards need more than all budgets together (with the shortfall), and
/// [`Error::ShardDoesNotFit`] when the budgets hold the total but no rank
/// has room for some shard.
pub fn plan(tensors: &[TensorSpec], config: &PlanConfig) -> Result<ShardPlan> {
    config.validate()?;
    let max = config.max_shard_bytes;
    let mut sorted: Vec<&TensorSpec> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for w in sorted.windows(2) {
        if w[0].name == w[1].name {
            return Err(Error::DuplicateTensor {
                name: w[0].name.clone(),
            });
        }
    }

    let mut shards: Vec<(u64, Vec<Piece>)> = Vec::new();
    let mut open: Vec<Piece> = Vec::new();
    let mut open_bytes = 0u64;
    let mut total = 0u64;
    for t in sorted {
        let size_err = |reason: String| Error::TensorSize {
            name: t.name.clone(),
            elements: t.elements,
            bytes: t.bytes,
            reason,
        };
        if t.elements == 0 {
            if t.bytes != 0 {
                return Err(size_err("no elements but a non-zero size".into()));
            }
        } else if t.bytes % t.elements != 0 {
            return Err(size_err(
                "the size is not a whole number of bytes per element".into(),
            ));
        }
        total = total.checked_add(t.bytes).ok_or(Error::Overflow {
            what: "the total tensor size",
        })?;
        let piece = |start: u64, end: u64, bytes: u64| Piece {
            tensor: t.name.clone(),
            start,
            end,
            bytes,
        };
        if t.bytes <= max {
            if open_bytes + t.bytes > max {
                shards.push((open_bytes, std::mem::take(&mut open)));
                open_bytes = 0;
            }
            open.push(piece(0, t.elements, t.bytes));
            open_bytes += t.bytes;
            continue;
        }
        let elem = t.bytes / t.elements;
        if elem > max {
            return Err(size_err(format!(
                "one element ({elem} bytes) is larger than max_shard_bytes ({max})"
            )));
        }
        if open_bytes > 0 {
            // Zero-byte pieces stay open and join the first range.
            shards.push((open_bytes, std::mem::take(&mut open)));
            open_bytes = 0;
        }
        let per = max / elem;
        let mut start = 0;
        while start < t.elements {
            let end = t.elements.min(start + per);
            let bytes = (end - start) * elem;
            if end - start == per {
                open.push(piece(start, end, bytes));
                shards.push((open_bytes + bytes, std::mem::take(&mut open)));
                open_bytes = 0;
            } else {
                open.push(piece(start, end, bytes));
                open_bytes += bytes;
            }
            start = end;
        }
    }
    if !open.is_empty() {
        shards.push((open_bytes, open));
    }

    let ranks = config.ranks;
    let budgets: Vec<u64> = match &config.rank_budget_bytes {
        Some(b) => b.clone(),
        None => vec![u64::MAX; ranks],
    };
    let available: u128 = budgets.iter().map(|&b| u128::from(b)).sum();
    if u128::from(total) > available {
        // available < total <= u64::MAX here
        let available = available as u64;
        return Err(Error::BudgetShort {
            needed_bytes: total,
            available_bytes: available,
            short_bytes: total - available,
        });
    }

    let mut order: Vec<usize> = (0..shards.len()).collect();
    order.sort_by_key(|&i| (Reverse(shards[i].0), i));
    let mut load = vec![0u64; ranks];
    let mut owner = vec![0usize; shards.len()];
    for i in order {
        let bytes = shards[i].0;
        let best = (0..ranks)
            .filter(|&r| budgets[r] - load[r] >= bytes)
            .min_by_key(|&r| (load[r], r));
        match best {
            Some(r) => {
                load[r] += bytes;
                owner[i] = r;
            }
            None => {
                let rank = (0..ranks)
                    .max_by_key(|&r| (budgets[r] - load[r], Reverse(r)))
                    .unwrap_or(0);
                let free = budgets[rank] - load[rank];
                return Err(Error::ShardDoesNotFit {
                    shard: i,
                    shard_bytes: bytes,
                    rank,
                    largest_free_bytes: free,
                    short_bytes: bytes - free,
                });
            }
        }
    }

    let shards = shards
        .into_iter()
        .enumerate()
        .map(|(index, (bytes, pieces))| Shard {
            index,
            rank: owner[index],
            bytes,
            pieces,
        })
        .collect();
    Ok(ShardPlan {
        max_shard_bytes: max,
        ranks,
        shards,
        rank_bytes: load,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn cfg(max: u64, ranks: usize) -> PlanConfig {
        PlanConfig {
            max_shard_bytes: max,
            ranks,
            rank_budget_bytes: None,
        }
    }

    /// Every element of every tensor is covered exactly once, in order, and
    /// no shard exceeds the limit; the bytes add up.
    fn check_invariants(tensors: &[TensorSpec], p: &ShardPlan) {
        let mut next: BTreeMap<&str, u64> = BTreeMap::new();
        let mut per_rank = vec![0u64; p.ranks()];
        for (i, s) in p.shards().iter().enumerate() {
            assert_eq!(s.index, i);
            assert!(s.bytes <= p.max_shard_bytes(), "shard {i} too big");
            assert_eq!(s.bytes, s.pieces.iter().map(|x| x.bytes).sum::<u64>());
            per_rank[s.rank] += s.bytes;
            for x in &s.pieces {
                let t = tensors.iter().find(|t| t.name == x.tensor).unwrap();
                let n = next.entry(&t.name).or_insert(0);
                assert_eq!(x.start, *n, "{} not contiguous", t.name);
                assert!(x.end > x.start || t.elements == 0);
                if let Some(elem) = t.bytes.checked_div(t.elements) {
                    assert_eq!(x.bytes, (x.end - x.start) * elem);
                }
                *n = x.end;
            }
        }
        for t in tensors {
            assert_eq!(next[t.name.as_str()], t.elements, "{} not covered", t.name);
        }
        assert_eq!(per_rank, p.rank_bytes());
        assert_eq!(
            p.total_bytes(),
            tensors.iter().map(|t| t.bytes).sum::<u64>()
        );
    }

    fn model() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("embed", 1000, 4), // 4000 B: split at max 1000
            TensorSpec::new("l0.w", 200, 4),   // 800
            TensorSpec::new("l0.b", 10, 4),    // 40
            TensorSpec::new("l1.w", 250, 4),   // 1000: exactly max, not split
            TensorSpec::new("l1.b", 10, 2),    // 20 (f16)
            TensorSpec::new("head", 333, 4),   // 1332: split 250 + 83 elements
            TensorSpec::new("empty", 0, 4),    // 0
        ]
    }

    #[test]
    fn default_config_is_valid_and_documented() {
        let c = PlanConfig::default();
        c.validate().unwrap();
        assert_eq!(c.max_shard_bytes, 100_000_000);
        assert_eq!(c.ranks, 1);
        assert_eq!(c.rank_budget_bytes, None);
    }

    #[test]
    fn validate_names_key_value_and_allowed() {
        let e = cfg(0, 2).validate().unwrap_err().to_string();
        assert!(e.contains("max_shard_bytes = 0"), "{e}");
        let e = cfg(10, 0).validate().unwrap_err().to_string();
        assert!(e.contains("ranks = 0") && e.contains("1 ..= 65536"), "{e}");
        let mut c = cfg(10, 3);
        c.rank_budget_bytes = Some(vec![1, 2]);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("rank_budget_bytes") && e.contains("3 entries"),
            "{e}"
        );
    }

    #[test]
    fn splits_big_tensors_and_packs_small_ones_in_name_order() {
        let t = model();
        let p = plan(&t, &cfg(1000, 3)).unwrap();
        check_invariants(&t, &p);
        let layout: Vec<Vec<(&str, u64, u64)>> = p
            .shards()
            .iter()
            .map(|s| {
                s.pieces
                    .iter()
                    .map(|x| (x.tensor.as_str(), x.start, x.end))
                    .collect()
            })
            .collect();
        // Name order: embed, empty, head, l0.b, l0.w, l1.b, l1.w.
        assert_eq!(
            layout,
            vec![
                vec![("embed", 0, 250)],
                vec![("embed", 250, 500)],
                vec![("embed", 500, 750)],
                vec![("embed", 750, 1000)],
                vec![("empty", 0, 0), ("head", 0, 250)],
                vec![("head", 250, 333), ("l0.b", 0, 10)], // 332 + 40
                vec![("l0.w", 0, 200), ("l1.b", 0, 10)],   // 800 + 20
                vec![("l1.w", 0, 250)],
            ]
        );
        // Largest first onto the least loaded rank: the six 1000 B shards
        // (0, 1, 2, 3, 4, 7) go to ranks 0, 1, 2, 0, 1, 2; then 820 B
        // (shard 6) to rank 0 and 372 B (shard 5) to rank 1.
        let ranks: Vec<usize> = p.shards().iter().map(|s| s.rank).collect();
        assert_eq!(ranks, vec![0, 1, 2, 0, 1, 1, 0, 2]);
        assert_eq!(p.rank_bytes(), &[2820, 2372, 2000]);
        assert_eq!(p.imbalance_bytes(), 820);
    }

    #[test]
    fn deterministic_and_independent_of_input_order() {
        let t = model();
        let a = plan(&t, &cfg(1000, 3)).unwrap();
        let mut r = t.clone();
        r.reverse();
        r.swap(1, 4);
        let b = plan(&r, &cfg(1000, 3)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = plan(&t, &cfg(1000, 2)).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn serde_json_round_trip() {
        let p = plan(&model(), &cfg(1000, 3)).unwrap();
        let s = serde_json::to_string(&p).unwrap();
        let q: ShardPlan = serde_json::from_str(&s).unwrap();
        assert_eq!(p, q);
        assert_eq!(p.fingerprint(), q.fingerprint());
        let c = PlanConfig {
            rank_budget_bytes: Some(vec![5, 6]),
            ..cfg(7, 2)
        };
        let d: PlanConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, d);
    }

    #[test]
    fn shards_of_lists_a_ranks_shards() {
        let p = plan(&model(), &cfg(1000, 3)).unwrap();
        for r in 0..3 {
            let sum: u64 = p.shards_of(r).map(|s| s.bytes).sum();
            assert_eq!(sum, p.rank_bytes()[r]);
        }
        assert_eq!(p.shards_of(3).count(), 0);
    }

    #[test]
    fn budgets_are_respected() {
        let t = model();
        let mut c = cfg(1000, 3);
        // Rank 0 can take one 1000 B shard only; the rest must go elsewhere.
        c.rank_budget_bytes = Some(vec![1000, 4000, 4000]);
        let p = plan(&t, &c).unwrap();
        check_invariants(&t, &p);
        assert!(p.rank_bytes()[0] <= 1000);
        assert!(p.rank_bytes()[1] <= 4000 && p.rank_bytes()[2] <= 4000);
    }

    #[test]
    fn budget_short_says_by_how_much() {
        let mut c = cfg(1000, 2);
        c.rank_budget_bytes = Some(vec![3000, 3000]);
        let e = plan(&model(), &c).unwrap_err();
        assert_eq!(
            e,
            Error::BudgetShort {
                needed_bytes: 7192,
                available_bytes: 6000,
                short_bytes: 1192,
            }
        );
        assert!(
            e.to_string().contains("short by 1.16 KiB (1192 bytes)"),
            "{e}"
        );
    }

    #[test]
    fn fragmented_budgets_name_the_shard_and_shortfall() {
        // 7192 bytes fit 8 x 900 in total, but no rank holds a 1000 B shard.
        let mut c = cfg(1000, 8);
        c.rank_budget_bytes = Some(vec![900; 8]);
        let e = plan(&model(), &c).unwrap_err();
        assert_eq!(
            e,
            Error::ShardDoesNotFit {
                shard: 0,
                shard_bytes: 1000,
                rank: 0,
                largest_free_bytes: 900,
                short_bytes: 100,
            }
        );
        assert!(e.to_string().contains("short by 100 bytes"), "{e}");
    }

    #[test]
    fn bad_tensors_are_errors() {
        let e = plan(
            &[TensorSpec::new("a", 2, 4), TensorSpec::new("a", 1, 4)],
            &cfg(100, 1),
        )
        .unwrap_err();
        assert_eq!(e, Error::DuplicateTensor { name: "a".into() });
        let t = TensorSpec {
            name: "odd".into(),
            elements: 3,
            bytes: 10,
        };
        let e = plan(&[t], &cfg(100, 1)).unwrap_err().to_string();
        assert!(e.contains("\"odd\"") && e.contains("whole number"), "{e}");
        let e = plan(&[TensorSpec::new("wide", 4, 16)], &cfg(8, 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("16 bytes") && e.contains("max_shard_bytes (8)"),
            "{e}"
        );
        let e = plan(
            &[
                TensorSpec::new("x", u64::MAX / 2, 1),
                TensorSpec::new("y", u64::MAX / 2 + 2, 1),
            ],
            &cfg(u64::MAX, 1),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Overflow { .. }), "{e}");
    }

    #[test]
    fn empty_input_is_an_empty_plan() {
        let p = plan(&[], &cfg(10, 4)).unwrap();
        assert!(p.shards().is_empty());
        assert_eq!(p.rank_bytes(), &[0, 0, 0, 0]);
    }

    fn tensors() -> impl Strategy<Value = Vec<TensorSpec>> {
        proptest::collection::btree_map("[a-z]{1,6}", (0u64..400, 1u64..=8), 0..24).prop_map(|m| {
            m.into_iter()
                .map(|(n, (e, b))| TensorSpec::new(n, e, b))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn plans_cover_everything_balanced_and_deterministic(
            t in tensors(), max in 8u64..600, ranks in 1usize..6, seed in any::<u64>()
        ) {
            let c = cfg(max, ranks);
            let p = plan(&t, &c).unwrap();
            check_invariants(&t, &p);
            // Greedy largest-first onto the least loaded: the spread is at
            // most the largest shard.
            let biggest = p.shards().iter().map(|s| s.bytes).max().unwrap_or(0);
            prop_assert!(p.imbalance_bytes() <= biggest);
            // Any permutation of the input gives the same plan.
            let mut r = t.clone();
            let n = r.len();
            for i in 0..n {
                let j = (seed.wrapping_mul(i as u64 + 1) >> 7) as usize % n;
                r.swap(i, j);
            }
            prop_assert_eq!(plan(&r, &c).unwrap(), p);
        }
    }
}
