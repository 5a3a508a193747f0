//! The GrandModel system (tier 3): the one place where the crates are wired
//! together, and the `grandmodel` program.
//!
//! # Key types
//! - [`SystemConfig`]: [`MemoryOptimizationConfig`], [`TrainingMemoryConfig`],
//!   [`RunConfig`] and [`ShardConfig`], resolved by [`config::resolve`] from
//!   defaults, a TOML file, `GM_*` environment variables and flags, each
//!   value with its [`Origin`]; the key table is in the [`config`] module
//!   docs.
//! - [`MemoryOptimizationSystem`]: gm-monitor's sampler, gm-gc's reclaimer
//!   and a gm-leak leak watch under one budget, with the reactions that
//!   turn alerts into actions; the system is the guard that stops and joins
//!   them on drop. [`MemoryOptimizationSystem::optimize_training_pipeline`]
//!   plans batch, accumulation, checkpointing and precision from measured
//!   peaks; [`MemoryOptimizationSystem::report`] gives a [`SystemReport`].
//! - [`train::run`]: the `grandmodel train` run (data, learner, progress,
//!   Ctrl-C checkpoint, evaluation, report files); [`train::run_parallel`]
//!   is one rank of a data-parallel (ZeRO) run over a gm-shard
//!   `Communicator`, and [`parallel::Group`] joins an `mpirun` job
//!   (feature `mpi`).
//! - [`inspect::inspect_buffer`]: `grandmodel buffer inspect`.
//! - [`bench::write_report`]: `grandmodel report` (baseline vs optimized
//!   per component, measured).
//!
//! # Invariants
//! - The only crate that reads config files and environment variables.
//! - Every thread it starts is owned by a handle that stops and joins it
//!   on drop.
//! - Every memory figure it reports comes from gm-leak's counting
//!   allocator or the kernel (`/proc/self/status`), never from estimates;
//!   recommendations are rules over those figures.
//! - Errors are [`Error`] values with one-sentence messages and a
//!   documented exit code ([`error`] module docs); user input never panics.

pub mod bench;
pub mod chart;
pub mod cli;
pub mod config;
pub mod error;
pub mod inspect;
mod leakwatch;
pub mod parallel;
pub mod pipeline;
pub mod proc;
pub mod report;
pub mod system;
pub mod train;

pub use config::{
    MemoryOptimizationConfig, ModelSize, Origin, Resolved, RunConfig, ShardConfig, SystemConfig,
    TrainingMemoryConfig,
};
pub use error::{exit, Error, Result};
pub use leakwatch::LeakStatus;
pub use pipeline::{AgentModel, PipelinePlan, StepPeak};
pub use proc::ProcMemory;
pub use report::SystemReport;
pub use system::{
    AlertRecord, CleanupReport, ComponentGauge, MemoryOptimizationSystem, SystemOptions,
};

impl MemoryOptimizationSystem {
    /// Plans the training step of `model` (batch, accumulation steps,
    /// checkpoint segments, precision) from measured peaks on
    /// `sample_input`, under this system's limit; see [`pipeline`]. Sets the
    /// recommended batch to the plan's plain-backprop batch.
    pub fn optimize_training_pipeline(
        &self,
        model: AgentModel<'_>,
        sample_input: &gm_train::ObsBatch,
    ) -> Result<PipelinePlan> {
        let plan = pipeline::optimize(
            self.memory_config().limit_bytes,
            self.training_config(),
            model,
            sample_input,
        )?;
        self.set_batch(plan.plain_batch);
        Ok(plan)
    }
}
