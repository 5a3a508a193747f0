//! Launching MPI jobs the same way everywhere — tests, benches, the
//! `grandmodel` docs: [`mpirun_command`] builds the command,
//! [`launched_by_mpirun`] tells a program whether it is a rank, and
//! [`run_job`] runs a job with a deadline, so a job whose rank hangs is
//! killed instead of hanging its caller; [`mpirun_check`] tells a test
//! that launches jobs whether it can run here. Plain process handling: no
//! MPI library needed, so it is compiled without the `mpi` feature too.

use std::ffi::OsStr;
use std::io::{ErrorKind, Read};
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Environment variables in which MPI launchers give the job's size.
const WORLD_SIZE_VARS: [&str; 2] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"];
/// Environment variables in which MPI launchers give this process's rank.
const RANK_VARS: [&str; 3] = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"];

/// True when this process was started by an MPI launcher (`mpirun`,
/// `mpiexec`, `srun` with PMI/PMIx): one of `OMPI_COMM_WORLD_SIZE`,
/// `PMI_SIZE`, `OMPI_COMM_WORLD_RANK`, `PMI_RANK`, `PMIX_RANK` is set.
/// Tests and programs use it to decide between running as a rank and
/// relaunching themselves with [`mpirun_command`].
pub fn launched_by_mpirun() -> bool {
    WORLD_SIZE_VARS
        .iter()
        .chain(&RANK_VARS)
        .any(|v| std::env::var_os(v).is_some())
}

/// The number of processes of the MPI job this process belongs to, from
/// the launcher's environment (`OMPI_COMM_WORLD_SIZE`, `PMI_SIZE`), before
/// MPI is initialized; `None` when no launcher set one (not launched by
/// one, or a PMIx-only launcher: then only `MPI_Comm_size` knows).
pub fn launcher_world_size() -> Option<usize> {
    env_number(&WORLD_SIZE_VARS)
}

/// This process's rank in its MPI job, from the launcher's environment
/// (`OMPI_COMM_WORLD_RANK`, `PMI_RANK`, `PMIX_RANK`), before MPI is
/// initialized.
pub fn launcher_rank() -> Option<usize> {
    env_number(&RANK_VARS)
}

fn env_number(vars: &[&str]) -> Option<usize> {
    vars.iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// The command that runs `program` as `ranks` MPI ranks on this machine,
/// the one way tests, benches and the CLI docs launch MPI jobs:
///
/// `mpirun -n RANKS [--allow-run-as-root] --oversubscribe PROGRAM`
///
/// - `--allow-run-as-root` only when the effective user is root
///   (containers; Open MPI refuses root otherwise);
/// - `--oversubscribe`: more ranks than cores is fine (tests on 2 cores).
///
/// Add the program's arguments with [`Command::arg`]. Open MPI syntax; the
/// `mpirun` on `PATH` is used, and the environment is passed on, so any
/// `OMPI_MCA_*` variable applies. In particular, where the shared-memory
/// transport's single-copy path (Linux CMA) is refused, which shows as
/// `Read -1, expected …, errno = 1` on messages over 4 KiB (containers
/// whose seccomp profile denies `process_vm_readv`), set
/// `OMPI_MCA_btl_vader_single_copy_mechanism=none`. It is not set here:
/// in the development container (root, `CAP_SYS_PTRACE`) CMA works
/// (verified with 4 MiB buffers) and is faster.
pub fn mpirun_command(ranks: usize, program: &Path) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.arg("-n").arg(ranks.to_string());
    if effective_uid() == Some(0) {
        cmd.arg("--allow-run-as-root");
    }
    cmd.arg("--oversubscribe").arg(program);
    cmd
}

/// This process's effective user id, from `/proc/self/status` (`None` where
/// that is unreadable).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// What a test that launches MPI jobs should do, from [`mpirun_check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MpirunCheck {
    /// `mpirun` runs here: launch the jobs.
    Run,
    /// `GM_SKIP_MPI=1`: skip the jobs. The text says what was skipped and
    /// why, for the test to print.
    Skip(String),
}

/// Whether the tests that launch MPI jobs can run here, the one check the
/// MPI test suites share. `what` names them in the messages (say "the ZeRO
/// MPI tests"):
///
/// - `GM_SKIP_MPI=1`: [`MpirunCheck::Skip`], whether or not `mpirun` is
///   installed, with the line to print;
/// - `mpirun --version` runs and exits 0: [`MpirunCheck::Run`];
/// - otherwise `Err` with one sentence for the test to fail with: `mpirun`
///   is not on `PATH` (how to install Open MPI, and that `GM_SKIP_MPI=1`
///   skips), or it could not be run or failed (why).
///
/// Reads the environment and runs `mpirun --version` (output captured,
/// nothing printed). Missing MPI is a failure unless asked to skip, so a CI
/// machine without it cannot pass the MPI tests by accident.
pub fn mpirun_check(what: &str) -> Result<MpirunCheck, String> {
    let mut version = Command::new("mpirun");
    version.arg("--version");
    check_mpirun(
        what,
        std::env::var_os("GM_SKIP_MPI").as_deref(),
        &mut version,
    )
}

/// [`mpirun_check`] for the `main` of a `harness = false` test: `None`
/// when the jobs are to run; otherwise the code to end `main` with, after
/// printing why: the skip line on stdout (success), or `error: ` and the
/// reason on stderr (failure).
pub fn mpirun_check_exit_code(what: &str) -> Option<ExitCode> {
    match mpirun_check(what) {
        Ok(MpirunCheck::Run) => None,
        Ok(MpirunCheck::Skip(why)) => {
            println!("{why}");
            Some(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Some(ExitCode::FAILURE)
        }
    }
}

/// [`mpirun_check`] with the value of `GM_SKIP_MPI` and the `mpirun
/// --version` command given, so that it is tested without touching the
/// environment.
fn check_mpirun(
    what: &str,
    skip: Option<&OsStr>,
    version: &mut Command,
) -> Result<MpirunCheck, String> {
    if skip.is_some_and(|v| v == "1") {
        return Ok(MpirunCheck::Skip(format!("skipped {what}: GM_SKIP_MPI=1")));
    }
    match version.stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => Ok(MpirunCheck::Run),
        Ok(o) => Err(format!(
            "`mpirun --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(format!(
            "`mpirun` is not on PATH: install Open MPI (apt-get install openmpi-bin \
             libopenmpi-dev) to run {what}, or set GM_SKIP_MPI=1 to skip"
        )),
        Err(e) => Err(format!("cannot run `mpirun --version`: {e}")),
    }
}

/// What [`run_job`] saw.
#[derive(Debug)]
pub struct JobOutput {
    /// The launcher's exit status; `None` when the job was killed at the
    /// deadline.
    pub status: Option<ExitStatus>,
    /// Wall time from spawn to exit (or to the kill).
    pub elapsed: Duration,
    /// Everything the job wrote to stdout, if the caller piped it.
    pub stdout: String,
    /// Everything the job wrote to stderr, if the caller piped it.
    pub stderr: String,
}

impl JobOutput {
    /// True when the job exited with status 0 before the deadline.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Spawns `cmd` (typically from [`mpirun_command`]), collects the streams
/// the caller set to [`Stdio::piped`], and waits at most `deadline`. Past
/// it, the launcher is asked to end the job (SIGTERM), given 5 s, and then
/// it and its direct children (mpirun's ranks, each in its own process
/// group) are killed: `status` is `None`. Stdin is closed. The pipe
/// readers are detached threads that end when the job's last process
/// closes the pipe; output still open 10 s after the job ended (a rank
/// that outlived mpirun) is reported in the text rather than waited for.
pub fn run_job(cmd: &mut Command, deadline: Duration) -> std::io::Result<JobOutput> {
    cmd.stdin(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut readers = Vec::new();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ] {
        readers.push(pipe.map(|mut pipe| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = pipe.read_to_string(&mut s);
                let _ = tx.send(s);
            });
            rx
        }));
    }
    let status = wait_until(&mut child, start + deadline);
    let elapsed = start.elapsed();
    let mut texts = readers.into_iter().map(|r| match r {
        None => String::new(),
        Some(rx) => rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| "\n[output pipe still open: a rank outlived mpirun]\n".into()),
    });
    let stdout = texts.next().unwrap_or_default();
    let stderr = texts.next().unwrap_or_default();
    Ok(JobOutput {
        status,
        elapsed,
        stdout,
        stderr,
    })
}

/// Waits for `child` until `deadline`; past it, SIGTERM to the child, 5 s
/// of grace, then SIGKILL to its children and the child; `None` then.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let ranks = children_of(child.id());
            signal("-TERM", child.id());
            let grace = Instant::now() + Duration::from_secs(5);
            while Instant::now() < grace && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            for pid in ranks {
                signal("-KILL", pid);
            }
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ids of the processes whose parent is `pid` (from `/proc/*/stat`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let child: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == pid).then_some(child)
    })
    .collect()
}

fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_past_its_deadline_is_killed_and_output_is_collected() {
        let mut quick = Command::new("sh");
        quick
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let j = run_job(&mut quick, Duration::from_secs(30)).unwrap();
        assert_eq!(j.status.and_then(|s| s.code()), Some(3));
        assert!(!j.success());
        assert_eq!((j.stdout.as_str(), j.stderr.as_str()), ("out\n", "err\n"));

        let mut slow = Command::new("sleep");
        slow.arg("30");
        let j = run_job(&mut slow, Duration::from_millis(200)).unwrap();
        assert!(j.status.is_none(), "{j:?}");
        assert!(j.elapsed < Duration::from_secs(20), "{j:?}");
    }

    #[test]
    fn gm_skip_mpi_skips_before_looking_for_mpirun_and_missing_mpirun_fails() {
        let what = "the MPI tests";
        let mut missing = Command::new("/nonexistent/mpirun");
        let skip = check_mpirun(what, Some(OsStr::new("1")), &mut missing);
        assert_eq!(
            skip,
            Ok(MpirunCheck::Skip(
                "skipped the MPI tests: GM_SKIP_MPI=1".into()
            ))
        );
        // Only "1" skips.
        for v in [None, Some(OsStr::new("0")), Some(OsStr::new(""))] {
            let e = check_mpirun(what, v, &mut missing).unwrap_err();
            assert!(e.contains("`mpirun` is not on PATH"), "{e}");
            assert!(
                e.contains(what) && e.contains("apt-get install openmpi-bin"),
                "{e}"
            );
            assert!(e.contains("GM_SKIP_MPI=1"), "{e}");
        }
        assert_eq!(
            check_mpirun(what, None, &mut Command::new("true")),
            Ok(MpirunCheck::Run)
        );
        let e = check_mpirun(what, None, &mut Command::new("false")).unwrap_err();
        assert!(e.starts_with("`mpirun --version` failed"), "{e}");
    }

    #[test]
    fn the_mpirun_command_names_the_ranks_and_the_program() {
        let c = mpirun_command(3, Path::new("/bin/prog"));
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(c.get_program(), "mpirun");
        assert_eq!(&args[..2], ["-n", "3"]);
        assert!(args.contains(&"--oversubscribe".to_string()));
        assert_eq!(args.last().map(String::as_str), Some("/bin/prog"));
    }
}
