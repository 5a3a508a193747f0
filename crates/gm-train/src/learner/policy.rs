//! [`GreedyPolicy`]: a network's greedy policy as a gm-market
//! [`Policy`], so [`gm_market::evaluate`] can score it against the
//! baselines.

use std::sync::Arc;

use candle_core::Device;
use gm_market::{Action, MarketData, Policy, TradingEnv, OBS_DIM};

use super::actors::greedy_actions;
use crate::agent::AgentNet;
use crate::Result;

/// The greedy action (`argmax_a Q(s, a)`) of a network.
///
/// The agent's choice depends on the observation only, and an observation
/// is a function of the bar, so for the data it was built for the policy
/// is precomputed for every bar in large batches (an episode is then a
/// table lookup per step, which makes evaluating hundreds of episodes
/// cheap). On other data it runs the network one observation at a time.
/// A network error inside [`Policy::act`] (which cannot return one) is
/// logged and answered with `Flat`.
#[derive(Debug, Clone)]
pub struct GreedyPolicy {
    net: AgentNet,
    data: Arc<MarketData>,
    /// Action index per bar (`u8::MAX` before the first observable bar).
    table: Vec<u8>,
    device: Device,
}

impl GreedyPolicy {
    /// The greedy policy of `net` on `data`, precomputed in batches of
    /// `batch` observations.
    pub fn new(net: &AgentNet, data: Arc<MarketData>, batch: usize) -> Result<Self> {
        let device = net.device().clone();
        let batch = batch.max(1);
        let mut table = vec![u8::MAX; data.len()];
        let first = data.first_ready();
        let mut obs = vec![0f32; batch * OBS_DIM];
        let mut t = first;
        while t < data.len() {
            let n = batch.min(data.len() - t);
            for i in 0..n {
                data.observation(t + i, &mut obs[i * OBS_DIM..(i + 1) * OBS_DIM])?;
            }
            let a = greedy_actions(net, &obs[..n * OBS_DIM], n, &device)?;
            for (i, &a) in a.iter().enumerate() {
                table[t + i] = a as u8;
            }
            t += n;
        }
        Ok(Self {
            net: net.clone(),
            data,
            table,
            device,
        })
    }

    /// The precomputed action at bar `t` of the policy's own data.
    pub fn action_at(&self, t: usize) -> Option<Action> {
        self.table
            .get(t)
            .and_then(|&a| Action::from_index(a as usize).ok())
    }

    /// Fractions of the observable bars on which the policy is short, flat
    /// and long.
    pub fn action_shares(&self) -> [f64; 3] {
        let mut c = [0usize; 3];
        for &a in &self.table {
            if let Some(x) = c.get_mut(a as usize) {
                *x += 1;
            }
        }
        let n = c.iter().sum::<usize>().max(1) as f64;
        c.map(|x| x as f64 / n)
    }
}

impl Policy for GreedyPolicy {
    fn act(&mut self, env: &TradingEnv) -> Action {
        if Arc::ptr_eq(env.data(), &self.data) {
            if let Some(a) = self.action_at(env.bar()) {
                return a;
            }
        }
        let r = greedy_actions(&self.net, env.observation(), 1, &self.device)
            .and_then(|a| Ok(Action::from_index(a[0] as usize)?));
        match r {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(target: "gm_train", error = %e, "greedy policy failed; acting flat");
                Action::Flat
            }
        }
    }
}
