//! The learner's replay schema and the n-step transition builder
//! (`NStepTrack`) that turns one environment's steps into n-step
//! transitions and hands them to the buffer in an order the buffer's
//! sliding-window de-duplication can exploit.
//!
//! # Schema ([`replay_schema`])
//!
//! | field | kind | dtype | shape | holds |
//! |---|---|---|---|---|
//! | `structure` | window | f32 | `[48, 8]` | structure window of `s_t` (and `next_structure` of `s_{t+k}`) |
//! | `tactical` | window | f32 | `[60, 7]` | tactical window |
//! | `regime` | window | f32 | `[21, 8]` | regime window |
//! | `lvn` | obs | f32 | `[5]` | LVN vector |
//! | `action` | plain | i64 | `[]` | index in [`gm_market::Action::ALL`] |
//! | `reward` | plain | f32 | `[]` | `Σ_{i<k} γ^i · scale · r_{t+i}`: the scaled n-step return |
//! | `done` | plain | bool | `[]` | `s_{t+k}` is terminal (no bootstrap) |
//! | `discount` | plain | f32 | `[]` | `γ^k`, the bootstrap discount |
//!
//! `k = min(n, steps left in the episode)`: near an episode end the return
//! is cut at the end and bootstraps from the last observation with `γ^k`.
//!
//! # Order of the adds
//!
//! The buffer stores each observation stream once and recognises a new
//! observation only when it continues the *newest* stored rows. A one-step
//! transition stream does that naturally (`next_obs` of step `t` is `obs`
//! of step `t + 1`); an n-step stream does not: after `(s_t, s_{t+n})` the
//! next transition's `s_{t+1}` lies *behind* the newest rows, and every add
//! would cost a whole window. So a track keeps the transitions of a
//! segment (up to [`replay_segment_steps`](crate::LearnerConfig::replay_segment_steps)
//! complete transitions, or the rest of an episode) and emits them in
//! residue classes: `t0, t0 + n, t0 + 2n, …`, then `t0 + 1, t0 + 1 + n, …`.
//! Inside a class the observation of each add is exactly the previous add's
//! next observation, so a window that slides one row per bar costs `n` rows
//! per transition plus one full window per class and segment: about
//! `n · (1 + window / segment)` rows instead of `window + n`.

use gm_buffers::{col, DType, FieldSpec, Schema};
use gm_market::{OBS_DIM, REGIME_ROWS, STRUCTURE_ROWS, TACTICAL_ROWS};

use crate::agent::OBS_PARTS;
use crate::Result;

/// Field and column names of the replay schema.
pub mod names {
    /// The structure window.
    pub const STRUCTURE: &str = "structure";
    /// The tactical window.
    pub const TACTICAL: &str = "tactical";
    /// The regime window.
    pub const REGIME: &str = "regime";
    /// The LVN vector.
    pub const LVN: &str = "lvn";
    /// The structure window of the n-step next observation.
    pub const NEXT_STRUCTURE: &str = "next_structure";
    /// The tactical window of the n-step next observation.
    pub const NEXT_TACTICAL: &str = "next_tactical";
    /// The regime window of the n-step next observation.
    pub const NEXT_REGIME: &str = "next_regime";
    /// The LVN vector of the n-step next observation.
    pub const NEXT_LVN: &str = "next_lvn";
    /// The action index (i64).
    pub const ACTION: &str = "action";
    /// The scaled n-step return (f32).
    pub const REWARD: &str = "reward";
    /// Whether the next observation is terminal (bool).
    pub const DONE: &str = "done";
    /// The bootstrap discount `γ^k` (f32).
    pub const DISCOUNT: &str = "discount";
}

/// The learner's replay schema (see the module docs): three de-duplicated
/// sliding windows, the LVN frame, and the plain n-step fields.
pub fn replay_schema() -> Result<Schema> {
    use gm_market::{LVN_DIM, REGIME_DIM, STRUCTURE_DIM, TACTICAL_DIM};
    Ok(Schema::new(vec![
        FieldSpec::window(
            names::STRUCTURE,
            DType::F32,
            &[STRUCTURE_ROWS, STRUCTURE_DIM],
        ),
        FieldSpec::window(names::TACTICAL, DType::F32, &[TACTICAL_ROWS, TACTICAL_DIM]),
        FieldSpec::window(names::REGIME, DType::F32, &[REGIME_ROWS, REGIME_DIM]),
        FieldSpec::obs(names::LVN, DType::F32, &[LVN_DIM]),
        FieldSpec::plain(names::ACTION, DType::I64, &[]),
        FieldSpec::plain(names::REWARD, DType::F32, &[]),
        FieldSpec::plain(names::DONE, DType::Bool, &[]),
        FieldSpec::plain(names::DISCOUNT, DType::F32, &[]),
    ])?)
}

/// Rows per observation stream a buffer of `capacity` transitions needs
/// when fed by `NStepTrack`s: the longest window (60 rows) costs at most
/// `n · (1 + 60 / segment) + 1` rows per transition, plus slack for the
/// windows of the newest, not yet complete class.
pub fn rows_per_stream(capacity: usize, n_step: usize, segment_steps: usize) -> usize {
    let w = TACTICAL_ROWS.max(STRUCTURE_ROWS).max(REGIME_ROWS);
    let per = n_step * (1 + w.div_ceil(segment_steps.max(1))) + 1;
    capacity
        .saturating_mul(per)
        .saturating_add(4 * w * (n_step + 1))
}

/// One n-step transition, ready to add.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transition<'a> {
    pub obs: &'a [f32],
    pub next: &'a [f32],
    pub action: i64,
    pub reward: f32,
    pub done: bool,
    pub discount: f32,
}

impl Transition<'_> {
    /// Passes the transition's columns, in schema order, to `f`.
    pub(crate) fn with_columns<R>(&self, f: impl FnOnce(&[gm_buffers::Column<'_>]) -> R) -> R {
        let [os, ot, or, ol] = split_obs(self.obs);
        let [ns, nt, nr, nl] = split_obs(self.next);
        let (a, rw, d, g) = ([self.action], [self.reward], [self.done], [self.discount]);
        f(&[
            col(os),
            col(ns),
            col(ot),
            col(nt),
            col(or),
            col(nr),
            col(ol),
            col(nl),
            col(&a),
            col(&rw),
            col(&d),
            col(&g),
        ])
    }
}

/// The four parts of a flat observation.
fn split_obs(o: &[f32]) -> [&[f32]; 4] {
    let [s, t, r, _] = OBS_PARTS;
    let (a, rest) = o.split_at(s);
    let (b, rest) = rest.split_at(t);
    let (c, d) = rest.split_at(r);
    [a, b, c, d]
}

/// Where a track's transitions go: the replay writer, or nowhere (when a
/// resumed run replays the steps it already stored).
pub(crate) trait TransitionSink {
    /// Stages one transition.
    fn add(&mut self, t: &Transition<'_>) -> Result<()>;
    /// Ends a segment: everything staged goes into the buffer.
    fn end_segment(&mut self) -> Result<()>;
}

impl<B: gm_buffers::Replay> TransitionSink for gm_buffers::Writer<B> {
    fn add(&mut self, t: &Transition<'_>) -> Result<()> {
        t.with_columns(|cols| gm_buffers::Writer::add(self, cols))?;
        Ok(())
    }
    fn end_segment(&mut self) -> Result<()> {
        Ok(self.flush()?)
    }
}

/// Drops every transition (replaying steps that are already stored).
#[derive(Debug, Default)]
pub(crate) struct Discard;

impl TransitionSink for Discard {
    fn add(&mut self, _: &Transition<'_>) -> Result<()> {
        Ok(())
    }
    fn end_segment(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The n-step parameters of a track.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NStep {
    pub n: usize,
    pub gamma: f64,
    pub segment_steps: usize,
    /// Whether the end of an episode is terminal (`done = true`, no
    /// bootstrap) rather than a time-limit truncation.
    pub terminal_at_end: bool,
}

/// One environment's steps since the oldest transition not yet emitted:
/// the observations `s_{t0} ..= s_t` and the actions and scaled rewards of
/// steps `t0 .. t`.
#[derive(Debug, Clone)]
pub(crate) struct NStepTrack {
    p: NStep,
    /// `(steps + 1) × OBS_DIM` floats.
    obs: Vec<f32>,
    actions: Vec<i64>,
    rewards: Vec<f64>,
}

impl NStepTrack {
    pub(crate) fn new(p: NStep) -> Self {
        Self {
            p,
            obs: Vec::with_capacity((p.segment_steps + p.n + 1) * OBS_DIM),
            actions: Vec::with_capacity(p.segment_steps + p.n),
            rewards: Vec::with_capacity(p.segment_steps + p.n),
        }
    }

    /// Starts an episode at observation `obs` (anything pending is dropped:
    /// call after [`push`](Self::push) reported the end).
    pub(crate) fn begin(&mut self, obs: &[f32]) {
        self.obs.clear();
        self.actions.clear();
        self.rewards.clear();
        self.obs.extend_from_slice(obs);
    }

    /// Steps held (transitions started, not yet emitted).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.actions.len()
    }

    fn obs_at(&self, j: usize) -> &[f32] {
        &self.obs[j * OBS_DIM..(j + 1) * OBS_DIM]
    }

    /// Records step `t`: `action`, its scaled `reward`, and the observation
    /// it led to (`next`: for the last step of an episode, the episode's
    /// final observation, not the next episode's first). Emits a segment
    /// into `sink` when enough transitions are complete or the episode
    /// ended; after an end the caller must [`begin`](Self::begin) the next
    /// episode.
    pub(crate) fn push(
        &mut self,
        action: i64,
        reward: f64,
        next: &[f32],
        episode_end: bool,
        sink: &mut dyn TransitionSink,
    ) -> Result<()> {
        self.actions.push(action);
        self.rewards.push(reward);
        self.obs.extend_from_slice(next);
        let steps = self.actions.len();
        if episode_end {
            self.emit(steps, true, sink)?;
            self.obs.clear();
            self.actions.clear();
            self.rewards.clear();
        } else {
            let complete = (steps + 1).saturating_sub(self.p.n);
            if complete >= self.p.segment_steps {
                self.emit(complete, false, sink)?;
                self.actions.drain(..complete);
                self.rewards.drain(..complete);
                self.obs.drain(..complete * OBS_DIM);
            }
        }
        Ok(())
    }

    /// Emits transitions `0..count` in residue classes mod n.
    fn emit(&self, count: usize, ended: bool, sink: &mut dyn TransitionSink) -> Result<()> {
        let steps = self.actions.len();
        let n = self.p.n;
        for class in 0..n.min(count) {
            for j in (class..count).step_by(n) {
                let k = n.min(steps - j);
                let mut ret = 0f64;
                let mut g = 1f64;
                for i in 0..k {
                    ret += g * self.rewards[j + i];
                    g *= self.p.gamma;
                }
                let done = ended && self.p.terminal_at_end && j + k == steps;
                sink.add(&Transition {
                    obs: self.obs_at(j),
                    next: self.obs_at(j + k),
                    action: self.actions[j],
                    reward: ret as f32,
                    done,
                    discount: g as f32,
                })?;
            }
        }
        sink.end_segment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects transitions as (obs tag, next tag, action, reward, done, discount).
    #[derive(Default)]
    struct Collect {
        items: Vec<(f32, f32, i64, f32, bool, f32)>,
        segments: usize,
    }

    impl TransitionSink for Collect {
        fn add(&mut self, t: &Transition<'_>) -> Result<()> {
            self.items
                .push((t.obs[0], t.next[0], t.action, t.reward, t.done, t.discount));
            Ok(())
        }
        fn end_segment(&mut self) -> Result<()> {
            self.segments += 1;
            Ok(())
        }
    }

    fn obs(tag: usize) -> Vec<f32> {
        vec![tag as f32; OBS_DIM]
    }

    #[test]
    fn n_step_returns_truncate_at_the_episode_end_and_come_in_residue_order() {
        let p = NStep {
            n: 3,
            gamma: 0.5,
            segment_steps: 4,
            terminal_at_end: false,
        };
        let mut tr = NStepTrack::new(p);
        let mut sink = Collect::default();
        tr.begin(&obs(0));
        // 7 steps, rewards 1, 2, 4, ... ; episode ends after step 6.
        for t in 0..7 {
            let r = (1u64 << t) as f64;
            tr.push(t as i64, r, &obs(t + 1), t == 6, &mut sink)
                .unwrap();
        }
        // First segment after 6 steps: 4 complete transitions (0..4) in
        // classes {0, 3}, {1}, {2}; then the end emits 4..7.
        assert_eq!(sink.segments, 2);
        let order: Vec<i64> = sink.items.iter().map(|i| i.2).collect();
        assert_eq!(order, [0, 3, 1, 2, 4, 5, 6]);
        for &(o, nx, a, r, d, g) in &sink.items {
            let j = a as usize;
            let k = 3.min(7 - j);
            assert_eq!(o, j as f32);
            assert_eq!(nx, (j + k) as f32, "next obs of {j}");
            let want: f64 = (0..k)
                .map(|i| 0.5f64.powi(i as i32) * (1u64 << (j + i)) as f64)
                .sum();
            assert_eq!(r, want as f32, "return of {j}");
            assert_eq!(g, 0.5f32.powi(k as i32));
            assert!(!d, "a time limit is not terminal");
        }
        assert_eq!(tr.pending(), 0);
    }

    #[test]
    fn a_terminal_end_marks_only_the_transitions_that_reach_it() {
        let p = NStep {
            n: 2,
            gamma: 1.0,
            segment_steps: 100,
            terminal_at_end: true,
        };
        let mut tr = NStepTrack::new(p);
        let mut sink = Collect::default();
        tr.begin(&obs(0));
        for t in 0..4 {
            tr.push(0, 1.0, &obs(t + 1), t == 3, &mut sink).unwrap();
        }
        let dones: Vec<(f32, bool)> = sink.items.iter().map(|i| (i.0, i.4)).collect();
        // classes: 0, 2 then 1, 3; transitions 2 (k = 2) and 3 (k = 1) reach the end
        assert_eq!(
            dones,
            [(0.0, false), (2.0, true), (1.0, false), (3.0, true)]
        );
    }

    #[test]
    fn schema_columns_line_up_with_transition_columns() {
        let schema = replay_schema().unwrap();
        let o = obs(1);
        let t = Transition {
            obs: &o,
            next: &o,
            action: 2,
            reward: 0.5,
            done: false,
            discount: 0.9,
        };
        t.with_columns(|cols| {
            assert_eq!(cols.len(), schema.columns().len());
            for (c, s) in cols.iter().zip(schema.columns()) {
                assert_eq!(c.len(), s.numel, "{}", s.name);
                assert_eq!(c.dtype(), s.dtype, "{}", s.name);
            }
        });
        assert!(rows_per_stream(1000, 3, 96) >= 1000 * 3 * 2);
    }
}
