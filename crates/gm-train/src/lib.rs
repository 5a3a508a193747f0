//! Train the GrandModel agent inside a memory budget (tier 2): under
//! construction (issue 6).

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
pub use zero::{ZeroConfig, ZeroOptimizer, ZeroOutcome};
