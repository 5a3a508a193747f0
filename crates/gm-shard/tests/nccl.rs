//! The NCCL backend against the CPU reference (the in-process backend):
//! one rank per visible CUDA device, every collective, argument errors.
//! Without a CUDA driver (or NCCL) the device tests print that they skipped
//! and pass, unless `GM_REQUIRE_CUDA=1`; the constructors must then return
//! `Error::Unavailable`, never panic.

use gm_shard::{Communicator, Error, NcclComm, ThreadComm, ThreadGroup};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

#[path = "common/sums.rs"]
mod sums;
use sums::input;

// Each rank's communicator moves to its own thread.
const _: fn(NcclComm) -> Box<dyn Communicator + Send> = |c| Box::new(c);

/// The number of devices, or `None` (after printing why) when the device
/// tests must skip.
fn devices() -> Option<usize> {
    let require = std::env::var_os("GM_REQUIRE_CUDA").is_some_and(|v| v == "1");
    match NcclComm::device_count() {
        Ok(n) if n > 0 => Some(n),
        other => {
            assert!(
                !require,
                "GM_REQUIRE_CUDA=1 but no usable CUDA device: {other:?}"
            );
            eprintln!("skipped: no CUDA driver ({other:?})");
            None
        }
    }
}

/// Everything one rank computes.
#[derive(Debug, Clone, PartialEq)]
struct Outputs {
    all_reduce: Vec<f32>,
    big_all_reduce: Vec<f32>,
    reduce_scatter: Vec<f32>,
    all_gather: Vec<f32>,
    broadcast: Vec<f32>,
    stats: Option<Vec<Vec<u64>>>,
    length_error: Error,
}

/// The same calls on any backend.
fn exercise(c: &dyn Communicator) -> Outputs {
    let (r, world) = (c.rank(), c.world());
    let mut all_reduce = input(r, 37);
    c.all_reduce_sum(&mut all_reduce).unwrap();
    let mut big_all_reduce = input(r, 1 << 20);
    c.all_reduce_sum(&mut big_all_reduce).unwrap();

    let counts: Vec<usize> = (0..world).map(|q| (q + 2) % 3).collect();
    let total: usize = counts.iter().sum();
    let reduce_scatter = c.reduce_scatter_sum(&input(r, total), &counts).unwrap();
    let start: usize = counts[..r].iter().sum();
    let all_gather = c
        .all_gather(&input(r, total)[start..start + counts[r]], &counts)
        .unwrap();
    let mut broadcast = input(r, 5);
    c.broadcast(&mut broadcast, world - 1).unwrap();
    let stats = c.gather_stats(&[r as u64, 10 * r as u64]).unwrap();
    c.barrier().unwrap();

    // counts[rank] + 1 elements: a LengthMismatch on every rank.
    let length_error = c
        .all_gather(&vec![0.0; counts[r] + 1], &counts)
        .unwrap_err();
    let mut ones = vec![1.0; 3];
    c.all_reduce_sum(&mut ones).unwrap();
    assert_eq!(
        ones,
        vec![world as f32; 3],
        "usable after an argument error"
    );
    Outputs {
        all_reduce,
        big_all_reduce,
        reduce_scatter,
        all_gather,
        broadcast,
        stats,
        length_error,
    }
}

fn close(got: &[f32], want: &[f32], world: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 4.0 * world as f32 * f32::EPSILON * w.abs().max(1.0);
        assert!((g - w).abs() <= tol, "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn every_collective_matches_the_cpu_reference() {
    let Some(n) = devices() else { return };
    let ordinals: Vec<usize> = (0..n).collect();
    let comms = NcclComm::for_devices(&ordinals, TIMEOUT).unwrap();
    let gpu: Vec<Outputs> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || exercise(&c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cpu = ThreadGroup::run(n, TIMEOUT, |c: ThreadComm| exercise(&c)).unwrap();
    for (r, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        close(
            &g.all_reduce,
            &c.all_reduce,
            n,
            &format!("rank {r} all_reduce"),
        );
        close(
            &g.big_all_reduce,
            &c.big_all_reduce,
            n,
            &format!("rank {r} 4 MiB all_reduce"),
        );
        close(
            &g.reduce_scatter,
            &c.reduce_scatter,
            n,
            &format!("rank {r} reduce_scatter"),
        );
        assert_eq!(g.all_gather, c.all_gather, "rank {r} all_gather");
        assert_eq!(g.broadcast, c.broadcast, "rank {r} broadcast");
        assert_eq!(g.stats, c.stats, "rank {r} gather_stats");
        assert_eq!(g.length_error, c.length_error, "rank {r} argument error");
    }
    eprintln!("NCCL on {n} device(s) matches the CPU reference");
}

#[test]
fn without_cuda_the_constructors_fail_cleanly() {
    let e = NcclComm::for_devices(&[], TIMEOUT).unwrap_err();
    assert!(matches!(e, Error::Config { key: "devices", .. }), "{e}");
    let e = NcclComm::for_devices(&[0], Duration::ZERO).unwrap_err();
    assert!(matches!(e, Error::Config { key: "timeout", .. }), "{e}");
    if devices().is_none() {
        let e = NcclComm::for_devices(&[0], TIMEOUT).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Unavailable {
                    backend: "nccl",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("unavailable"), "{e}");
    }
}
