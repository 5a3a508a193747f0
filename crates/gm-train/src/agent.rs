//! [`AgentNet`]: the GrandModel agent — the four embedders feeding the
//! dueling Q-head — and [`ObsBatch`], a batch of gm-market observations
//! split into the embedders' inputs.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use gm_market::{
    LVN_DIM, OBS_DIM, REGIME_DIM, REGIME_ROWS, STRUCTURE_DIM, STRUCTURE_ROWS, TACTICAL_DIM,
    TACTICAL_ROWS,
};
use gm_models::{
    AgentHeads, Embedder, ForwardCtx, HeadsConfig, LvnConfig, LvnEmbedder, RegimeConfig,
    RegimeEmbedder, StructureConfig, StructureEmbedder, TacticalConfig, TacticalEmbedder,
};

use crate::{Error, Result};

/// Floats of each part of a flat observation, in order.
pub const OBS_PARTS: [usize; 4] = [
    STRUCTURE_ROWS * STRUCTURE_DIM,
    TACTICAL_ROWS * TACTICAL_DIM,
    REGIME_ROWS * REGIME_DIM,
    LVN_DIM,
];

/// The agent's architecture: one config per embedder and the heads.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Structure embedder (`[B, 48, 8]`).
    pub structure: StructureConfig,
    /// Tactical embedder (`[B, 60, 7]`).
    pub tactical: TacticalConfig,
    /// Regime embedder (`[B, 21, 8]`: 20 history rows, then the current one).
    pub regime: RegimeConfig,
    /// LVN embedder (`[B, 5]`).
    pub lvn: LvnConfig,
    /// Dueling Q-head and value head over the concatenated μ's.
    pub heads: HeadsConfig,
}

impl Default for AgentConfig {
    /// The full GrandModel agent (μ widths 64 + 48 + 16 + 8 = 136).
    fn default() -> Self {
        Self {
            structure: StructureConfig::default(),
            tactical: TacticalConfig::default(),
            regime: RegimeConfig::default(),
            lvn: LvnConfig::default(),
            heads: HeadsConfig::default(),
        }
    }
}

impl AgentConfig {
    /// A small agent with the same structure (every component present, far
    /// fewer units): for tests and quick learning runs on 2 cores.
    pub fn tiny() -> Self {
        let structure = StructureConfig {
            model_dim: 16,
            heads: 2,
            blocks: 1,
            ffn_dim: 32,
            head_hidden_dim: 16,
            out_dim: 8,
            ..StructureConfig::default()
        };
        let tactical = TacticalConfig {
            proj_dim: 16,
            momentum_channels: 4,
            lstm_layers: 1,
            lstm_hidden_dim: 8,
            scales: vec![5],
            heads: 2,
            head_hidden_dim: 16,
            embed_dim: 8,
            ..TacticalConfig::default()
        };
        let regime = RegimeConfig {
            token_dim: 4,
            lstm_hidden: 8,
            lstm_layers: 1,
            transition_hidden: 4,
            fusion_hidden: 16,
            fusion_out: 8,
            out_dim: 4,
            ..RegimeConfig::default()
        };
        let lvn = LvnConfig {
            hidden_dim: 8,
            out_dim: 4,
            ..LvnConfig::default()
        };
        let heads = HeadsConfig {
            structure_dim: structure.out_dim,
            tactical_dim: tactical.embed_dim,
            regime_dim: regime.out_dim,
            lvn_dim: lvn.out_dim,
            hidden_dim: 32,
            stream_dim: 16,
        };
        Self {
            structure,
            tactical,
            regime,
            lvn,
            heads,
        }
    }

    /// Checks every part and that the heads' input widths match the
    /// embedders' outputs.
    pub fn validate(&self) -> Result<()> {
        self.structure.validate()?;
        self.tactical.validate()?;
        self.regime.validate()?;
        self.lvn.validate()?;
        self.heads.validate()?;
        let want = [
            self.structure.out_dim,
            self.tactical.embed_dim,
            self.regime.out_dim,
            self.lvn.out_dim,
        ];
        let have = [
            self.heads.structure_dim,
            self.heads.tactical_dim,
            self.heads.regime_dim,
            self.heads.lvn_dim,
        ];
        if want != have {
            return Err(Error::config(
                "heads",
                format!("{have:?}"),
                format!("input widths equal to the embedders' outputs {want:?}"),
            ));
        }
        Ok(())
    }
}

/// A batch of observations, split into the embedders' inputs.
#[derive(Debug, Clone)]
pub struct ObsBatch {
    /// `[B, 48, 8]`.
    pub structure: Tensor,
    /// `[B, 60, 7]`.
    pub tactical: Tensor,
    /// `[B, 21, 8]`.
    pub regime: Tensor,
    /// `[B, 5]`.
    pub lvn: Tensor,
}

impl ObsBatch {
    /// From `batch` flat observations of [`OBS_DIM`] floats each, back to back.
    pub fn from_flat(obs: &[f32], batch: usize, device: &Device) -> Result<Self> {
        if obs.len() != batch * OBS_DIM {
            return Err(Error::config(
                "observations",
                obs.len(),
                format!("{batch} x {OBS_DIM} floats"),
            ));
        }
        let all = Tensor::from_slice(obs, (batch, OBS_DIM), device)?;
        let mut off = 0;
        let mut part = |n: usize| -> Result<Tensor> {
            let t = all.narrow(1, off, n)?.contiguous()?;
            off += n;
            Ok(t)
        };
        let [s, t, r, l] = OBS_PARTS;
        Ok(Self {
            structure: part(s)?.reshape((batch, STRUCTURE_ROWS, STRUCTURE_DIM))?,
            tactical: part(t)?.reshape((batch, TACTICAL_ROWS, TACTICAL_DIM))?,
            regime: part(r)?.reshape((batch, REGIME_ROWS, REGIME_DIM))?,
            lvn: part(l)?,
        })
    }

    /// From the four parts as separate column slices (e.g. a replay batch's
    /// columns), each `batch` items back to back.
    pub fn from_parts(
        structure: &[f32],
        tactical: &[f32],
        regime: &[f32],
        lvn: &[f32],
        batch: usize,
        device: &Device,
    ) -> Result<Self> {
        let check = |name: &'static str, v: &[f32], per: usize| {
            if v.len() == batch * per {
                Ok(())
            } else {
                Err(Error::config(
                    name,
                    v.len(),
                    format!("{batch} x {per} floats"),
                ))
            }
        };
        let [s, t, r, l] = OBS_PARTS;
        check("structure", structure, s)?;
        check("tactical", tactical, t)?;
        check("regime", regime, r)?;
        check("lvn", lvn, l)?;
        Ok(Self {
            structure: Tensor::from_slice(
                structure,
                (batch, STRUCTURE_ROWS, STRUCTURE_DIM),
                device,
            )?,
            tactical: Tensor::from_slice(tactical, (batch, TACTICAL_ROWS, TACTICAL_DIM), device)?,
            regime: Tensor::from_slice(regime, (batch, REGIME_ROWS, REGIME_DIM), device)?,
            lvn: Tensor::from_slice(lvn, (batch, LVN_DIM), device)?,
        })
    }

    /// Items in the batch.
    pub fn len(&self) -> usize {
        self.lvn.dims()[0]
    }

    /// True when the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The GrandModel agent: four embedders → concatenated μ (136 wide by
/// default) → dueling Q over {short, flat, long}.
#[derive(Debug, Clone)]
pub struct AgentNet {
    /// Structure embedder.
    pub structure: StructureEmbedder,
    /// Tactical embedder.
    pub tactical: TacticalEmbedder,
    /// Regime embedder.
    pub regime: RegimeEmbedder,
    /// LVN embedder.
    pub lvn: LvnEmbedder,
    /// Agent heads.
    pub heads: AgentHeads,
    /// The device the parameters live on.
    device: Device,
}

impl AgentNet {
    /// Builds the agent's parameters under `vb` (prefixes `structure`,
    /// `tactical`, `regime`, `lvn`, `heads`).
    pub fn new(cfg: &AgentConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            structure: StructureEmbedder::new(cfg.structure.clone(), vb.pp("structure"))?,
            tactical: TacticalEmbedder::new(cfg.tactical.clone(), vb.pp("tactical"))?,
            regime: RegimeEmbedder::new(cfg.regime.clone(), vb.pp("regime"))?,
            lvn: LvnEmbedder::new(cfg.lvn.clone(), vb.pp("lvn"))?,
            heads: AgentHeads::new(cfg.heads.clone(), vb.pp("heads"))?,
            device: vb.device().clone(),
        })
    }

    /// The device the parameters live on (inputs must be there too).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Q-values `[B, 3]` for a batch of observations.
    pub fn q_values(&self, obs: &ObsBatch, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let s = self.structure.forward(&obs.structure, ctx)?.mu;
        let t = self.tactical.forward(&obs.tactical, ctx)?.mu;
        let r = self.regime.forward(&obs.regime, ctx)?.mu;
        let l = self.lvn.forward(&obs.lvn, ctx)?.mu;
        let (q, _value) = self.heads.forward(&s, &t, &r, &l)?;
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;

    #[test]
    fn tiny_and_full_agents_build_and_score_observations() {
        for cfg in [AgentConfig::tiny(), AgentConfig::default()] {
            let vm = VarMap::new();
            let net = AgentNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
                .unwrap();
            let obs: Vec<f32> = (0..2 * OBS_DIM)
                .map(|i| ((i % 17) as f32 - 8.0) * 0.1)
                .collect();
            let batch = ObsBatch::from_flat(&obs, 2, &Device::Cpu).unwrap();
            assert_eq!(batch.len(), 2);
            let q = net.q_values(&batch, &mut ForwardCtx::eval()).unwrap();
            assert_eq!(q.dims(), &[2, 3]);
        }
        let bad = AgentConfig {
            heads: HeadsConfig {
                structure_dim: 5,
                ..AgentConfig::tiny().heads
            },
            ..AgentConfig::tiny()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("heads"));
        assert!(ObsBatch::from_flat(&[0.0; 10], 1, &Device::Cpu).is_err());
    }
}
