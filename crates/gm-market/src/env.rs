//! The trading environment: [`TradingEnv`] (one), [`VecEnv`] (N stepped
//! together for actors) and the baselines tests and reports compare against
//! ([`BuyAndHold`], [`RandomPolicy`], [`RegimeOracle`]).
//!
//! # Dynamics
//! An episode covers `episode_bars` consecutive bars of a [`MarketData`],
//! starting at a bar drawn from the seed among those with an observation.
//! At bar `t` the agent sees the observation of bar `t` (bars `..=t` only)
//! and chooses a position `p' ∈ {−1, 0, +1}` (short, flat, long — one unit);
//! the step then moves to bar `t + 1` and pays
//!
//! ```text
//! reward = p' · (close[t+1] / close[t] − 1) − cost_bps / 10 000 · |p' − p|
//! ```
//!
//! where `p` is the position held before. The episode ends after
//! `episode_bars` steps (`done`); a position left open is not closed (no
//! final cost). Rewards are fractional returns of one unit of notional,
//! `info.pnl` their running sum.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::pipeline::{MarketData, OBS_DIM};
use crate::{Error, Regime, Result};

/// One unit short, flat, or one unit long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Position −1.
    Short,
    /// Position 0.
    Flat,
    /// Position +1.
    Long,
}

impl Action {
    /// All actions, in index order (the Q-head's output order).
    pub const ALL: [Action; 3] = [Action::Short, Action::Flat, Action::Long];

    /// The position this action holds.
    pub fn position(self) -> i8 {
        match self {
            Action::Short => -1,
            Action::Flat => 0,
            Action::Long => 1,
        }
    }

    /// Index in [`Action::ALL`].
    pub fn index(self) -> usize {
        (self.position() + 1) as usize
    }

    /// The action of index `i` (0, 1, 2), or an error.
    pub fn from_index(i: usize) -> Result<Self> {
        Action::ALL
            .get(i)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("action index {i} is not 0, 1 or 2")))
    }
}

/// Settings of a [`TradingEnv`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnvConfig {
    /// Steps per episode (default 288: one day of 5-minute bars).
    pub episode_bars: usize,
    /// Cost per unit of position change, in basis points (default 1.0).
    pub cost_bps: f64,
}

impl Default for EnvConfig {
    fn default() -> Self {
        Self {
            episode_bars: 288,
            cost_bps: 1.0,
        }
    }
}

impl EnvConfig {
    /// Checks ranges; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.episode_bars == 0 {
            return Err(Error::config("episode_bars", 0, "at least 1"));
        }
        if !(self.cost_bps >= 0.0 && self.cost_bps.is_finite()) {
            return Err(Error::config(
                "cost_bps",
                self.cost_bps,
                "a finite value >= 0",
            ));
        }
        Ok(())
    }
}

/// What a step reports besides the observation and reward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Sum of this episode's rewards.
    pub pnl: f64,
    /// Position held after the step.
    pub position: i8,
    /// The planted regime of the new bar, when the data is synthetic.
    pub regime: Option<Regime>,
    /// Index of the new bar in the data.
    pub bar: usize,
    /// Close of the new bar.
    pub price: f64,
    /// The cost paid in this step (already in the reward).
    pub cost: f64,
}

/// The result of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// The step's reward.
    pub reward: f64,
    /// Whether the episode ended with this step.
    pub done: bool,
    /// Details.
    pub info: StepInfo,
}

/// One trading environment over shared [`MarketData`]; see the module docs.
#[derive(Debug, Clone)]
pub struct TradingEnv {
    data: Arc<MarketData>,
    cfg: EnvConfig,
    rng: ChaCha8Rng,
    t: usize,
    end: usize,
    position: i8,
    pnl: f64,
    obs: Vec<f32>,
    started: bool,
}

impl TradingEnv {
    /// An environment over `data`; call [`reset`](Self::reset) first.
    /// Fails when the data has fewer observable bars than an episode needs.
    pub fn new(data: Arc<MarketData>, cfg: EnvConfig) -> Result<Self> {
        cfg.validate()?;
        let usable = data.len().saturating_sub(data.first_ready());
        if usable <= cfg.episode_bars {
            return Err(Error::NotEnoughData(format!(
                "{usable} observable bars, an episode of {} steps needs {}",
                cfg.episode_bars,
                cfg.episode_bars + 1
            )));
        }
        Ok(Self {
            data,
            cfg,
            rng: ChaCha8Rng::seed_from_u64(0),
            t: 0,
            end: 0,
            position: 0,
            pnl: 0.0,
            obs: vec![0.0; OBS_DIM],
            started: false,
        })
    }

    /// Starts an episode at a bar drawn with `seed`; returns the first
    /// observation. The same seed gives the same episode.
    pub fn reset(&mut self, seed: u64) -> Result<&[f32]> {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        let first = self.data.first_ready();
        let last_start = self.data.len() - 1 - self.cfg.episode_bars;
        self.t = self.rng.random_range(first..=last_start);
        self.start_at(self.t)
    }

    /// Starts an episode at bar `start` exactly.
    pub fn reset_at(&mut self, start: usize) -> Result<&[f32]> {
        let first = self.data.first_ready();
        let last_start = self.data.len() - 1 - self.cfg.episode_bars;
        if !(first..=last_start).contains(&start) {
            return Err(Error::Invalid(format!(
                "episode start {start} outside {first}..={last_start}"
            )));
        }
        self.start_at(start)
    }

    fn start_at(&mut self, start: usize) -> Result<&[f32]> {
        self.t = start;
        self.end = start + self.cfg.episode_bars;
        self.position = 0;
        self.pnl = 0.0;
        self.started = true;
        self.data.observation(self.t, &mut self.obs)?;
        Ok(&self.obs)
    }

    /// Takes `action` at the current bar and moves to the next one.
    pub fn step(&mut self, action: Action) -> Result<Step> {
        if !self.started || self.t >= self.end {
            return Err(Error::Invalid(
                "step() before reset() or after the episode ended".into(),
            ));
        }
        let bars = self.data.bars();
        let (c0, c1) = (bars[self.t].close, bars[self.t + 1].close);
        let p = action.position();
        let cost = self.cfg.cost_bps * 1e-4 * f64::from((p - self.position).abs());
        let reward = f64::from(p) * (c1 / c0 - 1.0) - cost;
        self.position = p;
        self.pnl += reward;
        self.t += 1;
        self.data.observation(self.t, &mut self.obs)?;
        Ok(Step {
            reward,
            done: self.t == self.end,
            info: StepInfo {
                pnl: self.pnl,
                position: p,
                regime: self.data.regime(self.t),
                bar: self.t,
                price: c1,
                cost,
            },
        })
    }

    /// The current observation ([`OBS_DIM`] floats).
    pub fn observation(&self) -> &[f32] {
        &self.obs
    }

    /// The current bar's index in the data.
    pub fn bar(&self) -> usize {
        self.t
    }

    /// The position held now.
    pub fn position(&self) -> i8 {
        self.position
    }

    /// The data.
    pub fn data(&self) -> &Arc<MarketData> {
        &self.data
    }

    /// The configuration.
    pub fn config(&self) -> &EnvConfig {
        &self.cfg
    }
}

/// N independent environments stepped together. A finished environment is
/// reset at once with the next seed of its own sequence, and its new first
/// observation is what `observations()` shows after that step (the step's
/// reward and `done` still belong to the finished episode), as vectorised
/// RL environments usually do.
#[derive(Debug)]
pub struct VecEnv {
    envs: Vec<TradingEnv>,
    seeds: Vec<u64>,
    obs: Vec<f32>,
    steps: Vec<Step>,
}

impl VecEnv {
    /// `n` environments over the same data, seeded `seed`, `seed + 1`, ….
    pub fn new(data: Arc<MarketData>, cfg: EnvConfig, n: usize, seed: u64) -> Result<Self> {
        if n == 0 {
            return Err(Error::config("n", 0, "at least one environment"));
        }
        let mut envs = Vec::with_capacity(n);
        let mut obs = vec![0.0; n * OBS_DIM];
        let seeds: Vec<u64> = (0..n as u64).map(|i| seed.wrapping_add(i)).collect();
        for (i, &s) in seeds.iter().enumerate() {
            let mut e = TradingEnv::new(data.clone(), cfg)?;
            obs[i * OBS_DIM..(i + 1) * OBS_DIM].copy_from_slice(e.reset(s)?);
            envs.push(e);
        }
        Ok(Self {
            envs,
            seeds,
            obs,
            steps: Vec::with_capacity(n),
        })
    }

    /// Environments.
    pub fn len(&self) -> usize {
        self.envs.len()
    }

    /// Never true for a constructed value.
    pub fn is_empty(&self) -> bool {
        self.envs.is_empty()
    }

    /// All observations, `[n, OBS_DIM]` row-major.
    pub fn observations(&self) -> &[f32] {
        &self.obs
    }

    /// Steps every environment with its action; returns the steps.
    pub fn step(&mut self, actions: &[Action]) -> Result<&[Step]> {
        if actions.len() != self.envs.len() {
            return Err(Error::Invalid(format!(
                "{} actions for {} environments",
                actions.len(),
                self.envs.len()
            )));
        }
        self.steps.clear();
        let n = self.seeds.len() as u64;
        for (i, (env, &a)) in self.envs.iter_mut().zip(actions).enumerate() {
            let s = env.step(a)?;
            let o = &mut self.obs[i * OBS_DIM..(i + 1) * OBS_DIM];
            if s.done {
                // each environment walks its own seed sequence: seed, seed + n, seed + 2n, ...
                self.seeds[i] = self.seeds[i].wrapping_add(n);
                o.copy_from_slice(env.reset(self.seeds[i])?);
            } else {
                o.copy_from_slice(env.observation());
            }
            self.steps.push(s);
        }
        Ok(&self.steps)
    }

    /// The environments.
    pub fn envs(&self) -> &[TradingEnv] {
        &self.envs
    }
}

/// A policy that picks an action from the environment's state.
pub trait Policy {
    /// The action at the environment's current bar.
    fn act(&mut self, env: &TradingEnv) -> Action;
}

/// Always long.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuyAndHold;

impl Policy for BuyAndHold {
    fn act(&mut self, _: &TradingEnv) -> Action {
        Action::Long
    }
}

/// Uniformly random actions from a seeded RNG.
#[derive(Debug, Clone)]
pub struct RandomPolicy(ChaCha8Rng);

impl RandomPolicy {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
}

impl Policy for RandomPolicy {
    fn act(&mut self, _: &TradingEnv) -> Action {
        Action::ALL[self.0.random_range(0..3)]
    }
}

/// Knows the planted regime of the current bar (synthetic data only): long
/// in `TrendingUp`, short in `TrendingDown`, flat otherwise. An upper
/// reference, not a strategy: real data has no regime labels (then it stays
/// flat).
#[derive(Debug, Clone, Copy, Default)]
pub struct RegimeOracle;

impl Policy for RegimeOracle {
    fn act(&mut self, env: &TradingEnv) -> Action {
        match env.data().regime(env.bar()) {
            Some(Regime::TrendingUp) => Action::Long,
            Some(Regime::TrendingDown) => Action::Short,
            _ => Action::Flat,
        }
    }
}

/// Returns of a policy over several episodes.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReturns {
    /// Each episode's total reward.
    pub episode_returns: Vec<f64>,
}

impl PolicyReturns {
    /// Mean episode return.
    pub fn mean(&self) -> f64 {
        self.episode_returns.iter().sum::<f64>() / self.episode_returns.len().max(1) as f64
    }

    /// Sample standard deviation of the episode returns.
    pub fn std(&self) -> f64 {
        let n = self.episode_returns.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self
            .episode_returns
            .iter()
            .map(|r| (r - m).powi(2))
            .sum::<f64>()
            / (n - 1) as f64)
            .sqrt()
    }
}

/// Runs `policy` for `episodes` episodes, episode `i` reset with `seed + i`.
pub fn evaluate(
    env: &mut TradingEnv,
    policy: &mut dyn Policy,
    episodes: usize,
    seed: u64,
) -> Result<PolicyReturns> {
    let mut episode_returns = Vec::with_capacity(episodes);
    for i in 0..episodes as u64 {
        env.reset(seed.wrapping_add(i))?;
        loop {
            let a = policy.act(env);
            let s = env.step(a)?;
            if s.done {
                episode_returns.push(s.info.pnl);
                break;
            }
        }
    }
    Ok(PolicyReturns { episode_returns })
}
