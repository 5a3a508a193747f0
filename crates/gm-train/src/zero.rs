//! ZeRO stage 1 and stage 2 data parallelism (Rajbhandari et al., 2020;
//! DeepSpeed's ZeRO-1/ZeRO-2): [`ZeroOptimizer`], an AdamW whose state is
//! split across the ranks of a [`Communicator`], configured by
//! [`ZeroConfig`].
//!
//! # What it does
//!
//! Every rank holds the full f32 master weights (its own [`VarMap`]) and
//! computes the gradient of its local mean loss on its share of the global
//! batch (e.g. [`TrainStep::grads`](crate::TrainStep::grads) on its rows).
//! [`gm_shard::plan`] cuts the variables (in [`Grads`] order) into shards of
//! at most [`ZeroConfig::max_shard_bytes`] and gives each shard an owner; a
//! rank keeps the AdamW moments `m`, `v` of the elements it owns only, as
//! flat f32 vectors. One [`ZeroOptimizer::step`]:
//!
//! 1. packs `weight / loss_scale ×` the local gradient by owner (rank 0's
//!    pieces in plan order, then rank 1's, …: one full-size f32 buffer per
//!    step, `4Ψ` bytes, freed after the reduce) and reduces it: `Σ_r
//!    weight_r · g_r`, the global mean gradient, unscaled. Unscaling each
//!    rank's part before the sum equals unscaling the sum exactly when the
//!    loss scale is a power of two (the f16 loss scaler's);
//! 2. all-reduces one small vector: the sum of squares of the owned
//!    gradient elements (so the global norm is known everywhere), a
//!    non-finite flag, one invalid-input flag per rank and one "has a
//!    gradient" flag per variable;
//! 3. skips the step on every rank when the norm is not finite (an f16
//!    overflow, like [`TrainStep::apply`](crate::TrainStep::apply) with a
//!    loss scaler), otherwise clips to `max_grad_norm` and applies AdamW —
//!    the same f32 arithmetic as [`AdamW::step`], element by element — to
//!    the owned elements of the variables that got a gradient;
//! 4. all-gathers the updated owned parameters and writes every variable
//!    that got a gradient (`Var::set`).
//!
//! # Collectives per step
//!
//! | stage | gradient reduce | then |
//! |---|---|---|
//! | 1 | `all_reduce_sum` of the packed buffer (Ψ elements; every rank keeps the full reduced gradient until the update) | `all_reduce_sum` of `2 + N + variables` floats, `all_gather` of the parameters (each rank sends its `Ψ/N`) |
//! | 2 | `reduce_scatter_sum` (each rank keeps only its owned part) | the same |
//! | top-k (either stage) | `all_gather` of `k` (index, value) pairs per rank | the same |
//!
//! A skipped step (non-finite gradient) ends after the small all-reduce.
//! [`ZeroOptimizer::new`] costs an `all_gather` of a plan fingerprint and a
//! `broadcast` of rank 0's weights; [`ZeroOptimizer::gather_state`] and
//! [`ZeroOptimizer::rebalance`] one `broadcast` per shard that is not on
//! rank 0 or that moves (at most one shard's state in flight at a time).
//!
//! # Parity
//!
//! The reduced gradient `Σ_r weight_r · g_r` differs from the single
//! process's gradient of the whole batch only in the order of
//! floating-point sums, and the update is [`AdamW::step`]'s f32 arithmetic
//! element for element, so a bit-identical gradient gives bit-identical
//! weights: one rank reproduces [`TrainStep::step`](crate::TrainStep::step)
//! exactly, and 2 or 4 ranks reproduce `TrainStep` with gradient
//! accumulation over the same row split exactly when the rank weights are
//! powers of two and clipping is off (in-process and MPI backends alike).
//! Against the plain single-process step (tiny agent, three steps, AdamW
//! defaults, `tests/zero.rs`): weights within 1.4e-7 absolute, ≤ 5.3e-7
//! relative to each variable's max |w|; moments within 3.5e-6. With
//! clipping, the norm's partial sums (per owner, f64, then an f32 sum over
//! ranks) also differ from [`Grads::global_norm`]'s in the last bits. One
//! caveat any change of summation order has: Adam's `m / (√v + ε)` turns
//! the rounding of a gradient element that cancels to almost zero into an
//! update difference of up to `lr · δ / ε` (measured 1.7e-8 after one step
//! at lr 1e-3), large relative to a weight that is itself still ~lr (a
//! zero-initialised bias). Every rank ends a step with bit-identical
//! weights: the reduced values, the norm and the gathered parameters are
//! the same bits everywhere.
//!
//! # Memory
//!
//! With Ψ parameters on N ranks the bytes one rank holds between steps and
//! during the update, next to [`gm_shard::zero_memory`] for f32 Adam:
//!
//! | | stage 1 | stage 2 |
//! |---|---|---|
//! | parameters (the master `VarMap`, full on every rank) | 4Ψ | 4Ψ |
//! | optimizer state (`m`, `v` of the owned elements; [`ZeroOptimizer::state_bytes`]) | 8Ψ/N | 8Ψ/N |
//! | reduced gradient kept for the update ([`ZeroOptimizer::grad_buffer_bytes`]) | 4Ψ | 4Ψ/N |
//! | total, = `zero_memory(stage, F32, Ψ, N)` | 8Ψ + 8Ψ/N | 4Ψ + 12Ψ/N |
//!
//! "Ψ/N" is the owner's share under the plan: the greedy planner keeps every
//! rank within one shard's bytes of the mean, so the largest rank holds at
//! most `8Ψ/N + max_shard_bytes` of state. The plan's unit is optimizer
//! state, 8 bytes per parameter: [`ZeroConfig::max_shard_bytes`] and
//! [`ZeroConfig::rank_budgets_bytes`] are bytes of `m` + `v`.
//!
//! Transient, within one `step`: the packed buffer (4Ψ; for stage 2 it is
//! dropped as soon as the reduce-scatter returns), the all-gathered
//! parameters (4Ψ, after the reduced gradient is dropped) and one variable's
//! copy at a time. The backend may add its own copies during a
//! collective: gm-shard's MPI backend copies the packed buffer into its
//! in-flight buffer and receives into another of about its size, so over
//! MPI the reduce briefly holds about 3 × 4Ψ, not 4Ψ (the in-process
//! backend about 2 × 4Ψ). The caller's [`Grads`] (the local full gradient the
//! backward pass produced, 4Ψ) is alive during the step: unlike DeepSpeed,
//! which reduces gradient buckets while the backward pass runs, candle
//! hands over the whole gradient at once, so stage 2's saving is in what is
//! kept for the update, not in the backward pass's peak.
//!
//! # Top-k compression
//!
//! With [`ZeroConfig::top_k`] each rank adds its error-feedback residual to
//! its weighted, unscaled gradient, keeps the `k` largest magnitudes over
//! the whole model (`k` = [`TopKAmount::k`] of Ψ: exactly `k` per rank, the
//! same algorithm as [`TopK`](crate::TopK) with [`TopKScope::Global`](crate::TopKScope)),
//! keeps the rest as its new residual, and exchanges the `k` (index,
//! value) pairs with `all_gather` (indices carried bit-exactly as
//! `f32::from_bits`). Each rank sums the pairs that fall in its range
//! (stage 1: the whole model, stage 2: its owned part) in rank order. The
//! residual (4Ψ per rank, variable order, independent of the plan) is
//! updated only when the step is taken; [`ZeroOutcome::bytes_sent`] is `8k`
//! instead of the dense `4Ψ`. The update differs from the dense one — that
//! is the point; `tests/zero.rs` checks it still converges.
//!
//! # Faults
//!
//! Invalid input (gradients of another `VarMap`, a weight or loss scale that
//! is not finite and > 0) is detected before the reduce; the rank still
//! takes part in the collectives with zeros, and then every rank returns an
//! error at the same step (the rank at fault its own [`Error::Config`], the
//! others one naming the faulty ranks) and nothing is updated: the group
//! stays usable. A peer that leaves, crashes or does not arrive within the
//! communicator's timeout makes the collective fail with
//! [`gm_shard::Error::Timeout`] / [`gm_shard::Error::PeerLeft`] (later calls:
//! [`gm_shard::Error::Aborted`]), returned as [`Error::Shard`]; no call
//! waits longer than the backend's timeout. After such an error the
//! optimizer's state may be ahead of or behind the other ranks': restore from
//! a checkpoint ([`ZeroOptimizer::gather_state`] /
//! [`ZeroOptimizer::load_state`]) in a new group.

use std::cell::Cell;
use std::fmt;
use std::ops::Range;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use gm_shard::codec::{u64_to_f32s, U64_PIECES};
use gm_shard::{plan, Communicator, PlanConfig, ShardPlan, TensorSpec, ZeroStage};
use serde::{Deserialize, Serialize};

use crate::grads::Grads;
use crate::optim::{AdamW, AdamWConfig};
use crate::sparsify::{TopKAmount, TopKConfig};
use crate::{Error, Result};

/// Bytes of optimizer state per parameter (f32 `m` and `v`): the unit of
/// the shard plan, its shard limit and its rank budgets.
pub const STATE_BYTES_PER_PARAM: u64 = 8;

/// Shards per rank the plan aims for when the model is small next to
/// [`ZeroConfig::max_shard_bytes`]: see [`shard_bytes`].
pub const SHARDS_PER_RANK: u64 = 4;

/// The shard size a [`ZeroOptimizer`] plans with: `max_shard_bytes`, but
/// no more than a `1/(4N)` share of the total state (rounded up to whole
/// parameters), so a model smaller than one 100 MB shard is still split
/// over all `N` ranks, each owning about 4 shards — balanced within about
/// a quarter of a share by the planner's largest-first assignment.
pub fn shard_bytes(max_shard_bytes: u64, total_state_bytes: u64, world: usize) -> u64 {
    let share = total_state_bytes.div_ceil(SHARDS_PER_RANK * world.max(1) as u64);
    let share = share.div_ceil(STATE_BYTES_PER_PARAM) * STATE_BYTES_PER_PARAM;
    max_shard_bytes.min(share.max(STATE_BYTES_PER_PARAM))
}

/// Settings of a [`ZeroOptimizer`].
///
/// | field | default | allowed |
/// |---|---|---|
/// | `stage` | [`ZeroStage::Stage2`] | `Stage1` or `Stage2` (stage 0 is the plain [`AdamW`]) |
/// | `max_shard_bytes` | 100 MB (10⁸, [`PlanConfig`]'s default; smaller models are cut into about 4 shards per rank, see [`shard_bytes`]) | ≥ 8 (one parameter's `m` and `v`) |
/// | `top_k` | `None` (dense) | a fraction in (0, 1] or a count ≥ 1 |
/// | `rank_budgets_bytes` | `None` (unlimited) | one entry per rank |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroConfig {
    /// What is partitioned: stage 1 the optimizer state, stage 2 also the
    /// reduced gradient.
    pub stage: ZeroStage,
    /// Largest shard, in bytes of optimizer state (8 per parameter).
    pub max_shard_bytes: u64,
    /// Top-k compression with error feedback of the gradient exchange
    /// (`k` of all Ψ parameters per rank); `None` reduces densely.
    pub top_k: Option<TopKAmount>,
    /// Bytes of optimizer state each rank may hold (index = rank); `None`:
    /// unlimited, balanced by bytes.
    pub rank_budgets_bytes: Option<Vec<u64>>,
}

impl Default for ZeroConfig {
    /// Stage 2, 100 MB shards, dense, no budgets.
    fn default() -> Self {
        Self {
            stage: ZeroStage::Stage2,
            max_shard_bytes: PlanConfig::default().max_shard_bytes,
            top_k: None,
            rank_budgets_bytes: None,
        }
    }
}

impl ZeroConfig {
    /// Checks every field against the table above (the budgets' length is
    /// checked against the world size by [`ZeroOptimizer::new`]); errors
    /// name the key.
    pub fn validate(&self) -> Result<()> {
        if self.stage == ZeroStage::Stage0 {
            return Err(Error::config(
                "stage",
                "Stage0",
                "Stage1 or Stage2 (for stage 0 use the plain AdamW)",
            ));
        }
        if self.max_shard_bytes < STATE_BYTES_PER_PARAM {
            return Err(Error::config(
                "max_shard_bytes",
                self.max_shard_bytes,
                "at least 8 bytes (one parameter's m and v)",
            ));
        }
        if let Some(amount) = self.top_k {
            TopKConfig {
                amount,
                ..TopKConfig::default()
            }
            .validate()?;
        }
        if let Some(b) = &self.rank_budgets_bytes {
            if b.is_empty() {
                return Err(Error::config(
                    "rank_budgets_bytes",
                    "0 entries",
                    "one entry per rank",
                ));
            }
        }
        Ok(())
    }
}

/// What one [`ZeroOptimizer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZeroOutcome {
    /// Global gradient norm before clipping (unscaled);
    /// `f64::INFINITY` when the step was skipped.
    pub grad_norm: f64,
    /// Whether the optimizer stepped: `false` on every rank when some
    /// gradient element was inf/NaN.
    pub stepped: bool,
    /// Time spent inside collectives during this step.
    pub comm: Duration,
    /// Gradient bytes this rank contributed to the reduce: `4Ψ` dense
    /// (the buffer given to the all-reduce / reduce-scatter), `8k` with
    /// top-k. The small all-reduce and the parameter all-gather are not
    /// counted.
    pub bytes_sent: u64,
}

/// One contiguous element range of one variable, at a position of the
/// packed (owner-ordered) layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// Variable index ([`Grads`] order).
    var: usize,
    /// First element within the variable.
    start: usize,
    /// Elements.
    len: usize,
    /// Position in the packed layout.
    packed: usize,
}

/// Where a shard lives: its owner, its offset in the owner's segment, its
/// elements, and its slots.
#[derive(Debug, Clone)]
struct ShardLoc {
    owner: usize,
    seg_off: usize,
    len: usize,
    slots: Range<usize>,
}

/// The packed layout of a plan: rank 0's pieces in plan order, then rank
/// 1's, …
#[derive(Debug, Clone)]
struct Layout {
    /// Elements owned by each rank (the collectives' `counts`).
    counts: Vec<usize>,
    /// Start of each rank's segment.
    offsets: Vec<usize>,
    /// All slots in packed order.
    slots: Vec<Slot>,
    /// Each rank's slots.
    rank_slots: Vec<Range<usize>>,
    /// By plan shard index.
    shards: Vec<ShardLoc>,
    /// Each variable's slots, by start.
    var_slots: Vec<Vec<usize>>,
    /// `(variable-order position of the slot's first element, slot)`,
    /// sorted, non-empty slots only (top-k maps indices through it).
    by_global: Vec<(usize, usize)>,
}

impl Layout {
    fn new(plan: &ShardPlan, names: &[String], elems: &[usize]) -> Result<Self> {
        let world = plan.ranks();
        let internal =
            |what: String| Error::config("shard plan", what, "a plan of the optimizer's variables");
        let mut var_base = Vec::with_capacity(elems.len());
        let mut acc = 0usize;
        for &n in elems {
            var_base.push(acc);
            acc += n;
        }
        let mut slots = Vec::new();
        let mut counts = Vec::with_capacity(world);
        let mut offsets = Vec::with_capacity(world);
        let mut rank_slots = Vec::with_capacity(world);
        let mut shards: Vec<Option<ShardLoc>> = vec![None; plan.shards().len()];
        let mut packed = 0usize;
        for r in 0..world {
            let (seg_start, first) = (packed, slots.len());
            for s in plan.shards_of(r) {
                let (s_first, s_off) = (slots.len(), packed - seg_start);
                for p in &s.pieces {
                    let var = names
                        .binary_search(&p.tensor)
                        .map_err(|_| internal(format!("unknown tensor {:?}", p.tensor)))?;
                    let start = usize::try_from(p.start).map_err(|_| internal("start".into()))?;
                    let end = usize::try_from(p.end).map_err(|_| internal("end".into()))?;
                    if start > end || end > elems[var] {
                        return Err(internal(format!(
                            "piece {start}..{end} of {:?} ({} elements)",
                            p.tensor, elems[var]
                        )));
                    }
                    slots.push(Slot {
                        var,
                        start,
                        len: end - start,
                        packed,
                    });
                    packed += end - start;
                }
                let loc = ShardLoc {
                    owner: r,
                    seg_off: s_off,
                    len: packed - seg_start - s_off,
                    slots: s_first..slots.len(),
                };
                match shards.get_mut(s.index) {
                    Some(x) => *x = Some(loc),
                    None => return Err(internal(format!("shard index {}", s.index))),
                }
            }
            counts.push(packed - seg_start);
            offsets.push(seg_start);
            rank_slots.push(first..slots.len());
        }
        if packed != acc {
            return Err(internal(format!("{packed} elements planned of {acc}")));
        }
        let shards = shards
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| internal("a shard without owner".into()))?;
        let mut var_slots = vec![Vec::new(); elems.len()];
        let mut by_global = Vec::new();
        for (i, s) in slots.iter().enumerate() {
            var_slots[s.var].push(i);
            if s.len > 0 {
                by_global.push((var_base[s.var] + s.start, i));
            }
        }
        for v in &mut var_slots {
            v.sort_by_key(|&i| slots[i].start);
        }
        by_global.sort_unstable();
        Ok(Self {
            counts,
            offsets,
            slots,
            rank_slots,
            shards,
            var_slots,
            by_global,
        })
    }

    /// Ψ.
    fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The packed position of variable-order position `g`.
    fn packed_of_global(&self, g: usize) -> Option<usize> {
        let i = self.by_global.partition_point(|&(s, _)| s <= g);
        let (start, slot) = *self.by_global.get(i.checked_sub(1)?)?;
        let s = &self.slots[slot];
        (g - start < s.len).then_some(s.packed + (g - start))
    }
}

/// The result of the gradient reduce on this rank.
struct Reduced {
    /// Stage 1: the full packed gradient; stage 2: the owned segment.
    buf: Vec<f32>,
    /// Offset of this rank's segment within `buf`.
    own_off: usize,
    bytes_sent: u64,
    /// Some local gradient element was inf/NaN (top-k only; dense
    /// gradients carry it through the sum).
    nonfinite: bool,
    /// Top-k: the residual to keep if the step is taken.
    next_residual: Option<Vec<f32>>,
}

/// Full `m` and `v` per variable, as rank 0 gathers them.
type FullState = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// ZeRO-1/ZeRO-2 AdamW over a [`Communicator`] (see the module docs).
///
/// Every method marked *collective* must be called by every rank, in the
/// same order.
pub struct ZeroOptimizer {
    comm: Box<dyn Communicator + Send>,
    cfg: ZeroConfig,
    adam: AdamWConfig,
    names: Vec<String>,
    vars: Vec<Var>,
    elems: Vec<usize>,
    specs: Vec<TensorSpec>,
    plan: ShardPlan,
    layout: Layout,
    /// First moments of the owned elements (packed order of this rank's
    /// segment).
    m: Vec<f32>,
    /// Second moments, likewise.
    v: Vec<f32>,
    /// Per variable: whether it has moments (`AdamW`'s `Some`).
    has_state: Vec<bool>,
    step: u64,
    /// Top-k error feedback, variable order (`None` before the first step
    /// or without top-k).
    residual: Option<Vec<f32>>,
    /// Elements of the last reduced gradient kept for the update.
    grad_buffer_len: usize,
    comm_time: Cell<Duration>,
}

impl fmt::Debug for ZeroOptimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZeroOptimizer")
            .field("rank", &self.rank())
            .field("world", &self.world())
            .field("cfg", &self.cfg)
            .field("adam", &self.adam)
            .field("variables", &self.vars.len())
            .field("params", &self.layout.total())
            .field("owned", &self.m.len())
            .field("steps", &self.step)
            .finish_non_exhaustive()
    }
}

/// Adds the time `f` takes to `acc`.
fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    *acc += t.elapsed();
    out
}

/// A tensor's values as f32, flattened.
fn flat_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Elements `start .. start + len` of a tensor, flattened, as f32.
fn piece_f32(t: &Tensor, start: usize, len: usize) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .narrow(0, start, len)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// A full (unsharded) AdamW state that
/// [`ZeroOptimizer::load_state_from`] reads piece by piece. Variables are
/// named by their index in the optimizer's sorted-name order and by name.
pub trait StateSource {
    /// How many elements variable `var`'s moments have (`m` and `v`
    /// alike), or `None` when it has no state yet.
    fn state_len(&mut self, var: usize, name: &str) -> Result<Option<usize>>;

    /// Appends `m[start..start + len]` and `v[start..start + len]` of
    /// variable `var` (flattened) to `m` and `v`. Called only for
    /// variables with state, within their length.
    fn read(
        &mut self,
        var: usize,
        name: &str,
        start: usize,
        len: usize,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()>;
}

/// An in-memory [`AdamW`] as a [`StateSource`].
struct AdamSource<'a>(&'a AdamW);

impl StateSource for AdamSource<'_> {
    fn state_len(&mut self, var: usize, name: &str) -> Result<Option<usize>> {
        match (&self.0.m[var], &self.0.v[var]) {
            (None, None) => Ok(None),
            (Some(m), Some(v)) if m.elem_count() == v.elem_count() => Ok(Some(m.elem_count())),
            (Some(m), Some(v)) => Err(Error::config(
                "optimizer state",
                format!(
                    "{name:?}: m has {} elements, v {}",
                    m.elem_count(),
                    v.elem_count()
                ),
                "as many in m as in v",
            )),
            _ => Err(Error::config(
                "optimizer state",
                format!("{name:?}: only one of m and v"),
                "both or neither",
            )),
        }
    }

    fn read(
        &mut self,
        var: usize,
        _name: &str,
        start: usize,
        len: usize,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        if let (Some(fm), Some(fv)) = (&self.0.m[var], &self.0.v[var]) {
            m.extend(piece_f32(fm, start, len)?);
            v.extend(piece_f32(fv, start, len)?);
        }
        Ok(())
    }
}

/// The indices of the `k` largest `|v|` (exactly `k`, ascending): the
/// selection of [`TopK`](crate::TopK).
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    let mut idx: Vec<usize> = (0..n).collect();
    if k < n {
        if k == 0 {
            return Vec::new();
        }
        idx.select_nth_unstable_by(k - 1, |&a, &b| values[b].abs().total_cmp(&values[a].abs()));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// Marks a fingerprint exchange from a rank whose local setup failed.
const NO_FINGERPRINT: f32 = -1.0;

/// Exchanges fingerprints; `Ok(true)` when every rank has the same one
/// (and none failed).
fn agree(comm: &dyn Communicator, fp: Option<u64>, t: &mut Duration) -> Result<bool> {
    let mine = fp.map_or([NO_FINGERPRINT; U64_PIECES], u64_to_f32s);
    let counts = vec![U64_PIECES; comm.world()];
    let all = timed(t, || comm.all_gather(&mine, &counts))?;
    Ok(fp.is_some() && all.chunks(U64_PIECES).all(|c| c == mine))
}

impl ZeroOptimizer {
    /// Collective. Plans shards of `master`'s variables ([`Grads`] order)
    /// over `comm.world()` ranks, checks that every rank made the same plan
    /// with the same stage and top-k (a fingerprint exchange: otherwise
    /// every rank gets an error), and broadcasts rank 0's weights so every
    /// rank starts equal.
    pub fn new(
        comm: Box<dyn Communicator + Send>,
        master: &VarMap,
        adam: AdamWConfig,
        cfg: ZeroConfig,
    ) -> Result<Self> {
        let world = comm.world();
        let rank = comm.rank();
        let mut t = Duration::ZERO;
        let local = (|| -> Result<_> {
            cfg.validate()?;
            adam.validate()?;
            let empty = Grads::empty(master)?;
            let mut names = Vec::with_capacity(empty.len());
            let mut vars = Vec::with_capacity(empty.len());
            let mut elems = Vec::with_capacity(empty.len());
            for (name, var, _) in empty.iter() {
                names.push(name.to_string());
                elems.push(var.elem_count());
                vars.push(var.clone());
            }
            let psi: usize = elems.iter().sum();
            if psi == 0 {
                return Err(Error::config(
                    "master",
                    "0 parameters",
                    "a VarMap with at least one parameter",
                ));
            }
            if cfg.top_k.is_some() && u32::try_from(psi).is_err() {
                return Err(Error::config(
                    "top_k",
                    format!("{psi} parameters"),
                    "at most 2^32 - 1 parameters (indices are sent as u32)",
                ));
            }
            let specs: Vec<TensorSpec> = names
                .iter()
                .zip(&elems)
                .map(|(n, &e)| TensorSpec::new(n.clone(), e as u64, STATE_BYTES_PER_PARAM))
                .collect();
            let plan = plan(
                &specs,
                &PlanConfig {
                    max_shard_bytes: shard_bytes(
                        cfg.max_shard_bytes,
                        psi as u64 * STATE_BYTES_PER_PARAM,
                        world,
                    ),
                    ranks: world,
                    rank_budget_bytes: cfg.rank_budgets_bytes.clone(),
                },
            )?;
            let layout = Layout::new(&plan, &names, &elems)?;
            Ok((names, vars, elems, specs, plan, layout))
        })();
        let fp = local
            .as_ref()
            .ok()
            .map(|(_, _, _, _, p, l)| Self::fingerprint(p, &cfg, l.total()));
        let agreed = agree(comm.as_ref(), fp, &mut t)?;
        let (names, vars, elems, specs, plan, layout) = local?;
        if !agreed {
            return Err(Error::config(
                "ranks",
                "different shard plans, stages or top-k settings",
                "the same variables and ZeroConfig on every rank",
            ));
        }

        // Rank 0's weights to everyone, in variable order.
        let psi = layout.total();
        let mut all = Vec::with_capacity(psi);
        if rank == 0 {
            for var in &vars {
                all.extend(flat_f32(var.as_tensor())?);
            }
        } else {
            all.resize(psi, 0.0);
        }
        timed(&mut t, || comm.broadcast(&mut all, 0))?;
        if rank != 0 {
            let mut off = 0;
            for (var, &n) in vars.iter().zip(&elems) {
                let w = Tensor::from_slice(&all[off..off + n], var.shape(), var.device())?;
                var.set(&w.to_dtype(var.dtype())?)?;
                off += n;
            }
        }
        drop(all);

        let owned = layout.counts[rank];
        let grad_buffer_len = match cfg.stage {
            ZeroStage::Stage1 | ZeroStage::Stage0 => psi,
            ZeroStage::Stage2 => owned,
        };
        Ok(Self {
            comm,
            adam,
            has_state: vec![false; names.len()],
            names,
            vars,
            elems,
            specs,
            plan,
            layout,
            m: vec![0.0; owned],
            v: vec![0.0; owned],
            step: 0,
            residual: None,
            grad_buffer_len,
            comm_time: Cell::new(t),
            cfg,
        })
    }

    /// A hash of everything the ranks must agree on.
    fn fingerprint(plan: &ShardPlan, cfg: &ZeroConfig, psi: usize) -> u64 {
        let stage = u64::from(cfg.stage.number());
        let k = cfg.top_k.map_or(0, |a| a.k(psi) as u64 + 1);
        let mut h = plan.fingerprint();
        for x in [stage, k] {
            h ^= x;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.comm.world()
    }

    /// The communicator (for the caller's own collectives, e.g. statistics;
    /// keep the call order the same on every rank).
    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// Ends the optimizer and hands back its communicator (e.g. to build
    /// another optimizer on the same group: an MPI process has one
    /// communicator for its whole life). The optimizer state is dropped:
    /// [`gather_state`](Self::gather_state) first to keep it.
    pub fn into_comm(self) -> Box<dyn Communicator + Send> {
        self.comm
    }

    /// The current shard plan (units: bytes of optimizer state).
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The configuration (with the budgets of the last
    /// [`rebalance`](Self::rebalance)).
    pub fn config(&self) -> &ZeroConfig {
        &self.cfg
    }

    /// The AdamW hyper-parameters.
    pub fn adam_config(&self) -> &AdamWConfig {
        &self.adam
    }

    /// Ψ, the number of parameters.
    pub fn params(&self) -> usize {
        self.layout.total()
    }

    /// Parameters this rank owns (whose optimizer state it holds).
    pub fn owned_params(&self) -> usize {
        self.m.len()
    }

    /// Steps taken (skipped steps do not count), as [`AdamW::step`].
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Optimizer state held by this rank: owned `m` + `v`, f32, measured
    /// from the buffers' lengths.
    pub fn state_bytes(&self) -> u64 {
        4 * (self.m.len() + self.v.len()) as u64
    }

    /// Gradient bytes this rank keeps between the reduce and the update
    /// (stage 1: the full gradient, `4Ψ`; stage 2: the owned part), as
    /// measured in the last step (before the first step: what it will be).
    pub fn grad_buffer_bytes(&self) -> u64 {
        4 * self.grad_buffer_len as u64
    }

    /// Bytes of the top-k error-feedback residual (`4Ψ` once top-k has
    /// run, else 0).
    pub fn residual_bytes(&self) -> u64 {
        self.residual.as_ref().map_or(0, |r| 4 * r.len() as u64)
    }

    /// Cumulative time inside collectives (construction included).
    pub fn comm_time(&self) -> Duration {
        self.comm_time.get()
    }

    fn add_comm_time(&self, t: Duration) {
        self.comm_time.set(self.comm_time.get() + t);
    }

    /// The local checks of [`step`](Self::step)'s arguments.
    fn check_step(
        &self,
        grads: &Grads,
        weight: f64,
        loss_scale: f64,
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(Error::config(
                "weight",
                weight,
                "a finite share of the global batch > 0 (local rows / global rows)",
            ));
        }
        if !(loss_scale.is_finite() && loss_scale > 0.0) {
            return Err(Error::config(
                "loss_scale",
                loss_scale,
                "a finite value > 0",
            ));
        }
        if let Some(m) = max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return Err(Error::config("max_grad_norm", m, "a finite value > 0"));
            }
        }
        if grads.len() != self.names.len() {
            return Err(Error::config(
                "grads",
                format!("gradients for {} variables", grads.len()),
                format!(
                    "gradients of the {} variables the optimizer was built on",
                    self.names.len()
                ),
            ));
        }
        for (i, (name, _, g)) in grads.iter().enumerate() {
            let var = &self.vars[i];
            if name != self.names[i] {
                return Err(Error::config(
                    "grads",
                    format!("variable {i} named {name:?}"),
                    format!(
                        "{:?} (gradients of the VarMap the optimizer was built on)",
                        self.names[i]
                    ),
                ));
            }
            if let Some(g) = g {
                if g.dims() != var.dims() {
                    return Err(Error::config(
                        "grads",
                        format!("{name:?} with shape {:?}", g.dims()),
                        format!("shape {:?} (the variable's)", var.dims()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Dense: packs `scale × g` by owner into a Ψ buffer and reduces it.
    fn reduce_dense(
        &self,
        grads: Option<&Grads>,
        scale: f32,
        present: &mut [bool],
        local_err: &mut Option<Error>,
        t: &mut Duration,
    ) -> Result<Reduced> {
        let psi = self.layout.total();
        let mut packed = vec![0f32; psi];
        if let Some(grads) = grads {
            let packing = (|| -> Result<()> {
                for (i, (_, _, g)) in grads.iter().enumerate() {
                    let Some(g) = g else { continue };
                    present[i] = true;
                    let flat = flat_f32(g)?;
                    for &si in &self.layout.var_slots[i] {
                        let s = self.layout.slots[si];
                        let src = &flat[s.start..s.start + s.len];
                        for (d, &x) in packed[s.packed..s.packed + s.len].iter_mut().zip(src) {
                            *d = x * scale;
                        }
                    }
                }
                Ok(())
            })();
            if let Err(e) = packing {
                packed.fill(0.0);
                present.fill(false);
                *local_err = Some(e);
            }
        }
        let rank = self.rank();
        let (buf, own_off) = match self.cfg.stage {
            ZeroStage::Stage2 => {
                let own = timed(t, || {
                    self.comm.reduce_scatter_sum(&packed, &self.layout.counts)
                })?;
                (own, 0)
            }
            _ => {
                timed(t, || self.comm.all_reduce_sum(&mut packed))?;
                (packed, self.layout.offsets[rank])
            }
        };
        Ok(Reduced {
            buf,
            own_off,
            bytes_sent: 4 * psi as u64,
            nonfinite: false,
            next_residual: None,
        })
    }

    /// Top-k with error feedback: exchanges `k` (index, value) pairs per
    /// rank and sums those in this rank's range.
    fn reduce_top_k(
        &self,
        amount: TopKAmount,
        grads: Option<&Grads>,
        scale: f32,
        present: &mut [bool],
        local_err: &mut Option<Error>,
        t: &mut Duration,
    ) -> Result<Reduced> {
        let psi = self.layout.total();
        let k = amount.k(psi);
        let mut pairs = vec![0f32; 2 * k];
        let mut next_residual = None;
        let mut nonfinite = false;
        if let Some(grads) = grads {
            let local = (|| -> Result<Vec<f32>> {
                let mut a = Vec::with_capacity(psi);
                for (i, (_, _, g)) in grads.iter().enumerate() {
                    match g {
                        Some(g) => {
                            present[i] = true;
                            a.extend(flat_f32(g)?.into_iter().map(|x| x * scale));
                        }
                        None => a.resize(a.len() + self.elems[i], 0.0),
                    }
                }
                Ok(a)
            })();
            match local {
                Ok(mut a) => {
                    if a.iter().all(|x| x.is_finite()) {
                        if let Some(r) = &self.residual {
                            for (x, &r) in a.iter_mut().zip(r) {
                                *x += r;
                            }
                        }
                        for (j, i) in top_k_indices(&a, k).into_iter().enumerate() {
                            // psi < 2^32 (checked in `new`).
                            pairs[2 * j] = f32::from_bits(i as u32);
                            pairs[2 * j + 1] = a[i];
                            a[i] = 0.0;
                        }
                        next_residual = Some(a);
                    } else {
                        // Sends zeros; the flag makes every rank skip.
                        nonfinite = true;
                    }
                }
                Err(e) => {
                    present.fill(false);
                    *local_err = Some(e);
                }
            }
        }
        let counts = vec![2 * k; self.world()];
        let all = timed(t, || self.comm.all_gather(&pairs, &counts))?;
        drop(pairs);
        let rank = self.rank();
        let (lo, len, own_off) = match self.cfg.stage {
            ZeroStage::Stage2 => (self.layout.offsets[rank], self.layout.counts[rank], 0),
            _ => (0, psi, self.layout.offsets[rank]),
        };
        let mut buf = vec![0f32; len];
        for p in all.chunks_exact(2) {
            let g = p[0].to_bits() as usize;
            let pos = self
                .layout
                .packed_of_global(g)
                .ok_or_else(|| Error::config("top-k index", g, format!("an index below {psi}")))?;
            if (lo..lo + len).contains(&pos) {
                buf[pos - lo] += p[1];
            }
        }
        Ok(Reduced {
            buf,
            own_off,
            bytes_sent: 8 * k as u64,
            nonfinite,
            next_residual,
        })
    }

    /// Collective. One data-parallel update (see the module docs).
    ///
    /// `grads` is this rank's gradient of its local mean loss, carrying
    /// `loss_scale`; `weight` is this rank's share of the global batch
    /// (local rows / global rows), so `Σ_r weight_r · g_r` is the global
    /// mean gradient. Reduces (stage 1: all-reduce, the full gradient kept;
    /// stage 2: reduce-scatter, only the owned part kept), skips the step
    /// on every rank when any gradient element is non-finite
    /// (`stepped = false`), unscales by `loss_scale`, clips to the global
    /// norm, applies AdamW to the owned elements only, all-gathers the
    /// updated parameters and writes them into the master variables.
    ///
    /// Errors: invalid arguments on any rank (then on every rank, nothing
    /// updated), or a failed collective ([`Error::Shard`]).
    pub fn step(
        &mut self,
        grads: &Grads,
        weight: f64,
        loss_scale: f64,
        max_grad_norm: Option<f64>,
    ) -> Result<ZeroOutcome> {
        let mut t = Duration::ZERO;
        let out = self.step_inner(Ok(grads), weight, loss_scale, max_grad_norm, &mut t);
        self.add_comm_time(t);
        out
    }

    /// Collective: this rank could not compute its gradients for this
    /// step (`err`: e.g. a failed sample, or a device out of memory even
    /// at one row per micro-batch). It still joins the step's collectives,
    /// contributing nothing, so every rank returns an error at this same
    /// step — this rank `err`, the others one naming this rank — instead of
    /// the others waiting in the reduce until the timeout. Nothing is
    /// updated and the group stays usable. Returns the error for this
    /// rank to report: `err`, or the collective's own error when the group
    /// failed too.
    pub fn step_failed(&mut self, err: Error) -> Error {
        let mut t = Duration::ZERO;
        let out = self.step_inner(Err(err), 1.0, 1.0, None, &mut t);
        self.add_comm_time(t);
        match out {
            Err(e) => e,
            Ok(_) => Error::Stopped("a failed rank's ZeRO step reported success".into()),
        }
    }

    fn step_inner(
        &mut self,
        grads: Result<&Grads>,
        weight: f64,
        loss_scale: f64,
        max_grad_norm: Option<f64>,
        t: &mut Duration,
    ) -> Result<ZeroOutcome> {
        let (rank, world, n_vars) = (self.rank(), self.world(), self.names.len());
        let (grads, mut local_err) = match grads {
            Ok(g) => (
                Some(g),
                self.check_step(g, weight, loss_scale, max_grad_norm).err(),
            ),
            Err(e) => (None, Some(e)),
        };
        let valid = grads.filter(|_| local_err.is_none());
        // Weighting and unscaling in one multiply (exact for power-of-two
        // loss scales).
        let scale = if valid.is_some() {
            (weight / loss_scale) as f32
        } else {
            0.0
        };
        let mut present = vec![false; n_vars];
        let reduced = match self.cfg.top_k {
            None => self.reduce_dense(valid, scale, &mut present, &mut local_err, t)?,
            Some(a) => self.reduce_top_k(a, valid, scale, &mut present, &mut local_err, t)?,
        };
        let count = self.layout.counts[rank];
        let own = &reduced.buf[reduced.own_off..reduced.own_off + count];

        // The small all-reduce: norm², non-finite flag, error flags, presence.
        let mut small = vec![0f32; 2 + world + n_vars];
        if local_err.is_some() {
            small[2 + rank] = 1.0;
        } else {
            small[0] = own
                .iter()
                .map(|&g| f64::from(g) * f64::from(g))
                .sum::<f64>() as f32;
            small[1] = f32::from(u8::from(reduced.nonfinite));
            for (s, &p) in small[2 + world..].iter_mut().zip(&present) {
                *s = f32::from(u8::from(p));
            }
        }
        timed(t, || self.comm.all_reduce_sum(&mut small))?;
        if let Some(e) = local_err {
            return Err(e);
        }
        let bad: Vec<usize> = (0..world).filter(|&r| small[2 + r] != 0.0).collect();
        if !bad.is_empty() {
            return Err(Error::config(
                "peer input",
                format!("ranks {bad:?} had no valid gradients for this step (bad input, or their gradient computation failed)"),
                "valid gradients on every rank (see the error on those ranks); nothing was updated",
            ));
        }
        self.grad_buffer_len = reduced.buf.len();
        let norm = f64::from(small[0]).sqrt();
        if small[1] != 0.0 || !norm.is_finite() {
            return Ok(ZeroOutcome {
                grad_norm: f64::INFINITY,
                stepped: false,
                comm: *t,
                bytes_sent: reduced.bytes_sent,
            });
        }
        let present: Vec<bool> = small[2 + world..].iter().map(|&p| p != 0.0).collect();
        let clip = match max_grad_norm {
            Some(m) if norm > m && norm > 0.0 => Some((m / norm) as f32),
            _ => None,
        };

        // Read the owned parameters first, so a failure leaves the state
        // untouched.
        let slots = &self.layout.slots[self.layout.rank_slots[rank].clone()];
        let seg = self.layout.offsets[rank];
        let mut params = Vec::with_capacity(count);
        for s in slots {
            params.extend(piece_f32(self.vars[s.var].as_tensor(), s.start, s.len)?);
        }

        // AdamW on the owned elements: AdamW::step's f32 arithmetic.
        let step = self.step + 1;
        let c = self.adam;
        let bc1 = 1.0 - c.beta1.powi(step as i32);
        let bc2 = 1.0 - c.beta2.powi(step as i32);
        let (b1, omb1) = (c.beta1 as f32, (1.0 - c.beta1) as f32);
        let (b2, omb2) = (c.beta2 as f32, (1.0 - c.beta2) as f32);
        let (ibc1, ibc2) = ((1.0 / bc1) as f32, (1.0 / bc2) as f32);
        let (eps, lr) = (c.eps as f32, c.lr as f32);
        let decay = (1.0 - c.lr * c.weight_decay) as f32;
        for s in slots {
            if !present[s.var] {
                continue;
            }
            let r = s.packed - seg..s.packed - seg + s.len;
            let grads = &own[r.clone()];
            let it = self.m[r.clone()]
                .iter_mut()
                .zip(&mut self.v[r.clone()])
                .zip(&mut params[r])
                .zip(grads);
            for (((m, v), w), &g) in it {
                let g = clip.map_or(g, |f| g * f);
                *m = *m * b1 + g * omb1;
                *v = *v * b2 + (g * g) * omb2;
                let update = (*m * ibc1) / ((*v * ibc2).sqrt() + eps);
                *w = *w * decay - update * lr;
            }
        }
        for (h, &p) in self.has_state.iter_mut().zip(&present) {
            *h |= p;
        }
        self.step = step;
        let bytes_sent = reduced.bytes_sent;
        if let Some(r) = reduced.next_residual {
            self.residual = Some(r);
        }
        drop(reduced.buf);

        let full = timed(t, || self.comm.all_gather(&params, &self.layout.counts))?;
        drop(params);
        self.write_vars(&full, &present)?;
        Ok(ZeroOutcome {
            grad_norm: norm,
            stepped: true,
            comm: *t,
            bytes_sent,
        })
    }

    /// Writes the variables marked in `which` from a packed buffer.
    fn write_vars(&self, packed: &[f32], which: &[bool]) -> Result<()> {
        for (i, var) in self.vars.iter().enumerate() {
            if !which[i] {
                continue;
            }
            let mut w = vec![0f32; self.elems[i]];
            for &si in &self.layout.var_slots[i] {
                let s = self.layout.slots[si];
                w[s.start..s.start + s.len].copy_from_slice(&packed[s.packed..s.packed + s.len]);
            }
            let w = Tensor::from_vec(w, var.shape(), var.device())?;
            var.set(&w.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Collective: rank 0 gets the full optimizer state as an [`AdamW`]
    /// (`m`, `v` per variable in [`Grads`] order, `None` for variables that
    /// never had a gradient, `step`, this optimizer's hyper-parameters) —
    /// what the single-process checkpoint code saves; other ranks get
    /// `None`. One broadcast per shard not owned by rank 0 (one shard's
    /// state in flight at a time).
    pub fn gather_state(&self) -> Result<Option<AdamW>> {
        let mut t = Duration::ZERO;
        let out = self.gather_state_inner(&mut t);
        self.add_comm_time(t);
        out
    }

    fn gather_state_inner(&self, t: &mut Duration) -> Result<Option<AdamW>> {
        let rank = self.rank();
        let mut full: Option<FullState> = (rank == 0).then(|| {
            let z = || self.elems.iter().map(|&n| vec![0f32; n]).collect();
            (z(), z())
        });
        let scatter = |full: &mut FullState, sh: &ShardLoc, m: &[f32], v: &[f32]| {
            let base = self
                .layout
                .slots
                .get(sh.slots.start)
                .map_or(0, |s| s.packed);
            for s in &self.layout.slots[sh.slots.clone()] {
                let o = s.packed - base;
                full.0[s.var][s.start..s.start + s.len].copy_from_slice(&m[o..o + s.len]);
                full.1[s.var][s.start..s.start + s.len].copy_from_slice(&v[o..o + s.len]);
            }
        };
        let mut buf = Vec::new();
        for sh in &self.layout.shards {
            let own = sh.seg_off..sh.seg_off + sh.len;
            if sh.owner == 0 {
                if let Some(f) = &mut full {
                    scatter(f, sh, &self.m[own.clone()], &self.v[own]);
                }
                continue;
            }
            buf.clear();
            if rank == sh.owner {
                buf.extend_from_slice(&self.m[own.clone()]);
                buf.extend_from_slice(&self.v[own]);
            } else {
                buf.resize(2 * sh.len, 0.0);
            }
            timed(t, || self.comm.broadcast(&mut buf, sh.owner))?;
            if let Some(f) = &mut full {
                scatter(f, sh, &buf[..sh.len], &buf[sh.len..]);
            }
        }
        let Some((m, v)) = full else { return Ok(None) };
        let mut adam = AdamW::new(self.adam, self.vars.len())?;
        adam.step = self.step;
        for (i, (m, v)) in m.into_iter().zip(v).enumerate() {
            if self.has_state[i] {
                let var = &self.vars[i];
                adam.m[i] = Some(Tensor::from_vec(m, var.shape(), var.device())?);
                adam.v[i] = Some(Tensor::from_vec(v, var.shape(), var.device())?);
            }
        }
        Ok(Some(adam))
    }

    /// Every rank passes the same full state (read from a checkpoint,
    /// possibly written with a different number of ranks, or a
    /// single-process [`AdamW`]); each keeps its own slice under the
    /// current plan. Takes `full.step`, `m` and `v`; the hyper-parameters
    /// stay this optimizer's (`full.cfg` is ignored). Clears the top-k
    /// residual. Not collective; on error nothing changes.
    pub fn load_state(&mut self, full: &AdamW) -> Result<()> {
        let n = self.vars.len();
        if full.m.len() != n || full.v.len() != n {
            return Err(Error::config(
                "optimizer state",
                format!("{} m and {} v entries", full.m.len(), full.v.len()),
                format!("{n} each (the variables the optimizer was built on)"),
            ));
        }
        self.load_state_from(full.step, &mut AdamSource(full))
    }

    /// [`load_state`](Self::load_state) from a source that hands out the
    /// full state piece by piece (such as the learner's checkpoint file,
    /// read range by range): this rank reads only the `2 · 4 · count`
    /// bytes of moments it owns, so resuming never holds the unsharded
    /// `8Ψ` state. `step` is AdamW's step count. Not collective; on error
    /// nothing changes.
    pub fn load_state_from(&mut self, step: u64, src: &mut dyn StateSource) -> Result<()> {
        let n = self.vars.len();
        let mut has = vec![false; n];
        for (i, h) in has.iter_mut().enumerate() {
            match src.state_len(i, &self.names[i])? {
                None => {}
                Some(len) if len == self.elems[i] => *h = true,
                Some(len) => {
                    return Err(Error::config(
                        "optimizer state",
                        format!("{:?}: {len} elements", self.names[i]),
                        format!("{} elements (the variable's)", self.elems[i]),
                    ))
                }
            }
        }
        let rank = self.rank();
        let count = self.layout.counts[rank];
        let (mut m, mut v) = (Vec::with_capacity(count), Vec::with_capacity(count));
        for s in &self.layout.slots[self.layout.rank_slots[rank].clone()] {
            if has[s.var] {
                src.read(s.var, &self.names[s.var], s.start, s.len, &mut m, &mut v)?;
            } else {
                m.resize(m.len() + s.len, 0.0);
                v.resize(v.len() + s.len, 0.0);
            }
        }
        if m.len() != count || v.len() != count {
            return Err(Error::config(
                "optimizer state",
                format!("{} m and {} v values read", m.len(), v.len()),
                format!("{count} each (this rank's share)"),
            ));
        }
        self.m = m;
        self.v = v;
        self.has_state = has;
        self.step = step;
        self.residual = None;
        Ok(())
    }

    /// Collective: re-plans with new per-rank budgets (bytes of optimizer
    /// state; every rank must pass the same — otherwise every rank gets an
    /// error and nothing changes) and moves the optimizer state of every
    /// shard whose owner changed (one broadcast per moved shard). Shard
    /// boundaries stay (they depend only on the variables and
    /// `max_shard_bytes`). Returns whether any shard moved.
    pub fn rebalance(&mut self, rank_budgets_bytes: Vec<u64>) -> Result<bool> {
        let mut t = Duration::ZERO;
        let out = self.rebalance_inner(rank_budgets_bytes, &mut t);
        self.add_comm_time(t);
        out
    }

    fn rebalance_inner(&mut self, budgets: Vec<u64>, t: &mut Duration) -> Result<bool> {
        let (rank, world) = (self.rank(), self.world());
        let local = (|| -> Result<(ShardPlan, Layout)> {
            let p = plan(
                &self.specs,
                &PlanConfig {
                    max_shard_bytes: self.plan.max_shard_bytes(),
                    ranks: world,
                    rank_budget_bytes: Some(budgets.clone()),
                },
            )?;
            let same_shards = p.shards().len() == self.plan.shards().len()
                && p.shards()
                    .iter()
                    .zip(self.plan.shards())
                    .all(|(a, b)| a.pieces == b.pieces);
            if !same_shards {
                return Err(Error::config(
                    "shard plan",
                    "different shard boundaries",
                    "the same shards with new owners",
                ));
            }
            let l = Layout::new(&p, &self.names, &self.elems)?;
            Ok((p, l))
        })();
        let fp = local
            .as_ref()
            .ok()
            .map(|(p, l)| Self::fingerprint(p, &self.cfg, l.total()));
        let agreed = agree(self.comm.as_ref(), fp, t)?;
        let (new_plan, new_layout) = local?;
        if !agreed {
            return Err(Error::config(
                "rank_budgets_bytes",
                format!("{budgets:?} on rank {rank}, different elsewhere"),
                "the same budgets on every rank",
            ));
        }
        let old = &self.layout;
        let mut received: Vec<Option<Vec<f32>>> = vec![None; old.shards.len()];
        let mut moved = false;
        for (i, (o, n)) in old.shards.iter().zip(&new_layout.shards).enumerate() {
            if o.owner == n.owner {
                continue;
            }
            moved = true;
            let own = o.seg_off..o.seg_off + o.len;
            let mut buf = if rank == o.owner {
                let mut b = Vec::with_capacity(2 * o.len);
                b.extend_from_slice(&self.m[own.clone()]);
                b.extend_from_slice(&self.v[own]);
                b
            } else {
                vec![0f32; 2 * o.len]
            };
            timed(t, || self.comm.broadcast(&mut buf, o.owner))?;
            if rank == n.owner {
                received[i] = Some(buf);
            }
        }
        let count = new_layout.counts[rank];
        let (mut m, mut v) = (Vec::with_capacity(count), Vec::with_capacity(count));
        let mut mine: Vec<usize> = (0..new_layout.shards.len())
            .filter(|&i| new_layout.shards[i].owner == rank)
            .collect();
        mine.sort_by_key(|&i| new_layout.shards[i].seg_off);
        for i in mine {
            let o = &old.shards[i];
            match received[i].take() {
                Some(b) => {
                    m.extend_from_slice(&b[..o.len]);
                    v.extend_from_slice(&b[o.len..]);
                }
                None => {
                    m.extend_from_slice(&self.m[o.seg_off..o.seg_off + o.len]);
                    v.extend_from_slice(&self.v[o.seg_off..o.seg_off + o.len]);
                }
            }
        }
        self.m = m;
        self.v = v;
        self.plan = new_plan;
        self.layout = new_layout;
        self.cfg.rank_budgets_bytes = Some(budgets);
        if self.cfg.stage == ZeroStage::Stage2 {
            self.grad_buffer_len = count;
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Init, VarBuilder};
    use gm_shard::ThreadGroup;

    fn vm(sizes: &[(&str, usize)]) -> VarMap {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        for &(n, s) in sizes {
            vb.get_with_hints(s, n, Init::Const(0.5)).unwrap();
        }
        vm
    }

    #[test]
    fn layout_packs_by_owner_and_maps_indices() {
        let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let elems = [10usize, 3, 7];
        let specs: Vec<TensorSpec> = names
            .iter()
            .zip(elems)
            .map(|(n, e)| TensorSpec::new(n.clone(), e as u64, 8))
            .collect();
        let p = plan(
            &specs,
            &PlanConfig {
                max_shard_bytes: 32,
                ranks: 3,
                rank_budget_bytes: None,
            },
        )
        .unwrap();
        let l = Layout::new(&p, &names, &elems).unwrap();
        assert_eq!(l.total(), 20);
        assert_eq!(l.counts.iter().sum::<usize>(), 20);
        for r in 0..3 {
            let n: usize = l.slots[l.rank_slots[r].clone()].iter().map(|s| s.len).sum();
            assert_eq!(n, l.counts[r]);
            assert_eq!(8 * l.counts[r] as u64, p.rank_bytes()[r]);
        }
        // Every variable-order index maps to a distinct packed position.
        let mut seen = [false; 20];
        for g in 0..20 {
            let pos = l.packed_of_global(g).unwrap();
            assert!(!seen[pos]);
            seen[pos] = true;
        }
        assert_eq!(l.packed_of_global(20), None);
        assert_eq!(top_k_indices(&[1.0, -3.0, 2.0, 0.5], 2), [1, 2]);
        assert_eq!(top_k_indices(&[1.0], 0), Vec::<usize>::new());
        assert_eq!(top_k_indices(&[1.0, 2.0], 5), [0, 1]);
    }

    #[test]
    fn the_optimizer_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<ZeroOptimizer>();
        let c = ZeroConfig {
            top_k: Some(TopKAmount::Count(3)),
            ..ZeroConfig::default()
        };
        let back: ZeroConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn config_validation_names_the_key() {
        assert!(ZeroConfig::default().validate().is_ok());
        let bad = [
            ZeroConfig {
                stage: ZeroStage::Stage0,
                ..ZeroConfig::default()
            },
            ZeroConfig {
                max_shard_bytes: 4,
                ..ZeroConfig::default()
            },
            ZeroConfig {
                top_k: Some(TopKAmount::Fraction(1.5)),
                ..ZeroConfig::default()
            },
            ZeroConfig {
                rank_budgets_bytes: Some(vec![]),
                ..ZeroConfig::default()
            },
        ];
        for (c, key) in bad
            .iter()
            .zip(["stage", "max_shard_bytes", "fraction", "rank_budgets"])
        {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        // Budgets of the wrong length are the planner's error on every rank.
        let out = ThreadGroup::run(2, Duration::from_secs(30), |c| {
            let cfg = ZeroConfig {
                rank_budgets_bytes: Some(vec![1 << 20]),
                ..ZeroConfig::default()
            };
            ZeroOptimizer::new(Box::new(c), &vm(&[("x", 4)]), AdamWConfig::default(), cfg)
                .map(|_| ())
        })
        .unwrap();
        for r in out {
            assert!(matches!(r, Err(Error::Shard(_))), "{r:?}");
        }
    }
}
