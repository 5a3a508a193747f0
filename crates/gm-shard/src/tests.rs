//! Tests of the in-process backend: every collective against a sequential
//! reference with 1–4 ranks, bit-identical results across ranks, argument
//! errors on every rank, and timeouts and departed peers that fail instead
//! of hanging.

use crate::{Communicator, Error, Op, ThreadComm, ThreadGroup};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(60);

#[path = "../tests/common/sums.rs"]
mod sums;
use sums::{bits, input, reference_sum};

fn counts(world: usize) -> Vec<usize> {
    (0..world).map(|r| (r + 2) % 3).collect() // 2, 0, 1, 2: includes an empty part
}

#[test]
fn every_collective_matches_the_sequential_reference() {
    for world in 1..=4 {
        let n = 37;
        let out = ThreadGroup::run(world, LONG, |c: ThreadComm| {
            let r = c.rank();
            assert_eq!(c.world(), world);
            let mut ar = input(r, n);
            c.all_reduce_sum(&mut ar).unwrap();

            let cnt = counts(world);
            let total: usize = cnt.iter().sum();
            let rs = c.reduce_scatter_sum(&input(r, total), &cnt).unwrap();

            let start: usize = cnt[..r].iter().sum();
            let local = input(r, total)[start..start + cnt[r]].to_vec();
            let ag = c.all_gather(&local, &cnt).unwrap();

            let mut bc = input(r, 5);
            c.broadcast(&mut bc, world - 1).unwrap();

            let stats = c.gather_stats(&[r as u64, 10 * r as u64]).unwrap();
            (ar, rs, ag, bc, stats)
        })
        .unwrap();

        let cnt = counts(world);
        let total: usize = cnt.iter().sum();
        let full = reference_sum(world, total);
        for (r, (ar, rs, ag, bc, stats)) in out.iter().enumerate() {
            assert_eq!(
                bits(ar),
                bits(&reference_sum(world, n)),
                "world {world} rank {r}"
            );
            let start: usize = cnt[..r].iter().sum();
            assert_eq!(bits(rs), bits(&full[start..start + cnt[r]]));
            let gathered: Vec<f32> = (0..world)
                .flat_map(|q| {
                    let s: usize = cnt[..q].iter().sum();
                    input(q, total)[s..s + cnt[q]].to_vec()
                })
                .collect();
            assert_eq!(bits(ag), bits(&gathered));
            assert_eq!(bits(bc), bits(&input(world - 1, 5)));
            if r == 0 {
                let want: Vec<Vec<u64>> = (0..world as u64).map(|q| vec![q, 10 * q]).collect();
                assert_eq!(stats.as_ref(), Some(&want));
            } else {
                assert_eq!(stats, &None);
            }
        }
    }
}

#[test]
fn repeated_reductions_are_bit_identical_across_ranks() {
    let world = 4;
    let out = ThreadGroup::run(world, LONG, |c: ThreadComm| {
        let mut v = input(c.rank(), 101);
        for _ in 0..50 {
            c.all_reduce_sum(&mut v).unwrap();
            for x in &mut v {
                *x *= 0.25;
            }
        }
        v
    })
    .unwrap();
    for v in &out[1..] {
        assert_eq!(bits(v), bits(&out[0]));
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    let world = 4;
    let arrived = AtomicUsize::new(0);
    let seen = ThreadGroup::run(world, LONG, |c: ThreadComm| {
        if c.rank() == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        arrived.fetch_add(1, Ordering::SeqCst);
        c.barrier().unwrap();
        arrived.load(Ordering::SeqCst)
    })
    .unwrap();
    assert_eq!(seen, vec![world; world]);
}

/// Runs `f` on each rank of a `world`-group and returns each rank's result
/// of the first collective, asserting that every rank got the same error.
fn same_error_on_all(world: usize, f: impl Fn(&ThreadComm) -> Error + Sync) -> Error {
    let errs = ThreadGroup::run(world, LONG, |c: ThreadComm| {
        let e = f(&c);
        // The group is still usable after an argument error.
        let mut v = vec![1.0; 3];
        c.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, vec![world as f32; 3]);
        e
    })
    .unwrap();
    for e in &errs[1..] {
        assert_eq!(e, &errs[0]);
    }
    errs[0].clone()
}

#[test]
fn argument_errors_reach_every_rank_and_leave_the_group_usable() {
    let e = same_error_on_all(2, |c| {
        let mut v = vec![0.0; 3 + c.rank()];
        c.all_reduce_sum(&mut v).unwrap_err()
    });
    assert_eq!(
        e,
        Error::LengthMismatch {
            op: Op::AllReduceSum,
            rank: 1,
            what: "buffer length",
            expected: 3,
            actual: 4,
        }
    );
    assert!(
        e.to_string()
            .contains("rank 1 passed buffer length 4, expected 3"),
        "{e}"
    );

    let e = same_error_on_all(3, |c| {
        let n = if c.rank() == 2 { 5 } else { 6 };
        c.reduce_scatter_sum(&vec![0.0; n], &[2, 2, 2]).unwrap_err()
    });
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                op: Op::ReduceScatterSum,
                rank: 2,
                expected: 6,
                actual: 5,
                ..
            }
        ),
        "{e}"
    );

    let e = same_error_on_all(2, |c| c.reduce_scatter_sum(&[0.0; 2], &[2]).unwrap_err());
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                what: "counts entries",
                expected: 2,
                actual: 1,
                ..
            }
        ),
        "{e}"
    );

    let e = same_error_on_all(2, |c| {
        let cnt = if c.rank() == 0 { [1, 1] } else { [2, 0] };
        c.all_gather(&vec![0.0; cnt[c.rank()]], &cnt).unwrap_err()
    });
    assert!(
        matches!(
            &e,
            Error::ArgumentMismatch {
                op: Op::AllGather,
                rank: 1,
                what: "counts",
                ..
            }
        ),
        "{e}"
    );

    let e = same_error_on_all(2, |c| c.all_gather(&[0.0; 2], &[1, 1]).unwrap_err());
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                op: Op::AllGather,
                rank: 0,
                expected: 1,
                actual: 2,
                ..
            }
        ),
        "{e}"
    );

    let e = same_error_on_all(2, |c| c.broadcast(&mut [0.0; 2], 2).unwrap_err());
    assert_eq!(
        e,
        Error::InvalidRoot {
            op: Op::Broadcast,
            root: 2,
            world: 2
        }
    );

    let e = same_error_on_all(2, |c| c.broadcast(&mut [0.0; 2], c.rank()).unwrap_err());
    assert!(
        matches!(e, Error::ArgumentMismatch { what: "root", .. }),
        "{e}"
    );

    let e = same_error_on_all(2, |c| c.gather_stats(&vec![0; c.rank() + 1]).unwrap_err());
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                op: Op::GatherStats,
                rank: 1,
                ..
            }
        ),
        "{e}"
    );

    let e = same_error_on_all(2, |c| {
        if c.rank() == 0 {
            c.barrier().unwrap_err()
        } else {
            c.all_reduce_sum(&mut []).unwrap_err()
        }
    });
    assert_eq!(
        e,
        Error::OpMismatch {
            seq: 0,
            rank: 1,
            expected: Op::Barrier,
            actual: Op::AllReduceSum
        }
    );
}

/// Runs `f` for each given communicator on its own thread and collects the
/// results, failing (instead of hanging) if they take over a minute.
fn run_bounded<R: Send + 'static>(comms: Vec<ThreadComm>, f: fn(ThreadComm) -> R) -> Vec<R> {
    let (tx, rx) = mpsc::channel();
    let n = comms.len();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let r = c.rank();
                tx.send((r, f(c))).unwrap();
            })
        })
        .collect();
    let mut out: Vec<(usize, R)> = (0..n)
        .map(|_| rx.recv_timeout(LONG).expect("a rank hung"))
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    out.sort_by_key(|x| x.0);
    out.into_iter().map(|x| x.1).collect()
}

#[test]
fn a_missing_rank_times_out_and_breaks_the_group() {
    let timeout = Duration::from_millis(100);
    let mut comms = ThreadGroup::new(3, timeout).unwrap().into_comms();
    let silent = comms.pop().unwrap(); // rank 2: alive, never calls
    let out = run_bounded(comms, |c| {
        let t = Instant::now();
        let e = c.all_reduce_sum(&mut [1.0]).unwrap_err();
        (e, t.elapsed())
    });
    let mut timeouts = 0;
    for (e, waited) in &out {
        match e {
            Error::Timeout {
                op,
                seq,
                missing,
                timeout: t,
                ..
            } => {
                assert_eq!(
                    (*op, *seq, missing.as_slice(), *t),
                    (Op::AllReduceSum, 0, &[2][..], timeout)
                );
                assert!(*waited >= timeout);
                timeouts += 1;
            }
            Error::Aborted { cause, .. } => assert!(cause.contains("timed out"), "{cause}"),
            other => panic!("unexpected {other}"),
        }
    }
    assert!(timeouts >= 1);
    // The late rank finds the group broken at once.
    let e = silent.all_reduce_sum(&mut [1.0]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aborted {
                op: Op::AllReduceSum,
                rank: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("waiting for ranks [2]"), "{e}");
}

#[test]
fn a_dropped_rank_fails_its_peers_without_waiting_for_the_timeout() {
    // A timeout far beyond the test's one-minute bound: only noticing the
    // departure can end the wait.
    let day = Duration::from_secs(86_400);
    let comms = ThreadGroup::new(3, day).unwrap().into_comms();
    let out = run_bounded(comms, |c| {
        let mut v = [1.0];
        c.all_reduce_sum(&mut v).unwrap(); // everyone takes part once
        if c.rank() == 1 {
            drop(c); // leaves, as a panicking rank's unwinding would
            return None;
        }
        Some(c.barrier().unwrap_err())
    });
    for (r, e) in out.iter().enumerate() {
        match (r, e) {
            (1, None) => {}
            (
                _,
                Some(Error::PeerLeft {
                    op: Op::Barrier,
                    seq: 1,
                    peer: 1,
                    ..
                }),
            ) => {}
            (_, Some(Error::Aborted { cause, .. })) => {
                assert!(cause.contains("rank 1 left"), "{cause}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn a_panicking_rank_does_not_hang_run() {
    let day = Duration::from_secs(86_400);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| {
            ThreadGroup::run(2, day, |c: ThreadComm| {
                if c.rank() == 1 {
                    panic!("rank 1 fails");
                }
                c.barrier()
            })
        });
        tx.send(r.is_err()).unwrap();
    });
    assert!(
        rx.recv_timeout(LONG).expect("run hung"),
        "the panic is resumed"
    );
}

#[test]
fn group_config_is_validated() {
    let e = ThreadGroup::new(0, LONG).unwrap_err().to_string();
    assert!(e.contains("world = 0") && e.contains("1 ..= 65536"), "{e}");
    let e = ThreadGroup::new(2, Duration::ZERO).unwrap_err().to_string();
    assert!(e.contains("timeout = 0ns") && e.contains("1 ms"), "{e}");
    let one = ThreadGroup::new(1, LONG).unwrap().into_comms();
    assert_eq!((one[0].rank(), one[0].world()), (0, 1));
}
