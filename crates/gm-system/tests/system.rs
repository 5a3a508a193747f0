//! The memory optimization system as a library: it starts its threads and
//! stops and joins every one of them on drop; alerts reach the callbacks
//! and trigger the reactions (reclaim, batch shrink); the emergency cleanup
//! reports what each component freed; the report derives recommendations
//! from the figures; the training-step plan measures a lower peak with
//! checkpointing and bf16, and becomes the learner's update step
//! (micro-batches, segments, precision); a critical alert's batch shrink
//! reaches the live learner.
//!
//! Threads and RSS are per process: this binary runs its checks one after
//! another in `main`, without the test harness's threads
//! (`harness = false`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use gm_buffers::{col, BufferConfig, DType as BDType, FieldSpec, PerConfig, Schema};
use gm_buffers::{PrioritizedReplayBuffer, SharedReplay};
use gm_system::train::{follow_batch_shrink, StepPlan};
use gm_system::{
    AgentModel, MemoryOptimizationConfig, MemoryOptimizationSystem, SystemOptions,
    TrainingMemoryConfig,
};
use gm_train::{AgentConfig, AgentNet, Learner, LearnerConfig, ObsBatch, Precision};

#[global_allocator]
static ALLOC: gm_leak::TrackingAllocator = gm_leak::TrackingAllocator::system();

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn quick_memory(limit_bytes: u64) -> MemoryOptimizationConfig {
    MemoryOptimizationConfig {
        limit_bytes,
        monitor_interval: Duration::from_millis(20),
        leak_check_interval: Duration::from_millis(5),
        ..MemoryOptimizationConfig::default()
    }
}

/// A small synchronous learner (tiny agent, 8 environments, updates from
/// step 8 on) with `batch` and `step`.
fn tiny_learner(batch: usize, step: StepPlan) -> Learner {
    let data = gm_market::MarketData::synthetic(
        gm_market::GeneratorConfig {
            seed: 3,
            ..gm_market::GeneratorConfig::default()
        },
        2_000,
        gm_market::PipelineConfig::default(),
    )
    .unwrap();
    let mut c = LearnerConfig::small();
    c.env = gm_market::EnvConfig {
        episode_bars: 24,
        ..gm_market::EnvConfig::default()
    };
    c.batch_size = batch;
    c.learning_starts_transitions = 64;
    c.replay = BufferConfig {
        capacity: 1_000,
        storage: gm_buffers::StorageMode::Memory,
        ..BufferConfig::default()
    };
    c.step = step.step_config();
    Learner::new(c, Arc::new(data)).unwrap()
}

/// Steps until an update happens; returns its statistics.
fn next_update(l: &mut Learner) -> gm_train::UpdateStats {
    for _ in 0..32 {
        if let Some(u) = l.step().unwrap().update {
            return u;
        }
    }
    panic!("no update in 32 steps");
}

fn replay() -> SharedReplay<PrioritizedReplayBuffer> {
    let schema = Schema::new(vec![FieldSpec::plain("x", BDType::F32, &[1024])]).unwrap();
    let mut b = PrioritizedReplayBuffer::new(
        schema,
        BufferConfig {
            capacity: 2048,
            storage: gm_buffers::StorageMode::Memory,
            ..BufferConfig::default()
        },
        PerConfig::default(),
    )
    .unwrap();
    // Smooth, compressible rows.
    let row: Vec<f32> = (0..1024).map(|i| (i / 64) as f32).collect();
    for _ in 0..2048 {
        b.add(&[col(&row)]).unwrap();
    }
    SharedReplay::new(b)
}

fn lifecycle_alerts_reactions_cleanup_and_report() {
    // A learner of batch 64 for the batch shrink below, updated once
    // before the thread count is taken: its matmuls start candle's
    // process-wide thread pool, which is not the system's to join.
    let mut learner = tiny_learner(64, StepPlan::default());
    assert_eq!(next_update(&mut learner).batch, 64);
    let before = threads();
    let r = replay();
    let rss = gm_system::ProcMemory::read().rss_bytes.unwrap();
    // A limit 192 MiB above what the process holds.
    let system = MemoryOptimizationSystem::start_with(
        quick_memory(rss + (192 << 20)),
        TrainingMemoryConfig::default(),
        SystemOptions {
            monitor_jsonl: None,
            prometheus_port: None,
        },
    )
    .unwrap();
    // Reclaimer, sampler, leak watch. (No Prometheus endpoint here:
    // tiny_http 0.12 keeps its 4 pool threads after its server is dropped,
    // so they would outlive any handle.)
    assert!(threads() >= before + 3, "{} -> {}", before, threads());
    assert!(gm_leak::sampling_enabled(), "allocation-site profiling on");
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    system.add_alert_callback(move |_| {
        s2.fetch_add(1, Ordering::SeqCst);
    });
    system.set_batch(64);
    system.register_replay("replay", &r).unwrap();
    let params = system.gauge("params").unwrap();
    params.set(12_345);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(system.alerts().1, 0, "{:?}", system.alerts().0);
    // Now hold 512 MiB more (touched, so resident): over the limit. Touch
    // it again right before sampling: this VM's proactive reclaim (DAMON)
    // pages out memory left cold.
    let mut hog = vec![1u8; 512 << 20];
    for page in hog.chunks_mut(4096) {
        page[0] = page[0].wrapping_add(1);
    }
    system.sample_now();
    let (alerts, total) = system.alerts();
    assert!(total >= 1 && seen.load(Ordering::SeqCst) >= 1, "{alerts:?}");
    // The sampler may catch the hog on its way up (a warning first).
    let a = alerts
        .iter()
        .find(|a| a.level == "exceeded" || a.level == "critical")
        .unwrap_or_else(|| panic!("no critical alert: {alerts:?}"));
    assert!(a.action.contains("emergency reclaim pass"), "{}", a.action);
    assert!(a.action.contains("batch 64 -> 32"), "{}", a.action);
    // Critical and exceeded are two alerts when the sampler catches the
    // rise in between: one halving each.
    let (batch, shrinks) = system.batch();
    assert!(
        (1..=2).contains(&shrinks) && batch == 64 >> shrinks,
        "{batch} {shrinks}"
    );
    // The shrink reaches a live learner of batch 64: its next update
    // samples the shrunk batch; a second look changes nothing.
    let change = follow_batch_shrink(&system, &mut learner)
        .unwrap()
        .expect("a shrink to follow");
    assert_eq!((change.from, change.to), (64, batch));
    assert_eq!(learner.batch_size(), batch);
    assert_eq!(learner.step().unwrap().update.map(|u| u.batch), Some(batch));
    assert_eq!(follow_batch_shrink(&system, &mut learner).unwrap(), None);
    drop(learner);

    // The emergency cleanup visits the replay and measures what it freed.
    let c = system.emergency_memory_cleanup();
    let rep = c
        .components
        .iter()
        .find(|x| x.name == "replay/shared")
        .expect("the replay is visited");
    assert!(rep.heap_freed_bytes.is_some() && rep.rss_anon_freed_bytes.is_some());
    assert!(c.rss_anon_freed_bytes.is_some());
    let (compressed_raw, compressed) = {
        let s = r.stats();
        (s.compressed_raw_bytes, s.compressed_bytes)
    };
    assert!(compressed > 0 && compressed < compressed_raw, "{c:?}");

    // The report: components, alerts, reclaim history, derived rules.
    std::thread::sleep(Duration::from_millis(50));
    let report = system.report();
    let names: Vec<&str> = report.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["replay", "params"]);
    assert_eq!(report.components[1].bytes, 12_345);
    assert!(report
        .reclaim_history
        .iter()
        .any(|p| p.trigger == "emergency"));
    assert!(report.leak.snapshots > 0);
    let rules: Vec<&str> = report
        .recommendations
        .iter()
        .map(|r| r.rule.as_str())
        .collect();
    assert!(rules.contains(&"alerts-raised"), "{rules:?}");
    assert!(rules.contains(&"batch-shrunk"), "{rules:?}");
    assert!(rules.contains(&"peak-near-limit"), "{rules:?}");
    let md = report.to_markdown();
    assert!(md.contains("### Recommendations") && md.contains("| replay |"));
    let json = report.to_json();
    assert_eq!(json["batch"][0], report.batch.0);
    assert!(report.batch.0 <= batch, "only shrinks");

    drop(hog);
    drop(system);
    assert_eq!(threads(), before, "every thread stopped and joined");
    assert!(!gm_leak::sampling_enabled(), "profiling turned off again");
    // The system dropped its hold on the replay.
    drop(r);
    println!("lifecycle, alerts, reactions, cleanup, report: ok");
}

fn pipeline_plan_measures_a_lower_peak() {
    let system = MemoryOptimizationSystem::start(
        quick_memory(8 << 30),
        TrainingMemoryConfig {
            target_effective_batch: 64,
            mixed_precision: true,
            ..TrainingMemoryConfig::default()
        },
    )
    .unwrap();
    let cfg = AgentConfig::tiny();
    let vm = VarMap::new();
    AgentNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    gm_models::init::init_seeded(&vm, 1).unwrap();
    let obs: Vec<f32> = (0..8 * gm_market::OBS_DIM)
        .map(|i| ((i % 23) as f32 - 11.0) * 0.05)
        .collect();
    let sample = ObsBatch::from_flat(&obs, 8, &Device::Cpu).unwrap();
    let plan = system
        .optimize_training_pipeline(
            AgentModel {
                config: &cfg,
                varmap: &vm,
            },
            &sample,
        )
        .unwrap();
    assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    assert_eq!(plan.checkpoint_segments, 4);
    assert_eq!(plan.precision, "bf16");
    assert_eq!(plan.micro_batch, 64, "8 GiB holds the whole target batch");
    assert_eq!(plan.accumulation_steps, 1);
    assert_eq!(plan.plain_batch, 64);
    assert!(
        plan.peak_after_bytes < plan.peak_before_bytes,
        "{} !< {}",
        plan.peak_after_bytes,
        plan.peak_before_bytes
    );
    assert_eq!(system.batch().0, 64);

    // A step budget that holds batch 32 but not 64: accumulation makes up
    // the effective batch.
    let peak32 = plan
        .measurements
        .iter()
        .find(|m| m.batch == 32 && m.segments == 4)
        .expect("batch 32 was probed")
        .peak_bytes;
    let rss = gm_system::ProcMemory::read().rss_bytes.unwrap();
    let small = gm_system::pipeline::optimize(
        rss + (peak32 as f64 / 0.85 * 1.05) as u64,
        &TrainingMemoryConfig {
            target_effective_batch: 64,
            mixed_precision: true,
            ..TrainingMemoryConfig::default()
        },
        AgentModel {
            config: &cfg,
            varmap: &vm,
        },
        &sample,
    )
    .unwrap();
    assert!((8..64).contains(&small.micro_batch), "{small:?}");
    assert_eq!(
        small.accumulation_steps,
        64usize.div_ceil(small.micro_batch),
        "{small:?}"
    );

    // The plans become the learner's update step. Roomy: the whole batch
    // at once; tight: micro-batches accumulated.
    let (b, roomy) = StepPlan::from_plan(&plan, 64);
    assert_eq!(b, 64);
    assert_eq!(
        roomy,
        StepPlan {
            micro_batch: None,
            checkpoint_segments: 4,
            precision: Precision::Bf16
        }
    );
    let (b, tight) = StepPlan::from_plan(&small, 64);
    assert_eq!((b, tight.micro_batch), (64, Some(small.micro_batch)));
    let sc = tight.step_config();
    assert_eq!(sc.checkpoint.map(|c| c.segments), Some(4));
    assert_eq!(sc.precision, Precision::Bf16);
    // A learner trained with it runs what the plan says.
    let mut learner = tiny_learner(64, tight);
    let u = next_update(&mut learner);
    assert_eq!(u.batch, 64);
    assert_eq!(u.micro_batches, small.accumulation_steps, "{u:?}");
    assert!(u.stepped && u.loss.is_finite(), "{u:?}");
    assert_eq!(
        learner.train_step().cfg.precision,
        Precision::Bf16,
        "bf16 runs"
    );
    println!(
        "pipeline plan: before {} B, after {} B; tight: micro {} x {}: ok",
        plan.peak_before_bytes, plan.peak_after_bytes, small.micro_batch, small.accumulation_steps
    );
}

fn main() {
    lifecycle_alerts_reactions_cleanup_and_report();
    pipeline_plan_measures_a_lower_peak();
}
