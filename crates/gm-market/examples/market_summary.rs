//! Builds the embedded default market (synthetic 5-minute bars run through
//! the feature pipeline) and prints what it holds and how the baselines do:
//! `cargo run --release -p gm-market --example market_summary [BARS]`.

use std::sync::Arc;
use std::time::Instant;

use gm_market::{
    evaluate, BuyAndHold, EnvConfig, GeneratorConfig, MarketData, PipelineConfig, RandomPolicy,
    RegimeOracle, TradingEnv,
};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let t0 = Instant::now();
    let data = Arc::new(MarketData::synthetic(
        GeneratorConfig::default(),
        n,
        PipelineConfig::default(),
    )?);
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{n} bars ({}) generated and featurised in {secs:.2} s ({:.0} bars/s); first observation at bar {}",
        data.interval(),
        n as f64 / secs,
        data.first_ready()
    );
    let mut env = TradingEnv::new(data, EnvConfig::default())?;
    for (name, r) in [
        ("buy-and-hold", evaluate(&mut env, &mut BuyAndHold, 200, 1)?),
        (
            "random",
            evaluate(&mut env, &mut RandomPolicy::new(7), 200, 1)?,
        ),
        (
            "regime oracle",
            evaluate(&mut env, &mut RegimeOracle, 200, 1)?,
        ),
    ] {
        println!(
            "{name:>14}: mean episode return {:+.4} (sd {:.4}) over {} episodes",
            r.mean(),
            r.std(),
            r.episode_returns.len()
        );
    }
    Ok(())
}
