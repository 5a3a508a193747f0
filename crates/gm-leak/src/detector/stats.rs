//! The statistics behind [`LeakDetector`](crate::LeakDetector): cycle
//! alignment, the (seasonal) Mann–Kendall test with the tie-corrected
//! variance, the (seasonal) Theil–Sen slope with its rank-based confidence
//! interval, and the normal-distribution helpers. See the `detector` module
//! docs for the math; everything here is deterministic and allocates only into
//! the caller's [`Scratch`].

use std::cmp::Ordering;

/// Reusable buffers, so a detector that runs the test every step does not
/// allocate once warm.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    diffs: Vec<f64>,
    releases: Vec<usize>,
    /// `(phase, index)` of every sample that takes part, sorted: each run of
    /// equal phases is one season, in time order.
    keyed: Vec<(u32, u32)>,
    keyed_sorted: Vec<(u32, u32)>,
    phase_counts: Vec<usize>,
    /// The unit (cycle, or block without cycles) of every sample.
    unit: Vec<u32>,
    detrended: Vec<f64>,
    lag_slopes: Vec<f64>,
    unit_scores: Vec<i64>,
    unit_sums: Vec<i64>,
    block_sorted: Vec<f64>,
    group: Vec<u64>,
    sort_a: Vec<u64>,
    sort_b: Vec<u64>,
    slopes: Vec<f64>,
}

/// How the samples were grouped into seasons and units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Alignment {
    /// Releases (sharp drops) found in the window.
    pub releases: usize,
    /// Shortest complete cycle between two releases, in samples.
    pub shortest_cycle: Option<usize>,
    /// Units whose order the variance check permutes: cycles (grouped when
    /// there are more than [`MAX_UNITS`]) or, without releases, blocks.
    pub units: usize,
}

/// Fewest units for the permutation variance to count.
const MIN_UNITS: usize = 8;
/// Units of the permutation variance when the window has no releases.
const PLAIN_BLOCKS: usize = 16;
/// At most this many units when the window has releases: consecutive cycles
/// are grouped beyond it, to bound the `units²` score matrix.
const MAX_UNITS: usize = 64;

/// What [`mann_kendall`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MkResult {
    /// Samples in the window.
    pub n: usize,
    /// Samples that took part (those of a partial first cycle that cannot be
    /// aligned are left out).
    pub used: usize,
    /// Pairs compared: `Σ n_k (n_k − 1) / 2` over the seasons.
    pub pairs: u64,
    /// `S = Σ_k Σ_{i<j in season k} sgn(x_j − x_i)`.
    pub s: i64,
    /// `Var(S)` for independent samples, tie-corrected, summed over seasons.
    pub var_independent: f64,
    /// `Var(S)` with the units as the independent parts (see the module docs).
    pub var_units: f64,
    /// `max(var_independent, var_units)`: the variance the test uses.
    pub var_s: f64,
    /// `(S − sgn S) / √Var(S)`; 0 when `S = 0` or `Var(S) = 0`.
    pub z: f64,
    /// The seasons.
    pub alignment: Alignment,
}

/// A Theil–Sen slope with its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SenResult {
    pub slope: f64,
    pub low: f64,
    pub high: f64,
}

/// Finds releases and groups the samples of `values` into seasons and units
/// (see the module docs of `detector`), leaving the sorted `(phase, index)`
/// keys in `scratch.keyed` and each sample's unit in `scratch.unit`.
fn align(
    values: &[u64],
    release_sigmas: f64,
    from_start: bool,
    scratch: &mut Scratch,
) -> Alignment {
    let n = values.len();
    scratch.keyed.clear();
    scratch.releases.clear();
    scratch.unit.clear();
    scratch.unit.resize(n, u32::MAX);
    if n >= 3 {
        let diffs = &mut scratch.diffs;
        diffs.clear();
        diffs.extend(values.windows(2).map(|w| w[1] as f64 - w[0] as f64));
        // The threshold needs the median and the MAD, which reorder `diffs`;
        // a second pass over `values` finds the drops in time order.
        let median = median_in_place(diffs);
        diffs.iter_mut().for_each(|d| *d = (*d - median).abs());
        let sigma = 1.4826 * median_in_place(diffs);
        let threshold = (median - release_sigmas * sigma).min(0.0);
        for (i, w) in values.windows(2).enumerate() {
            if (w[1] as f64 - w[0] as f64) < threshold {
                scratch.releases.push(i + 1);
            }
        }
    }
    let releases = &scratch.releases;
    let keyed = &mut scratch.keyed;
    let unit = &mut scratch.unit;
    let Some(&first) = releases.first() else {
        // No cycles: one season holding the whole window, in blocks.
        let block = n.div_ceil(PLAIN_BLOCKS).max(1);
        keyed.extend((0..n as u32).map(|i| (0, i)));
        unit.iter_mut()
            .enumerate()
            .for_each(|(i, u)| *u = (i / block) as u32);
        return Alignment {
            releases: 0,
            shortest_cycle: None,
            units: n.div_ceil(block),
        };
    };
    let shortest = releases.windows(2).map(|w| w[1] - w[0]).min();
    // Cycle 0 is the partial one before the first release, cycle k starts at
    // release k; units group `per_unit` consecutive cycles.
    let cycles = releases.len() + 1;
    let per_unit = cycles.div_ceil(MAX_UNITS);
    // The partial cycle before the first release. When the window starts at
    // the series' first sample, its phase is counted from there: exact if the
    // series starts with a cycle, and otherwise too small, which can only
    // bias `S` downwards (an earlier sample compared with later ones of a
    // lower phase). Once the window slides, where that cycle began is
    // unknown, and guessing it from other cycles' lengths could err upwards:
    // it is left out.
    if from_start {
        for (i, u) in unit.iter_mut().enumerate().take(first) {
            keyed.push((i as u32, i as u32));
            *u = 0;
        }
    }
    for (k, &start) in releases.iter().enumerate() {
        let end = releases.get(k + 1).copied().unwrap_or(n);
        let u = ((k + 1) / per_unit) as u32;
        keyed.extend((start..end).map(|i| ((i - start) as u32, i as u32)));
        unit[start..end].iter_mut().for_each(|x| *x = u);
    }
    // Counting sort by phase; stable, so each season stays in time order.
    let counts = &mut scratch.phase_counts;
    counts.clear();
    for &(p, _) in keyed.iter() {
        let p = p as usize;
        if p >= counts.len() {
            counts.resize(p + 1, 0);
        }
        counts[p] += 1;
    }
    let mut start = 0;
    for c in counts.iter_mut() {
        (*c, start) = (start, start + *c);
    }
    let sorted = &mut scratch.keyed_sorted;
    sorted.clear();
    sorted.resize(keyed.len(), (0, 0));
    for &(p, i) in keyed.iter() {
        let slot = &mut counts[p as usize];
        sorted[*slot] = (p, i);
        *slot += 1;
    }
    std::mem::swap(keyed, sorted);
    Alignment {
        releases: releases.len(),
        shortest_cycle: shortest,
        units: cycles.div_ceil(per_unit),
    }
}

/// `Var(S)` of independent samples, times 18: `m(m−1)(2m+5)`.
fn var18(m: i64) -> i64 {
    m * (m - 1) * (2 * m + 5)
}

/// The (seasonal) Mann–Kendall test of `values` (in time order) against
/// `steps` (strictly increasing), seasons and units found by [`align`].
///
/// The unit variance can only lower `z`, so it is computed only when the
/// independent-sample `z` reaches `units_from_z` (pass `f64::NEG_INFINITY`
/// for always); otherwise `var_units` is 0.
pub(crate) fn mann_kendall(
    steps: &[u64],
    values: &[u64],
    release_sigmas: f64,
    from_start: bool,
    units_from_z: f64,
    scratch: &mut Scratch,
) -> MkResult {
    let alignment = align(values, release_sigmas, from_start, scratch);
    let mut s = 0i64;
    let mut v18 = 0i64;
    let mut pairs = 0u64;
    {
        let Scratch {
            keyed,
            group,
            sort_a,
            sort_b,
            ..
        } = &mut *scratch;
        for season in keyed.chunk_by(|a, b| a.0 == b.0) {
            if season.len() < 2 {
                continue;
            }
            group.clear();
            group.extend(season.iter().map(|&(_, i)| values[i as usize]));
            let (gs, ties) = s_and_ties(group, sort_a, sort_b);
            let m = season.len() as i64;
            s += gs;
            v18 += var18(m) - ties;
            pairs += (m * (m - 1) / 2) as u64;
        }
    }
    let var_independent = v18 as f64 / 18.0;
    let z_independent = z_score(s, var_independent);
    let var_units = if z_independent >= units_from_z {
        unit_variance(steps, values, alignment, scratch)
    } else {
        0.0
    };
    // With few units the permutation variance is too noisy to say anything
    // (and caps z): below `MIN_UNITS` the test relies on independence alone.
    let var_s = if alignment.units >= MIN_UNITS {
        var_independent.max(var_units)
    } else {
        var_independent
    };
    let z = z_score(s, var_s);
    MkResult {
        n: values.len(),
        used: scratch.keyed.len(),
        pairs,
        s,
        var_independent,
        var_units,
        var_s,
        z,
        alignment,
    }
}

/// `(S − sgn S)/√var`, or 0 when `S = 0` or `var = 0`.
fn z_score(s: i64, var: f64) -> f64 {
    if var <= 0.0 {
        return 0.0;
    }
    match s.cmp(&0) {
        Ordering::Greater => (s - 1) as f64 / var.sqrt(),
        Ordering::Less => (s + 1) as f64 / var.sqrt(),
        Ordering::Equal => 0.0,
    }
}

/// `Var(S)` with the units (cycles, or blocks) as the independent parts, on
/// the series detrended by a robust slope: the variance of `S` over all
/// orders of the units (Daniels' permutation variance of a generalised
/// correlation), `(Σ_{u<v} D_uv² + Σ_u B_u²) / 3`, plus the
/// independent-sample variance of the pairs inside a unit.
fn unit_variance(steps: &[u64], values: &[u64], al: Alignment, scratch: &mut Scratch) -> f64 {
    let n = values.len();
    if n < 2 {
        return 0.0;
    }
    let Scratch {
        keyed,
        unit,
        detrended,
        lag_slopes,
        unit_scores,
        unit_sums,
        block_sorted,
        ..
    } = scratch;
    // Robust detrending slope: the median slope over same-season pairs half a
    // window apart (each sample with the first season member at least n/2
    // samples later). O(n), and consistent for a linear trend.
    lag_slopes.clear();
    let half = (n / 2).max(1) as u32;
    for season in keyed.chunk_by(|a, b| a.0 == b.0) {
        let mut j = 0;
        for &(_, i) in season {
            while j < season.len() && season[j].1 < i + half {
                j += 1;
            }
            let Some(&(_, k)) = season.get(j) else { break };
            let (i, k) = (i as usize, k as usize);
            lag_slopes.push((values[k] as f64 - values[i] as f64) / (steps[k] - steps[i]) as f64);
        }
    }
    let beta = median_in_place(lag_slopes);
    detrended.clear();
    detrended.extend(
        values
            .iter()
            .zip(steps)
            .map(|(&v, &t)| v as f64 - beta * (t - steps[0]) as f64),
    );
    let m = al.units;
    unit_scores.clear();
    unit_scores.resize(m * m, 0);
    let mut within18 = 0i64;
    if al.releases == 0 {
        // Blocks of consecutive samples: sort each, then count between every
        // pair of blocks with two pointers.
        block_sorted.clear();
        block_sorted.extend_from_slice(detrended);
        let block = n.div_ceil(m);
        block_sorted
            .chunks_mut(block)
            .for_each(|b| b.sort_unstable_by(f64::total_cmp));
        for (u, left) in block_sorted.chunks(block).enumerate() {
            within18 += var18(left.len() as i64);
            for (v, right) in block_sorted.chunks(block).enumerate().skip(u + 1) {
                unit_scores[u * m + v] = sorted_score(left, right);
            }
        }
    } else {
        for season in keyed.chunk_by(|a, b| a.0 == b.0) {
            for (a, &(_, i)) in season.iter().enumerate() {
                let (ui, yi) = (unit[i as usize] as usize, detrended[i as usize]);
                for &(_, j) in &season[a + 1..] {
                    let (uj, yj) = (unit[j as usize] as usize, detrended[j as usize]);
                    let sign = (yj > yi) as i64 - (yj < yi) as i64;
                    if uj == ui {
                        // Inside a group of cycles: counted as independent.
                        continue;
                    }
                    unit_scores[ui * m + uj] += sign;
                }
            }
            for run in season.chunk_by(|a, b| unit[a.1 as usize] == unit[b.1 as usize]) {
                within18 += var18(run.len() as i64);
            }
        }
    }
    permutation_variance(unit_scores, m, unit_sums) + within18 as f64 / 18.0
}

/// The variance of `S = Σ_{u<v} D_uv` over all orders of `m` units, where
/// `scores[u·m + v]` (`u < v`) is `D_uv`, the score of unit `v` against unit
/// `u` (antisymmetric: `D_vu = −D_uv`): `(Σ_{u<v} D_uv² + Σ_u B_u²)/3` with
/// `B_u = Σ_{v>u} D_uv − Σ_{v<u} D_vu` (Daniels 1944, for two antisymmetric
/// score matrices, one of them `sgn(v − u)`).
fn permutation_variance(scores: &[i64], m: usize, sums: &mut Vec<i64>) -> f64 {
    sums.clear();
    sums.resize(m, 0);
    let mut sum_d2 = 0f64;
    for u in 0..m {
        for v in u + 1..m {
            let d = scores[u * m + v];
            sum_d2 += (d * d) as f64;
            sums[u] += d;
            sums[v] -= d;
        }
    }
    let sum_b2: f64 = sums.iter().map(|&b| (b * b) as f64).sum();
    (sum_d2 + sum_b2) / 3.0
}

/// `Σ_{r in right} (#left < r − #left > r)` for sorted slices.
fn sorted_score<T: PartialOrd>(left: &[T], right: &[T]) -> i64 {
    let (mut below, mut not_above) = (0usize, 0usize);
    let mut s = 0i64;
    for r in right {
        while below < left.len() && left[below] < *r {
            below += 1;
        }
        not_above = not_above.max(below);
        while not_above < left.len() && left[not_above] <= *r {
            not_above += 1;
        }
        s += below as i64 - (left.len() - not_above) as i64;
    }
    s
}

/// The (seasonal) Theil–Sen slope of `values` against `steps` over the
/// seasons of the last [`mann_kendall`] call on the same data, with the
/// rank-based interval at `z_conf` (the two-sided normal quantile).
///
/// `None` without a pair; `steps` must be strictly increasing.
pub(crate) fn theil_sen(
    steps: &[u64],
    values: &[u64],
    var_s: f64,
    z_conf: f64,
    scratch: &mut Scratch,
) -> Option<SenResult> {
    let slopes = &mut scratch.slopes;
    slopes.clear();
    for season in scratch.keyed.chunk_by(|a, b| a.0 == b.0) {
        for (a, &(_, i)) in season.iter().enumerate() {
            let (ti, vi) = (steps[i as usize], values[i as usize] as f64);
            for &(_, j) in &season[a + 1..] {
                let dt = (steps[j as usize] - ti) as f64;
                slopes.push((values[j as usize] as f64 - vi) / dt);
            }
        }
    }
    let count = slopes.len();
    if count == 0 {
        return None;
    }
    let slope = median_in_place(slopes);
    // Gilbert (1987): C = z·√Var(S), M1 = (N' − C)/2, M2 = (N' + C)/2; the
    // limits are the M1-th and the (M2 + 1)-th smallest slopes (1-based).
    let c = z_conf * var_s.max(0.0).sqrt();
    let n = count as f64;
    let rank = |r: f64| (r.round().max(1.0).min(n) as usize) - 1;
    let low = *slopes
        .select_nth_unstable_by(rank((n - c) / 2.0), f64::total_cmp)
        .1;
    let high = *slopes
        .select_nth_unstable_by(rank((n + c) / 2.0 + 1.0), f64::total_cmp)
        .1;
    Some(SenResult { slope, low, high })
}

/// `S` of `vals` (in time order) and the tie term `Σ t(t−1)(2t+5)` over
/// groups of `t` equal values. O(n log n): a bottom-up merge sort counts, for
/// each element of a right (later) run, the elements of the left (earlier)
/// run below and above it.
fn s_and_ties(vals: &[u64], a: &mut Vec<u64>, b: &mut Vec<u64>) -> (i64, i64) {
    let n = vals.len();
    let mut s = 0i64;
    a.clear();
    a.extend_from_slice(vals);
    if n <= 32 {
        for (i, &x) in vals.iter().enumerate() {
            for &y in &vals[i + 1..] {
                s += (y > x) as i64 - (y < x) as i64;
            }
        }
        a.sort_unstable();
    } else {
        b.clear();
        b.resize(n, 0);
        let mut width = 1;
        while width < n {
            for lo in (0..n).step_by(2 * width) {
                let mid = (lo + width).min(n);
                let hi = (lo + 2 * width).min(n);
                s += merge_count(&a[lo..mid], &a[mid..hi], &mut b[lo..hi]);
            }
            std::mem::swap(a, b);
            width *= 2;
        }
    }
    let mut ties = 0i64;
    for run in a.chunk_by(|x, y| x == y) {
        let t = run.len() as i64;
        ties += t * (t - 1) * (2 * t + 5);
    }
    (s, ties)
}

/// Merges the sorted runs `left` (earlier samples) and `right` (later) into
/// `out` and returns `Σ_{r in right} (#left < r − #left > r)`.
fn merge_count(left: &[u64], right: &[u64], out: &mut [u64]) -> i64 {
    let s = sorted_score(left, right);
    let (mut i, mut j) = (0, 0);
    for slot in out.iter_mut() {
        if j >= right.len() || (i < left.len() && left[i] <= right[j]) {
            *slot = left[i];
            i += 1;
        } else {
            *slot = right[j];
            j += 1;
        }
    }
    s
}

/// The median of `v` (mean of the two middle values for even lengths);
/// reorders `v`. 0 for an empty slice.
fn median_in_place(v: &mut [f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    let (lower, &mut mid, _) = v.select_nth_unstable_by(n / 2, f64::total_cmp);
    if n % 2 == 1 {
        mid
    } else {
        let below = lower.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (below + mid) / 2.0
    }
}

/// `P(Z > z)` for a standard normal `Z`.
pub(crate) fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function (Numerical Recipes' Chebyshev fit,
/// fractional error below 1.2e-7 everywhere).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// The standard normal quantile `Φ⁻¹(p)` for `0 < p < 1` (Acklam's rational
/// approximation, relative error below 1.2e-9).
pub(crate) fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.024_25;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::workload::SplitMix64;

    fn brute_s(v: &[u64]) -> i64 {
        let mut s = 0;
        for i in 0..v.len() {
            for j in i + 1..v.len() {
                s += (v[j] > v[i]) as i64 - (v[j] < v[i]) as i64;
            }
        }
        s
    }

    #[test]
    fn merge_sort_s_equals_the_double_loop() {
        let mut rng = SplitMix64::new(1);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for n in [0, 1, 2, 31, 32, 33, 64, 100, 257, 1000] {
            for distinct in [3, 50, u64::MAX] {
                let v: Vec<u64> = (0..n).map(|_| rng.next_u64() % distinct).collect();
                let (s, ties) = s_and_ties(&v, &mut a, &mut b);
                assert_eq!(s, brute_s(&v), "n {n}, distinct {distinct}");
                let mut sorted = v.clone();
                sorted.sort_unstable();
                let expected: i64 = sorted
                    .chunk_by(|x, y| x == y)
                    .map(|r| var18(r.len() as i64))
                    .sum();
                assert_eq!(ties, expected);
            }
        }
    }

    #[test]
    fn tie_corrected_variance_matches_the_textbook_example() {
        // n = 6 with one pair tied: [n(n−1)(2n+5) − 2·1·9]/18 = (510 − 18)/18.
        let mut sc = Scratch::default();
        let v = [1u64, 2, 2, 5, 4, 6];
        let steps: Vec<u64> = (0..6).collect();
        let r = mann_kendall(&steps, &v, 5.0, true, f64::INFINITY, &mut sc);
        assert_eq!(r.s, brute_s(&v));
        assert_eq!(r.var_independent, (510.0 - 18.0) / 18.0);
        assert_eq!(r.z, (r.s - 1) as f64 / r.var_independent.sqrt());
    }

    /// Daniels' closed form against the variance over all `m!` orders.
    #[test]
    fn permutation_variance_equals_brute_force() {
        let mut rng = SplitMix64::new(2);
        for m in 2..=6 {
            // Antisymmetric scores from random unit "contents".
            let d: Vec<Vec<i64>> = (0..m)
                .map(|_| (0..m).map(|_| (rng.next_u64() % 9) as i64 - 4).collect())
                .collect();
            let score = |u: usize, v: usize| d[u][v] - d[v][u];
            let mut flat = vec![0i64; m * m];
            for u in 0..m {
                for v in u + 1..m {
                    flat[u * m + v] = score(u, v);
                }
            }
            let closed = permutation_variance(&flat, m, &mut Vec::new());
            // All orders: position p holds unit order[p].
            let mut order: Vec<usize> = (0..m).collect();
            let (mut sum, mut sum2, mut count) = (0f64, 0f64, 0f64);
            permute(&mut order, 0, &mut |o: &[usize]| {
                let mut s = 0i64;
                for p in 0..m {
                    for q in p + 1..m {
                        s += score(o[p], o[q]);
                    }
                }
                sum += s as f64;
                sum2 += (s * s) as f64;
                count += 1.0;
            });
            let var = sum2 / count - (sum / count).powi(2);
            assert!((closed - var).abs() < 1e-9, "m {m}: {closed} vs {var}");
        }
    }

    fn permute(v: &mut [usize], k: usize, f: &mut impl FnMut(&[usize])) {
        if k == v.len() {
            f(v);
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }

    #[test]
    fn normal_helpers_match_tables() {
        for (p, z) in [
            (0.975, 1.959_964),
            (0.5, 0.0),
            (1.0 - 3e-5, 4.012_810),
            (0.01, -2.326_348),
        ] {
            assert!((normal_quantile(p) - z).abs() < 1e-5, "{p}");
        }
        for (z, q) in [
            (0.0, 0.5),
            (1.959_964, 0.025),
            (4.0, 3.167e-5),
            (-1.0, 0.841_345),
        ] {
            assert!(
                ((normal_sf(z) - q) / q).abs() < 1e-3,
                "{z}: {}",
                normal_sf(z)
            );
        }
    }

    #[test]
    fn releases_start_cycles_and_phases_align() {
        // Noise-free sawtooth, period 10, starting mid-cycle at phase 4.
        let v: Vec<u64> = (4..64u64).map(|t| 1000 + 10 * (t % 10)).collect();
        let mut sc = Scratch::default();
        let al = align(&v, 5.0, false, &mut sc);
        assert_eq!((al.releases, al.shortest_cycle, al.units), (6, Some(10), 7));
        // Every season holds equal values: the sawtooth cancels.
        for season in sc.keyed.chunk_by(|a, b| a.0 == b.0) {
            let first = v[season[0].1 as usize];
            assert!(
                season.iter().all(|&(_, i)| v[i as usize] == first),
                "{season:?}"
            );
        }
        // A sliding window leaves the partial first cycle out; a window that
        // starts the series counts its phases from its start.
        assert_eq!(sc.keyed.len(), 54);
        align(&v, 5.0, true, &mut sc);
        assert_eq!(sc.keyed.len(), 60);
        assert!(sc.keyed.contains(&(0, 0)));
    }
}
