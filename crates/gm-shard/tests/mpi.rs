//! The MPI backend under a real `mpirun`: every collective on 2 and 4 ranks
//! against values each rank computes locally (sums bit-identical across
//! ranks and to the sequential rank-order reference), argument errors on
//! every rank, a 4 MiB buffer; and the faults: a stalled rank (timeout,
//! then aborted calls, then the job ends), a rank that dies in a
//! collective, and `MpiComm::abort`.
//!
//! `harness = false`: run normally, `main` relaunches this executable under
//! `gm_shard::mpirun_command` once per scenario, with a deadline (the job is
//! killed and the test fails if it runs over; nothing hangs), and prints a
//! libtest-like summary. Under `mpirun`, each process runs one rank of the
//! scenario named by `--gm-mpi-scenario`. Arguments that do not start with
//! `-` filter the tests by name. `mpirun` missing from `PATH` is a failure
//! unless `GM_SKIP_MPI=1`.

use gm_shard::{
    launched_by_mpirun, mpirun_check_exit_code, mpirun_command, Communicator, Error, MpiComm, Op,
};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const SCENARIO: &str = "--gm-mpi-scenario";

// The trainer stores it as `Box<dyn Communicator + Send>`.
const _: fn(MpiComm) -> Box<dyn Communicator + Send> = |c| Box::new(c);

/// The longest any job may run.
const JOB_DEADLINE: Duration = Duration::from_secs(120);

/// Collective timeout of the stall scenario, and how long its rank 1 sleeps.
const STALL_TIMEOUT: Duration = Duration::from_secs(2);
const STALL_SLEEP: Duration = Duration::from_secs(6);

/// Collective timeout of the die/abort scenarios: far longer than the job
/// may take, so only mpirun ending the job can end rank 0's wait.
const LONG: Duration = Duration::from_secs(60);

#[path = "common/sums.rs"]
mod sums;
use sums::{bits, input, reference_sum};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if launched_by_mpirun() {
        let scenario = args
            .iter()
            .position(|a| a == SCENARIO)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
            .unwrap_or("");
        return rank_main(scenario);
    }
    parent_main(&args[1..])
}

// ---------------------------------------------------------------------------
// The parent: launches the jobs and checks how they ended.

struct Job {
    status: Option<ExitStatus>,
    elapsed: Duration,
    output: String,
}

impl Job {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

type Test = (&'static str, fn() -> Result<String, String>);

fn parent_main(args: &[String]) -> ExitCode {
    if let Some(code) = mpirun_check_exit_code("the MPI collective tests") {
        return code;
    }
    let tests: [Test; 5] = [
        ("mpi_2_ranks", || collectives(2)),
        ("mpi_4_ranks", || collectives(4)),
        ("mpi_stalled_rank_times_out", stalled_rank),
        ("mpi_dying_rank_fails_the_job", dying_rank),
        ("mpi_abort_ends_the_job", abort_ends_job),
    ];
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &tests {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let start = Instant::now();
    let mut failed = Vec::new();
    for (name, test) in &selected {
        let t = Instant::now();
        match test() {
            Ok(note) => println!("test {name} ... ok ({:.2?}; {note})", t.elapsed()),
            Err(why) => {
                println!("test {name} ... FAILED ({:.2?})", t.elapsed());
                failed.push((name, why));
            }
        }
    }
    for (name, why) in &failed {
        println!("\n---- {name} ----\n{why}");
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; finished in {:.2?}\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len(),
        start.elapsed()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `scenario` on `ranks` ranks; kills the whole job if it runs past
/// [`JOB_DEADLINE`].
fn run_job(ranks: usize, scenario: &str) -> Result<Job, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = mpirun_command(ranks, &exe);
    cmd.args([SCENARIO, scenario])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let job =
        gm_shard::run_job(&mut cmd, JOB_DEADLINE).map_err(|e| format!("spawning {cmd:?}: {e}"))?;
    let (status, elapsed, output) = (job.status, job.elapsed, job.stdout + &job.stderr);
    Ok(Job {
        status,
        elapsed,
        output,
    })
}

fn describe(job: &Job) -> String {
    format!(
        "status {:?} after {:.2?}\n--- output ---\n{}",
        job.status, job.elapsed, job.output
    )
}

fn collectives(ranks: usize) -> Result<String, String> {
    let job = run_job(ranks, "collectives")?;
    if job.status.is_none() {
        return Err(format!("the job hung and was killed: {}", describe(&job)));
    }
    if !job.ok() {
        return Err(format!("the job failed: {}", describe(&job)));
    }
    for r in 0..ranks {
        if !job.output.contains(&format!("rank {r} ok")) {
            return Err(format!("rank {r} did not report ok: {}", describe(&job)));
        }
    }
    let timing = job
        .output
        .lines()
        .find(|l| l.starts_with("rank 0 ok"))
        .unwrap_or("")
        .to_string();
    Ok(timing)
}

fn stalled_rank() -> Result<String, String> {
    let job = run_job(2, "stall")?;
    let Some(status) = job.status else {
        return Err(format!("the job hung and was killed: {}", describe(&job)));
    };
    let line = job
        .output
        .lines()
        .find(|l| l.starts_with("rank 0 stall:"))
        .ok_or_else(|| format!("rank 0 did not report: {}", describe(&job)))?;
    // "rank 0 stall: timeout after 2004 ms missing [1]; then aborted"
    let ms: u64 = line
        .split("timeout after ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected report {line:?}: {}", describe(&job)))?;
    let waited = Duration::from_millis(ms);
    // Bounded waiting: not before the timeout, and not much after it
    // (generous slack for a loaded 2-core machine).
    if waited < STALL_TIMEOUT || waited > STALL_TIMEOUT + Duration::from_secs(10) {
        return Err(format!(
            "rank 0 waited {waited:?} for a {STALL_TIMEOUT:?} timeout: {}",
            describe(&job)
        ));
    }
    if !line.contains("missing [1]") || !line.ends_with("then aborted") {
        return Err(format!("unexpected report {line:?}: {}", describe(&job)));
    }
    Ok(format!(
        "rank 0 timed out after {ms} ms; the job ended after {:.2?} with {status}",
        job.elapsed
    ))
}

fn dying_rank() -> Result<String, String> {
    let job = run_job(2, "die")?;
    check_killed(&job, "rank 1 exited with status 3 in a collective")
}

fn abort_ends_job() -> Result<String, String> {
    let job = run_job(2, "abort")?;
    check_killed(&job, "rank 1 called abort(5)")
}

/// The job must have failed, and ended by mpirun rather than by rank 0's
/// own (60 s) timeout.
fn check_killed(job: &Job, what: &str) -> Result<String, String> {
    let Some(status) = job.status else {
        return Err(format!("the job hung and was killed: {}", describe(job)));
    };
    if status.success() {
        return Err(format!("{what}, yet the job succeeded: {}", describe(job)));
    }
    if job.output.contains("UNEXPECTED") {
        return Err(format!(
            "rank 0 was not stopped by mpirun: {}",
            describe(job)
        ));
    }
    if job.elapsed >= LONG / 2 {
        return Err(format!(
            "the job took {:.2?}: {}",
            job.elapsed,
            describe(job)
        ));
    }
    Ok(format!(
        "{what}; the job failed after {:.2?} with {status}",
        job.elapsed
    ))
}

// ---------------------------------------------------------------------------
// The ranks.

fn rank_main(scenario: &str) -> ExitCode {
    let timeout = match scenario {
        "stall" => STALL_TIMEOUT,
        _ => LONG,
    };
    let comm = match MpiComm::init(timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("MpiComm::init failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    match scenario {
        "collectives" => rank_collectives(&comm),
        "stall" => rank_stall(&comm),
        "die" => {
            comm.barrier().unwrap();
            if comm.rank() == 1 {
                std::thread::sleep(Duration::from_millis(200));
                std::process::exit(3); // no finalize, mid-job
            }
            let r = comm.all_reduce_sum(&mut [1.0; 8]);
            println!("UNEXPECTED: rank 0 returned from its all-reduce: {r:?}");
        }
        "abort" => {
            comm.barrier().unwrap();
            if comm.rank() == 1 {
                std::thread::sleep(Duration::from_millis(200));
                comm.abort(5);
            }
            let r = comm.barrier();
            println!("UNEXPECTED: rank 0 returned from its barrier: {r:?}");
        }
        other => {
            eprintln!("unknown scenario {other:?}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// Asserts that every rank holds the same bits in `v` (all-gathers it).
fn same_on_all_ranks(c: &MpiComm, v: &[f32], what: &str) {
    let all = c.all_gather(v, &vec![v.len(); c.world()]).unwrap();
    for (q, part) in all.chunks(v.len().max(1)).enumerate() {
        assert_eq!(
            bits(part),
            bits(v),
            "{what}: rank {q} differs from rank {}",
            c.rank()
        );
    }
}

fn rank_collectives(c: &MpiComm) {
    let (r, world) = (c.rank(), c.world());
    let start = Instant::now();
    assert!(matches!(
        MpiComm::init(LONG),
        Err(Error::Unavailable { backend: "mpi", .. })
    ));

    // All-reduce, including a buffer shorter than the world (empty parts).
    for n in [37, 3, 1, 0] {
        let mut v = input(r, n);
        c.all_reduce_sum(&mut v).unwrap();
        assert_eq!(bits(&v), bits(&reference_sum(world, n)), "all_reduce n={n}");
        same_on_all_ranks(c, &v, "all_reduce");
    }

    // Repeated reductions stay bit-identical across ranks.
    let mut v = input(r, 101);
    for _ in 0..20 {
        c.all_reduce_sum(&mut v).unwrap();
        for x in &mut v {
            *x *= 0.25;
        }
    }
    same_on_all_ranks(c, &v, "repeated all_reduce");

    // Uneven counts with an empty part: 2, 0, 1, 2.
    let counts: Vec<usize> = (0..world).map(|q| (q + 2) % 3).collect();
    let total: usize = counts.iter().sum();
    let start_r: usize = counts[..r].iter().sum();
    let rs = c.reduce_scatter_sum(&input(r, total), &counts).unwrap();
    let full = reference_sum(world, total);
    assert_eq!(
        bits(&rs),
        bits(&full[start_r..start_r + counts[r]]),
        "reduce_scatter"
    );

    let local = input(r, total)[start_r..start_r + counts[r]].to_vec();
    let ag = c.all_gather(&local, &counts).unwrap();
    let want: Vec<f32> = (0..world)
        .flat_map(|q| {
            let s: usize = counts[..q].iter().sum();
            input(q, total)[s..s + counts[q]].to_vec()
        })
        .collect();
    assert_eq!(bits(&ag), bits(&want), "all_gather");

    // Broadcast from a non-zero root.
    let mut bc = input(r, 5);
    c.broadcast(&mut bc, world - 1).unwrap();
    assert_eq!(bits(&bc), bits(&input(world - 1, 5)), "broadcast");

    let stats = c.gather_stats(&[r as u64, 10 * r as u64]).unwrap();
    if r == 0 {
        let want: Vec<Vec<u64>> = (0..world as u64).map(|q| vec![q, 10 * q]).collect();
        assert_eq!(stats, Some(want), "gather_stats");
    } else {
        assert_eq!(stats, None, "gather_stats off rank 0");
    }
    c.barrier().unwrap();

    // Argument errors: the same error on every rank, the group usable after.
    let usable = |what: &str| {
        let mut v = vec![1.0; 3];
        c.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, vec![world as f32; 3], "usable after {what}");
    };
    let e = c
        .all_reduce_sum(&mut vec![0.0; 3 + usize::from(r == 1)])
        .unwrap_err();
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
    usable("LengthMismatch");
    let mut bad = vec![1; world];
    if r == 1 {
        bad[0] = 2;
        bad[1] = 0;
    }
    let e = c.all_gather(&vec![0.0; bad[r]], &bad).unwrap_err();
    let ones = format!("{:?}", vec![1; world]);
    let mut other = vec![1; world];
    other[0] = 2;
    other[1] = 0;
    assert_eq!(
        e,
        Error::ArgumentMismatch {
            op: Op::AllGather,
            rank: 1,
            what: "counts",
            expected: ones,
            actual: format!("{other:?}"),
        }
    );
    usable("ArgumentMismatch");
    let e = c.broadcast(&mut [0.0; 2], world).unwrap_err();
    assert_eq!(
        e,
        Error::InvalidRoot {
            op: Op::Broadcast,
            root: world,
            world
        }
    );
    let e = if r == 0 {
        c.barrier().unwrap_err()
    } else {
        c.all_reduce_sum(&mut []).unwrap_err()
    };
    assert!(
        matches!(
            e,
            Error::OpMismatch {
                rank: 1,
                expected: Op::Barrier,
                actual: Op::AllReduceSum,
                ..
            }
        ),
        "{e}"
    );
    usable("OpMismatch");

    // A large buffer: 4 MiB per rank.
    let n = 1 << 20;
    let mut big = input(r, n);
    let t = Instant::now();
    c.all_reduce_sum(&mut big).unwrap();
    let big_time = t.elapsed();
    assert_eq!(
        bits(&big),
        bits(&reference_sum(world, n)),
        "4 MiB all_reduce"
    );
    let mut bc = if r == 0 { input(0, n) } else { vec![0.0; n] };
    c.broadcast(&mut bc, 0).unwrap();
    assert_eq!(bits(&bc), bits(&input(0, n)), "4 MiB broadcast");

    c.barrier().unwrap();
    println!(
        "rank {r} ok (world {world}; 4 MiB all-reduce {big_time:.2?}; all checks {:.2?})",
        start.elapsed()
    );
}

fn rank_stall(c: &MpiComm) {
    c.barrier().unwrap();
    if c.rank() == 1 {
        std::thread::sleep(STALL_SLEEP);
        // Rarely reached: mpirun ends the job once rank 0 has exited.
        let r = c.all_reduce_sum(&mut [1.0; 4]);
        println!("rank 1 woke up: {r:?}");
        return;
    }
    let t = Instant::now();
    let e = c.all_reduce_sum(&mut [1.0; 4]).unwrap_err();
    let waited = t.elapsed();
    let Error::Timeout {
        op: Op::AllReduceSum,
        seq: 1,
        rank: 0,
        missing,
        ..
    } = &e
    else {
        println!("rank 0 stall: UNEXPECTED error {e}");
        return;
    };
    let then = c.barrier();
    let aborted = matches!(
        then,
        Err(Error::Aborted {
            op: Op::Barrier,
            rank: 0,
            ..
        })
    ) && c.is_broken();
    println!(
        "rank 0 stall: timeout after {} ms missing {missing:?}; {}",
        waited.as_millis(),
        if aborted {
            "then aborted".to_string()
        } else {
            format!("then UNEXPECTED {then:?}")
        }
    );
    // Returning drops the broken communicator without finalizing MPI.
}
