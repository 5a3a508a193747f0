//! Actors: `ActorCore` steps a [`VecEnv`] ε-greedily with a network and
//! feeds the n-step tracks; `ActorPool` runs cores on background threads
//! with their own copy of the weights ([`ParamSnapshot`]), owned by a handle
//! that stops and joins them on drop.
//!
//! # Sharing parameters
//! The learner publishes a snapshot every
//! [`actor_sync_every_updates`](crate::LearnerConfig::actor_sync_every_updates)
//! updates: a deep copy of every online variable (`Tensor::copy`), stored
//! under a mutex with a version number. Each actor thread owns its own
//! `VarMap` and [`AgentNet`]; before each vectorised step it compares the
//! version with the one it loaded and, when newer, copies the tensors into
//! its variables (`Var::set`). The learner never waits for an actor, and an
//! actor never sees a half-updated network.
//!
//! # Pace
//! Actor threads keep the transitions they generate within
//! `learning_starts + updates · transitions_per_update + slack` (slack:
//! what the n-step tracks may hold back), so the replay ratio is the
//! configured one whichever side is faster.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gm_buffers::{PrioritizedReplayBuffer, SharedReplay};
use gm_market::{Action, EnvConfig, MarketData, VecEnv, OBS_DIM};
use gm_models::ForwardCtx;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::replay::{NStep, NStepTrack, TransitionSink};
use crate::agent::{AgentConfig, AgentNet, ObsBatch};
use crate::{Error, Result};

/// The greedy actions of `net` for `n` flat observations.
pub(crate) fn greedy_actions(
    net: &AgentNet,
    obs: &[f32],
    n: usize,
    device: &Device,
) -> Result<Vec<u32>> {
    let batch = ObsBatch::from_flat(obs, n, device)?;
    let q = net.q_values(&batch, &mut ForwardCtx::eval())?;
    Ok(q.argmax(1)?.to_vec1::<u32>()?)
}

/// A finished episode: its total (unscaled) reward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct EpisodeEnd {
    pub env: usize,
    pub pnl: f64,
}

/// A vectorised environment, its n-step tracks and the ε-greedy stream.
///
/// All environments of a [`VecEnv`] run episodes of the same length in
/// lockstep, so after `steps` vectorised steps every environment is in
/// episode round `steps / episode_bars`, whose seeds are those of a
/// `VecEnv` built with `env_seed + round · n`; the actions of the current
/// round ([`round_actions`](Self::round_actions)) are all it takes to
/// rebuild the state exactly ([`ActorCore::restore`]).
#[derive(Debug)]
pub(crate) struct ActorCore {
    data: Arc<MarketData>,
    env_cfg: EnvConfig,
    env_seed: u64,
    venv: VecEnv,
    tracks: Vec<NStepTrack>,
    rng: ChaCha8Rng,
    reward_scale: f64,
    steps: u64,
    round_actions: Vec<u8>,
    actions: Vec<Action>,
    terminal: Vec<f32>,
}

impl ActorCore {
    pub(crate) fn new(
        data: Arc<MarketData>,
        env_cfg: EnvConfig,
        num_envs: usize,
        env_seed: u64,
        rng: ChaCha8Rng,
        nstep: NStep,
        reward_scale: f64,
    ) -> Result<Self> {
        let venv = VecEnv::new(data.clone(), env_cfg, num_envs, env_seed)?;
        let mut tracks = vec![NStepTrack::new(nstep); num_envs];
        for (i, t) in tracks.iter_mut().enumerate() {
            t.begin(&venv.observations()[i * OBS_DIM..(i + 1) * OBS_DIM]);
        }
        Ok(Self {
            data,
            env_cfg,
            env_seed,
            venv,
            tracks,
            rng,
            reward_scale,
            steps: 0,
            round_actions: Vec::with_capacity(env_cfg.episode_bars * num_envs),
            actions: vec![Action::Flat; num_envs],
            terminal: vec![0.0; OBS_DIM],
        })
    }

    /// Rebuilds the core after `steps` vectorised steps whose current
    /// round took `round_actions` (env-major per step), replaying them
    /// without storing anything; the ε-greedy stream is `rng`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn restore(
        data: Arc<MarketData>,
        env_cfg: EnvConfig,
        num_envs: usize,
        env_seed: u64,
        rng: ChaCha8Rng,
        nstep: NStep,
        reward_scale: f64,
        steps: u64,
        round_actions: &[u8],
    ) -> Result<Self> {
        let bars = env_cfg.episode_bars as u64;
        let round = steps / bars;
        let offset = (steps % bars) as usize;
        if round_actions.len() != offset * num_envs {
            return Err(Error::config(
                "round_actions",
                round_actions.len(),
                format!("{offset} steps x {num_envs} environments"),
            ));
        }
        let seed = env_seed.wrapping_add(round.wrapping_mul(num_envs as u64));
        let mut core = Self::new(data, env_cfg, num_envs, seed, rng, nstep, reward_scale)?;
        core.env_seed = env_seed;
        core.steps = round * bars;
        let mut discard = super::replay::Discard;
        for step in round_actions.chunks(num_envs) {
            for (a, &i) in core.actions.iter_mut().zip(step) {
                *a = Action::from_index(i as usize)?;
            }
            core.apply(&mut discard)?;
        }
        core.steps = steps;
        Ok(core)
    }

    /// Vectorised steps taken.
    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }

    /// Environments.
    pub(crate) fn num_envs(&self) -> usize {
        self.venv.len()
    }

    /// The ε-greedy random stream.
    pub(crate) fn rng(&self) -> &ChaCha8Rng {
        &self.rng
    }

    /// The seed of the first round.
    pub(crate) fn env_seed(&self) -> u64 {
        self.env_seed
    }

    /// The actions of the current episode round, env-major per step.
    pub(crate) fn round_actions(&self) -> &[u8] {
        &self.round_actions
    }

    /// One vectorised step: ε-greedy actions (`net` is only run when some
    /// environment acts greedily), the environments step, the tracks take
    /// the results and emit into `sink`. Returns the episodes that ended.
    pub(crate) fn step(
        &mut self,
        net: &AgentNet,
        device: &Device,
        epsilon: f64,
        sink: &mut dyn TransitionSink,
    ) -> Result<Vec<EpisodeEnd>> {
        let n = self.venv.len();
        // One uniform per environment decides explore/exploit, then one
        // draw per explorer picks its action: a fixed pattern per step.
        let mut explore = vec![false; n];
        for (e, a) in explore.iter_mut().zip(self.actions.iter_mut()) {
            *e = self.rng.random::<f64>() < epsilon;
            if *e {
                *a = Action::ALL[self.rng.random_range(0..3)];
            }
        }
        if explore.iter().any(|e| !e) {
            let greedy = greedy_actions(net, self.venv.observations(), n, device)?;
            for ((a, &e), &g) in self.actions.iter_mut().zip(&explore).zip(&greedy) {
                if !e {
                    *a = Action::from_index(g as usize)?;
                }
            }
        }
        self.apply(sink)
    }

    /// Steps the environments with `self.actions` and feeds the tracks.
    fn apply(&mut self, sink: &mut dyn TransitionSink) -> Result<Vec<EpisodeEnd>> {
        self.round_actions
            .extend(self.actions.iter().map(|a| a.index() as u8));
        let steps = self.venv.step(&self.actions)?.to_vec();
        let mut ended = Vec::new();
        for (i, s) in steps.iter().enumerate() {
            let a = self.actions[i].index() as i64;
            let r = s.reward * self.reward_scale;
            let next = &self.venv.observations()[i * OBS_DIM..(i + 1) * OBS_DIM];
            if s.done {
                // The VecEnv already shows the next episode's first
                // observation: the final one comes from the data.
                self.data.observation(s.info.bar, &mut self.terminal)?;
                self.tracks[i].push(a, r, &self.terminal, true, sink)?;
                self.tracks[i].begin(next);
                ended.push(EpisodeEnd {
                    env: i,
                    pnl: s.info.pnl,
                });
            } else {
                self.tracks[i].push(a, r, next, false, sink)?;
            }
        }
        self.steps += 1;
        // Every environment ends its episode on the same step.
        if self.steps.is_multiple_of(self.env_cfg.episode_bars as u64) {
            debug_assert_eq!(ended.len(), self.venv.len());
            self.round_actions.clear();
        }
        Ok(ended)
    }
}

/// Online weights published for actors: a version and deep copies of the
/// variables by name.
#[derive(Debug, Default)]
pub struct ParamSnapshot {
    version: AtomicU64,
    tensors: Mutex<Vec<(String, Tensor)>>,
}

impl ParamSnapshot {
    /// Copies every variable of `varmap` (a deep copy, so later updates of
    /// the learner do not show through) and bumps the version.
    pub fn publish(&self, varmap: &VarMap) -> Result<()> {
        let copies = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| Error::config("varmap", "poisoned", "an unpoisoned lock"))?;
            data.iter()
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
                .collect::<Result<Vec<_>>>()?
        };
        *self
            .tensors
            .lock()
            .map_err(|_| Error::Stopped("parameter snapshot lock poisoned".into()))? = copies;
        self.version.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The version published last (0 = none yet).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Sets the variables of `varmap` to the snapshot; returns its version.
    pub fn load_into(&self, varmap: &VarMap) -> Result<u64> {
        let tensors = self
            .tensors
            .lock()
            .map_err(|_| Error::Stopped("parameter snapshot lock poisoned".into()))?;
        let version = self.version();
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::config("varmap", "poisoned", "an unpoisoned lock"))?;
        for (name, t) in tensors.iter() {
            if let Some(v) = data.get(name) {
                v.set(t)?;
            }
        }
        Ok(version)
    }
}

/// Counters shared by the learner and the actor threads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub stop: AtomicBool,
    /// Gradient updates done by the learner.
    pub updates: AtomicU64,
    /// Transitions generated (environment steps, all actors).
    pub transitions: AtomicU64,
    /// The first error of an actor thread.
    pub error: Mutex<Option<String>>,
}

/// What an actor thread needs.
#[derive(Debug, Clone)]
pub(crate) struct ActorSpec {
    pub data: Arc<MarketData>,
    pub env: EnvConfig,
    pub agent: AgentConfig,
    pub num_envs: usize,
    pub env_seed: u64,
    pub rng_seed: u64,
    pub nstep: NStep,
    pub reward_scale: f64,
    pub epsilon: super::EpsilonSchedule,
    /// Transitions the actors may run ahead of `updates · per_update`.
    pub allowance: u64,
    pub per_update: u64,
    pub writer_chunk: usize,
}

/// Builds an [`ActorPool`].
#[derive(Debug)]
pub(crate) struct ActorPoolBuilder {
    pub specs: Vec<ActorSpec>,
    pub replay: SharedReplay<PrioritizedReplayBuffer>,
    pub snapshot: Arc<ParamSnapshot>,
    pub shared: Arc<Shared>,
    pub episodes: SyncSender<EpisodeEnd>,
}

/// Handle to the actor threads: dropping it stops and joins them.
#[derive(Debug)]
pub(crate) struct ActorPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl ActorPoolBuilder {
    pub(crate) fn spawn(self) -> Result<ActorPool> {
        let mut pool = ActorPool {
            shared: self.shared.clone(),
            threads: Vec::new(),
        };
        for (i, spec) in self.specs.into_iter().enumerate() {
            let replay = self.replay.clone();
            let snapshot = self.snapshot.clone();
            let shared = self.shared.clone();
            let episodes = self.episodes.clone();
            let h = std::thread::Builder::new()
                .name(format!("gm-actor-{i}"))
                .spawn(move || {
                    if let Err(e) = run_actor(spec, replay, &snapshot, &shared, &episodes) {
                        tracing::error!(target: "gm_train", actor = i, error = %e, "actor stopped");
                        let mut slot = shared.error.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert_with(|| format!("actor {i}: {e}"));
                    }
                })
                .map_err(|e| Error::Stopped(format!("could not start actor {i}: {e}")))?;
            pool.threads.push(h);
        }
        Ok(pool)
    }
}

impl ActorPool {
    /// The first actor error, if any.
    pub(crate) fn error(&self) -> Option<String> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for ActorPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

fn run_actor(
    spec: ActorSpec,
    replay: SharedReplay<PrioritizedReplayBuffer>,
    snapshot: &ParamSnapshot,
    shared: &Shared,
    episodes: &SyncSender<EpisodeEnd>,
) -> Result<()> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let net = AgentNet::new(
        &spec.agent,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    let mut loaded = 0;
    let mut writer = replay.writer(spec.writer_chunk);
    let mut core = ActorCore::new(
        spec.data.clone(),
        spec.env,
        spec.num_envs,
        spec.env_seed,
        ChaCha8Rng::seed_from_u64(spec.rng_seed),
        spec.nstep,
        spec.reward_scale,
    )?;
    let n = core.num_envs() as u64;
    while !shared.stop.load(Ordering::Acquire) {
        let v = snapshot.version();
        if v != loaded {
            loaded = snapshot.load_into(&varmap)?;
        }
        let done = shared.transitions.load(Ordering::Acquire);
        let allowed = spec.allowance + shared.updates.load(Ordering::Acquire) * spec.per_update;
        if done >= allowed {
            std::thread::park_timeout(Duration::from_millis(1));
            continue;
        }
        let eps = spec.epsilon.at(done);
        let ended = core.step(&net, &device, eps, &mut writer)?;
        shared.transitions.fetch_add(n, Ordering::AcqRel);
        for e in ended {
            match episodes.try_send(e) {
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => return Ok(()),
            }
        }
    }
    Ok(())
}

/// Drains finished episodes without blocking.
pub(crate) fn drain(rx: &Receiver<EpisodeEnd>, out: &mut Vec<EpisodeEnd>) {
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
}
