//! Train the GrandModel agent inside a memory budget (tier 2, issue 6):
//! the composable [`TrainStep`] (segment checkpointing, bf16/f16 with loss
//! scaling, micro-batches, top-k sparsification, a retry with a halved
//! micro-batch when the device runs out of memory), the memory-budgeted
//! [`BatchSizer`], the Double-DQN [`Learner`] and the sharded
//! [`ZeroOptimizer`].
//!
//! # Devices
//! Everything runs on the CPU by default. With the feature `candle-cuda`
//! (candle's CUDA backend; needs `nvcc` to build) the learner runs on the
//! GPU named by [`LearnerConfig::device`], and a [`TrainStep`] runs on the
//! device its batch and network live on; threaded actors act on CPU copies
//! of the weights; data-parallel mode is CPU-only. Without the feature a
//! CUDA device is a typed `NoCuda` error. `examples/gpu_check.rs` compares
//! the GPU with the CPU (the reference) and drills the out-of-memory retry
//! on a really full device.

pub mod accum;
pub mod agent;
pub mod batch_size;
pub mod checkpoint;
mod error;
pub mod grads;
pub mod learner;
pub mod optim;
pub mod precision;
pub mod sparsify;
pub mod step;
pub mod zero;

pub use accum::{accumulate, accumulation_steps, AccumConfig, AccumPlan, GradAccumulator};
pub use agent::{AgentConfig, AgentNet, ObsBatch, OBS_PARTS};
pub use batch_size::{BatchSizeConfig, BatchSizer, LinearFit};
pub use checkpoint::{
    agent_checkpointed_grads, agent_plain_grads, checkpointed_grads, plain_grads, CheckpointConfig,
    CheckpointedBackward, CheckpointedForward, SegmentDropout,
};
pub use error::{Error, Result};
pub use grads::Grads;
pub use learner::policy::GreedyPolicy;
pub use learner::DataParallel;
pub use learner::{
    ActorMode, EpsilonSchedule, Learner, LearnerConfig, LearnerCounters, StepReport, TargetUpdate,
    UpdateStats,
};
pub use optim::{AdamW, AdamWConfig};
pub use precision::{working_builder, LossScaler, LossScalerConfig, MixedPrecision, Precision};
pub use sparsify::{SparsifyReport, TopK, TopKAmount, TopKConfig, TopKScope};
pub use step::{StepConfig, StepGrads, StepOutcome, TdBatch, TrainStep};
pub use zero::{StateSource, ZeroConfig, ZeroOptimizer, ZeroOutcome};
