//! Market data for GrandModel (tier 1): where the agents' bars and features
//! come from. It works with no download and no files (the synthetic market
//! is the embedded default of the main job) and takes a user's real bars.
//!
//! # Key types
//! - [`SyntheticMarket`] / [`GeneratorConfig`]: 5-minute OHLCV bars from a
//!   regime-switching model (a Markov chain over [`Regime`]s with
//!   regime-dependent drift, volatility and mean reversion, U-shaped
//!   intraday volume, session gaps and jumps), deterministic per seed, with
//!   the true regime of every bar. The model and its defaults are on
//!   [`SyntheticMarket`].
//! - [`CsvBars`] / [`load_csv`]: streaming CSV loader for
//!   `timestamp,open,high,low,close,volume` (ISO-8601 or Unix time); bad
//!   input is an [`Error::Csv`] naming the line and column.
//!   [`detect_interval`] finds the bar spacing despite weekend gaps.
//! - [`Aggregator`] / [`aggregate`]: exact time-aligned aggregation of k
//!   tactical bars into structure bars (5 min → 30 min by default).
//! - [`features`]: the four feature families, each incremental with no
//!   look-ahead and its formulas in its module docs —
//!   [`features::structure`] (the 48 × 8 matrix rows: MLMI, NW-RQK, LVN
//!   distance and strength, time of day), [`features::tactical`] (the 60 × 7
//!   rows: fair-value gaps, momentum, volume ratio), [`features::regime`]
//!   (the 8-D regime statistics), [`features::lvn`] (the rolling volume
//!   profile and the 5-D LVN vector).
//! - [`FeaturePipeline`] / [`MarketData`]: bars in, normalised observations
//!   out ([`OBS_DIM`] = 977 floats: the structure, tactical and regime
//!   sliding windows and the LVN vector, in the order a gm-buffers schema
//!   stores them); the column transforms are documented on the pipeline
//!   module.
//! - [`TradingEnv`] / [`VecEnv`]: short/flat/long on one unit, reward =
//!   position × next-bar return − cost × |position change|; baselines
//!   [`BuyAndHold`], [`RandomPolicy`], [`RegimeOracle`] and [`evaluate`].
//!
//! # Invariants
//! - A feature row or observation of bar `t` depends on bars `0..=t` only
//!   (tests compare every incremental value with a recomputation from the
//!   prefix, and check that changing a later bar changes nothing earlier).
//! - No NaN or infinity reaches a matrix; warm-up is reported as not ready,
//!   never padded.
//! - Bad input (a malformed CSV row, an invalid bar, a bad config or
//!   action) is an `Err`, never a panic.
//! - Tier 1: depends on gm-core only, never on another workspace crate.

mod aggregate;
mod bar;
mod csvload;
mod env;
mod error;
pub mod features;
mod generator;
mod norm;
mod pipeline;

pub use aggregate::{
    aggregate, aggregate_with_origin, detect_interval, detect_interval_ts, AggBar, Aggregator,
    DETECT_WINDOW, MIN_BARS_FOR_INTERVAL,
};
pub use bar::{Bar, BarInterval, Regime};
pub use csvload::{
    load_csv, load_csv_reader, write_csv, CsvBars, LoadedBars, TimestampFormat, REQUIRED_COLUMNS,
};
pub use env::{
    evaluate, Action, BuyAndHold, EnvConfig, Policy, PolicyReturns, RandomPolicy, RegimeOracle,
    Step, StepInfo, TradingEnv, VecEnv,
};
pub use error::{Error, Result};
pub use generator::{GeneratorConfig, RegimeParams, SyntheticMarket};
pub use norm::RunningNorm;
pub use pipeline::{
    FeaturePipeline, MarketData, PipelineConfig, StepRows, LVN_DIM, OBS_DIM, REGIME_DIM,
    REGIME_ROWS, STRUCTURE_DIM, STRUCTURE_ROWS, TACTICAL_DIM, TACTICAL_ROWS,
};
