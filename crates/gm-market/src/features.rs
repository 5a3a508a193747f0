//! Feature computers for the GrandModel embedders: incremental, one row per
//! closed bar, no look-ahead, raw (unnormalised) values.
//!
//! Four families, one module each:
//!
//! | family | module | bars | output |
//! |---|---|---|---|
//! | structure | [`structure`] | 30-minute | the 48 × 8 structure matrix rows: MLMI, NW-RQK, LVN distance/strength, time of day |
//! | LVN | [`lvn`] | 5-minute (tactical) | the 5-D low-volume-node vector, and the rolling [`lvn::VolumeProfile`] both families share |
//! | tactical | `tactical` | 5-minute | the tactical matrix rows (documented in that module) |
//! | regime | `regime` | 30-minute | the regime matrix rows (documented in that module) |
//!
//! Common contract: a computer is built from a validated `Config`, its
//! `push(&Bar)` takes the next **closed** bar and returns `Ok(None)` while
//! warming up (never padded values) and `Ok(Some(row))` afterwards; the row
//! of bar `t` depends on bars `0..=t` only, every value is finite, and an
//! invalid bar is an `Err` that changes nothing. Normalisation (e.g.
//! [`RunningNorm`](crate::RunningNorm)) is the pipeline's job, applied to
//! these raw values later; each module documents its raw ranges.

pub mod lvn;
pub mod structure;

// ---- tactical and regime families: `pub mod tactical;` and `pub mod regime;`
// ---- are declared here by their owner.
pub mod regime;
pub mod tactical;
