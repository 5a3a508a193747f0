//! The `grandmodel` command line: `train`, `config show`, `buffer
//! inspect`. Errors are one sentence on stderr and an exit code documented
//! in [`crate::error`] (`grandmodel --help` lists them too). The program's
//! `main` is [`main`]; the binary only adds the counting allocator.
//!
//! `train --ranks N` with N > 1 is one rank of a data-parallel run under
//! `mpirun` ([`crate::parallel::Group`], [`train::run_parallel`]): rank 0
//! prints progress and the summary, the other ranks only their errors
//! (prefixed `rank R:`); every rank treats SIGINT, SIGTERM and SIGUSR1 as
//! a stop request, since mpirun turns Ctrl-C into SIGTERM for its ranks.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Command};
use gm_core::ByteSize;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config::{self, Layers, Resolved};
use crate::parallel::{self, Group};
use crate::train::{self, Progress, ProgressSink, TrainOptions};
use crate::{exit, Error};

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    a failure inside a run (training, writing the outputs)
  2    bad command line
  3    bad configuration (file, unknown key, value out of range, GM_* variable)
  4    data file missing or unreadable
  5    data file unusable (malformed CSV, too few bars)
  6    checkpoint or buffer file missing, corrupt or from another run
  7    memory limit too small for the run, or exceeded
  8    data-parallel run cannot start or its group failed (--ranks N > 1 without the
       mpi build or mpirun, mpirun -n != --ranks, a rank left or timed out)
  130  interrupted by Ctrl-C (checkpoint written; continue with --resume)";

const MPI_HELP: &str = "\
MPI (data-parallel training, --ranks N > 1):
  Build:  cargo build --release -p gm-system --features mpi
          (needs Open MPI and libclang: apt-get install libopenmpi-dev openmpi-bin libclang-dev)
  Launch: mpirun -n N target/release/grandmodel train --ranks N [other flags]
          (as root add --allow-run-as-root; more ranks than cores: --oversubscribe; in a
          container without ptrace rights: --mca btl_vader_single_copy_mechanism none)
  Every rank trains on the same data with its own environments and replay buffer; the
  global batch is split across the ranks, and the AdamW state (with shard.stage = 2 also
  the reduced gradient) is sharded across them (ZeRO), so each holds about 1/N of it.
  Rank 0 alone writes the output directory (report.md and report.json with a per-rank
  table next to the ZeRO formula, metrics.jsonl with every rank's memory and time in
  collectives, monitor.jsonl, memory.svg, config.toml, run_state.json), shows progress
  and serves Prometheus; the other ranks write only their part of the checkpoint and
  print only their errors, prefixed with their rank. memory.limit_bytes is per rank.
  [shard] configures the group: stage (1 or 2), timeout_secs, max_shard_bytes,
  rebalance_hot_fraction (a rank whose RSS is that far above the median at a checkpoint
  sheds optimizer shards).
  Stopping: every rank treats SIGINT, SIGTERM and SIGUSR1 like Ctrl-C: the ranks stop at
  the same step, write the checkpoint together and exit 130. mpirun forwards SIGUSR1 at
  once (kill -USR1 <mpirun pid>); on Ctrl-C it sends SIGTERM only after
  odls_base_sigkill_timeout seconds (default 1) and SIGKILL as long after that, so add
  --mca odls_base_sigkill_timeout 60 to give Ctrl-C time to checkpoint (mpirun itself
  then exits 1, the ranks 130).
  --resume DIR continues on any number of ranks, 1 (no mpirun) included.";

fn config_args(cmd: Command) -> Command {
    cmd.arg(
        Arg::new("config")
            .long("config")
            .value_name("FILE")
            .help("TOML config file ([memory], [training], [run]); default: $GM_CONFIG"),
    )
    .arg(
        Arg::new("budget")
            .long("budget")
            .value_name("SIZE")
            .help("memory limit, e.g. 8GiB, 512MB (memory.limit_bytes)"),
    )
    .arg(
        Arg::new("steps")
            .long("steps")
            .value_name("N")
            .help("learner steps in all (run.steps)"),
    )
    .arg(
        Arg::new("seed")
            .long("seed")
            .value_name("N")
            .help("seed (run.seed)"),
    )
    .arg(
        Arg::new("data")
            .long("data")
            .value_name("CSV")
            .help("bars from a CSV file instead of the synthetic market (run.data)"),
    )
    .arg(
        Arg::new("out")
            .long("out")
            .value_name("DIR")
            .help("output directory (run.out); default runs/<timestamp>"),
    )
    .arg(
        Arg::new("metrics-addr")
            .long("metrics-addr")
            .value_name("127.0.0.1:PORT")
            .help("serve Prometheus metrics here (run.metrics_addr)"),
    )
    .arg(
        Arg::new("set")
            .long("set")
            .value_name("KEY=VALUE")
            .action(ArgAction::Append)
            .help("set any config key, e.g. --set training.max_batch=64"),
    )
}

fn ranks_arg() -> Arg {
    Arg::new("ranks").long("ranks").value_name("N").help(
        "data-parallel ranks (run.ranks, default 1); N > 1 needs the mpi build and mpirun -n N",
    )
}

fn command() -> Command {
    Command::new("grandmodel")
        .about("Train the GrandModel trading agent inside a memory budget, with a memory report.")
        .version(env!("CARGO_PKG_VERSION"))
        .after_help(EXIT_CODES)
        .subcommand_required(true)
        .subcommand(
            config_args(Command::new("train").about(
                "train the agent (synthetic market by default) and write report.md, report.json, metrics.jsonl, memory.svg",
            ))
            .arg(ranks_arg())
            .after_help("With --ranks N > 1, one rank of a data-parallel run under mpirun -n N (see MPI in --help).")
            .after_long_help(MPI_HELP)
            .arg(
                Arg::new("resume")
                    .long("resume")
                    .value_name("DIR")
                    .help("continue the run whose output directory is DIR"),
            )
            .arg(
                Arg::new("quiet")
                    .long("quiet")
                    .action(ArgAction::SetTrue)
                    .help("no progress output"),
            ),
        )
        .subcommand(
            config_args(Command::new("report").about(
                "measure baseline vs optimized per component (embedders, replay, pipeline, total) and write report.md, report.json, report.svg",
            ))
            .arg(
                Arg::new("batch")
                    .long("batch")
                    .value_name("N")
                    .default_value("64")
                    .value_parser(clap::value_parser!(usize))
                    .help("batch of the embedder steps"),
            )
            .arg(
                Arg::new("reps")
                    .long("reps")
                    .value_name("N")
                    .default_value("3")
                    .value_parser(clap::value_parser!(usize))
                    .help("measured repetitions per setting"),
            )
            .arg(
                Arg::new("transitions")
                    .long("transitions")
                    .value_name("N")
                    .default_value("20000")
                    .value_parser(clap::value_parser!(usize))
                    .help("transitions in the replay comparison"),
            ),
        )
        .subcommand(
            Command::new("config")
                .about("configuration")
                .subcommand_required(true)
                .subcommand(
                    config_args(Command::new("show").about(
                        "print the resolved configuration and where each value came from",
                    ))
                    .arg(ranks_arg()),
                ),
        )
        .subcommand(
            Command::new("buffer")
                .about("saved replay buffers")
                .subcommand_required(true)
                .subcommand(
                    Command::new("inspect")
                        .about("header, version, counts, bytes and compression of a saved buffer")
                        .arg(Arg::new("file").required(true).value_name("FILE"))
                        .arg(
                            Arg::new("json")
                                .long("json")
                                .action(ArgAction::SetTrue)
                                .help("print JSON"),
                        ),
                ),
        )
}

/// The layers of a resolved config from the command line.
fn layers(m: &ArgMatches, fallback_file: Option<PathBuf>) -> Result<Layers, Error> {
    let mut flags = Vec::new();
    for (id, key) in [
        ("budget", "memory.limit_bytes"),
        ("steps", "run.steps"),
        ("seed", "run.seed"),
        ("data", "run.data"),
        ("out", "run.out"),
        ("metrics-addr", "run.metrics_addr"),
        ("ranks", "run.ranks"),
    ] {
        // `--ranks` exists on `train` and `config show` only.
        if let Ok(Some(v)) = m.try_get_one::<String>(id) {
            flags.push((format!("--{id}"), key.to_string(), v.clone()));
        }
    }
    if let Some(sets) = m.get_many::<String>("set") {
        for s in sets {
            let Some((k, v)) = s.split_once('=') else {
                return Err(Error::Config {
                    key: s.clone(),
                    value: "(no value)".into(),
                    origin: "flag --set".into(),
                    allowed: "KEY=VALUE, e.g. --set training.max_batch=64".into(),
                });
            };
            flags.push(("--set".into(), k.trim().to_string(), v.to_string()));
        }
    }
    Ok(Layers {
        file: m.get_one::<String>("config").map(PathBuf::from),
        fallback_file,
        env: std::env::vars().collect(),
        flags,
    })
}

/// Progress on a terminal: an indicatif bar on stdout.
struct Bar(Option<ProgressBar>);

impl ProgressSink for Bar {
    fn start(&mut self, done: u64, total: u64) {
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_position(done);
        pb.enable_steady_tick(Duration::from_millis(200));
        self.0 = Some(pb);
    }
    fn update(&mut self, p: &Progress) {
        if let Some(pb) = &self.0 {
            pb.set_position(p.step);
            pb.set_message(fields(p));
        }
    }
    fn message(&mut self, msg: &str) {
        match &self.0 {
            Some(pb) => pb.println(format!("grandmodel: {msg}")),
            None => eprintln!("grandmodel: {msg}"),
        }
    }
    fn finish(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish();
        }
    }
}

/// Progress without a terminal: one plain line per logged step.
struct Lines;

impl ProgressSink for Lines {
    fn start(&mut self, done: u64, total: u64) {
        println!("training: step {done} of {total}");
    }
    fn update(&mut self, p: &Progress) {
        println!(
            "step {}/{} | {} | eta {}s",
            p.step,
            p.total,
            fields(p),
            p.eta.as_secs()
        );
    }
    fn message(&mut self, msg: &str) {
        eprintln!("grandmodel: {msg}");
    }
    fn finish(&mut self) {}
}

fn fields(p: &Progress) -> String {
    format!(
        "loss {} | return {} | mem {} / {} ({:.1}%) | {:.1} steps/s",
        p.loss.map_or_else(|| "-".into(), |l| format!("{l:.5}")),
        p.episode_return
            .map_or_else(|| "-".into(), |r| format!("{r:+.5}")),
        ByteSize(p.rss_bytes),
        ByteSize(p.limit_bytes),
        100.0 * p.rss_bytes as f64 / p.limit_bytes as f64,
        p.steps_per_sec
    )
}

/// Set by Ctrl-C (and, in a data-parallel run, SIGTERM and SIGUSR1): the
/// run stops after the current step and writes a checkpoint.
static STOP: AtomicBool = AtomicBool::new(false);

/// SIGTERM and SIGUSR1 in a data-parallel rank: a stop request like
/// Ctrl-C; the second one quits at once.
extern "C" fn on_stop_signal(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe and ends the process.
        unsafe { libc::_exit(exit::INTERRUPTED) };
    }
}

/// Makes SIGTERM and SIGUSR1 stop requests (mpirun turns Ctrl-C into
/// SIGTERM for its ranks, and forwards SIGUSR1).
fn install_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only touches an atomic and calls `_exit`,
        // both async-signal-safe; `signal` replaces the disposition of a
        // signal this program does not otherwise use.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
}

/// Ctrl-C sets [`STOP`]; a second one quits at once. `speak`: say so.
fn install_ctrlc(speak: bool) {
    let _ = ctrlc::set_handler(move || {
        if STOP.swap(true, Ordering::SeqCst) {
            if speak {
                eprintln!("grandmodel: second interrupt, quitting without a checkpoint");
            }
            std::process::exit(exit::INTERRUPTED);
        }
        if speak {
            eprintln!("grandmodel: interrupt: finishing the step and writing a checkpoint (Ctrl-C again to quit at once)");
        }
    });
}

fn progress_sink(quiet: bool) -> Box<dyn ProgressSink> {
    if quiet {
        Box::new(train::NoProgress)
    } else if std::io::stdout().is_terminal() {
        Box::new(Bar(None))
    } else {
        Box::new(Lines)
    }
}

fn print_result(s: &train::TrainSummary, resolved: &Resolved) -> i32 {
    if s.interrupted {
        eprintln!(
            "grandmodel: interrupted at step {} of {}: checkpoint written to {}; continue with: grandmodel train --resume {}",
            s.steps,
            resolved.config.run.steps,
            s.out_dir.join("checkpoint").display(),
            s.out_dir.display()
        );
        return exit::INTERRUPTED;
    }
    println!("\n{}", train::summary_table(s));
    println!(
        "reports: {0}/report.md, {0}/report.json, {0}/metrics.jsonl, {0}/memory.svg",
        s.out_dir.display()
    );
    exit::OK
}

fn train_cmd(m: &ArgMatches) -> Result<i32, Error> {
    let resume = m.get_one::<String>("resume").map(PathBuf::from);
    // A resumed run reads its saved config unless --config says otherwise.
    let fallback = resume
        .as_ref()
        .map(|r| r.join("config.toml"))
        .filter(|p| p.is_file());
    let mut l = layers(m, fallback)?;
    if let Some(r) = &resume {
        // Keep writing into the resumed directory unless --out is given.
        if !l.flags.iter().any(|(_, k, _)| k == "run.out") {
            l.flags
                .push(("--resume".into(), "run.out".into(), r.display().to_string()));
        }
    }
    let resolved = config::resolve(&l)?;
    let ranks = resolved.config.run.ranks;
    if ranks > 1 {
        return parallel_train(&resolved, TrainOptions { resume }, m.get_flag("quiet"));
    }
    if let Some(world) = parallel::launcher_world_size().filter(|&w| w > 1) {
        // Every process would train alone into the same directory.
        return Err(Error::WorldMismatch { ranks, world });
    }
    install_ctrlc(true);
    let mut sink = progress_sink(m.get_flag("quiet"));
    let s = train::run(&resolved, &TrainOptions { resume }, &STOP, sink.as_mut())?;
    Ok(print_result(&s, &resolved))
}

/// `line` on stderr in one write, so mpirun does not interleave it with
/// another rank's.
fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// One rank of `train --ranks N` under mpirun. Errors are printed here,
/// prefixed with the rank; a failure the other ranks do not know about
/// aborts the whole job (they would wait in a collective until the
/// timeout).
fn parallel_train(resolved: &Resolved, opts: TrainOptions, quiet: bool) -> Result<i32, Error> {
    let ranks = resolved.config.run.ranks;
    let group = match Group::connect(ranks, resolved.config.shard.timeout) {
        Ok(g) => g,
        Err(e) => {
            // The same error on every rank (from the environment): said once.
            let code = e.exit_code();
            match parallel::launcher_rank() {
                None | Some(0) => say(&format!("grandmodel: {e}")),
                Some(r) if matches!(e, Error::Shard(_)) => {
                    say(&format!("grandmodel: rank {r}: {e}"))
                }
                Some(_) => {}
            }
            return Ok(code);
        }
    };
    let rank = group.rank();
    install_ctrlc(rank == 0);
    install_stop_signals();
    // Plain lines: mpirun gives its ranks a pseudo-terminal even when its
    // own output goes to a file, so a progress bar would be escape codes.
    let mut sink: Box<dyn ProgressSink> = if rank == 0 && !quiet {
        Box::new(Lines)
    } else {
        Box::new(train::NoProgress)
    };
    let result = train::run_parallel(resolved, &opts, group.communicator(), &STOP, sink.as_mut());
    drop(sink);
    match result {
        Ok(s) => {
            let code = if rank == 0 {
                print_result(&s, resolved)
            } else if s.interrupted {
                exit::INTERRUPTED
            } else {
                exit::OK
            };
            // Waits for every rank (rank 0 evaluates and writes the
            // reports first).
            group.finish();
            Ok(code)
        }
        Err(f) => {
            let code = f.error.exit_code();
            // Another rank's failure is that rank's to report.
            if rank == 0 || !matches!(*f.error, Error::PeerFailed { .. }) {
                say(&format!("grandmodel: rank {rank}: {}", f.error));
            }
            if !f.peers_know && !group.is_broken() {
                group.abort(code);
            }
            group.finish();
            Ok(code)
        }
    }
}

fn report_cmd(m: &ArgMatches) -> Result<i32, Error> {
    let resolved = config::resolve(&layers(m, None)?)?;
    let c = &resolved.config;
    let get = |id: &str, default: usize| m.get_one::<usize>(id).copied().unwrap_or(default);
    let opts = crate::bench::BenchOptions {
        model: c.run.model,
        batch: get("batch", 64).max(1),
        reps: get("reps", 3).max(1),
        transitions: get("transitions", 20_000).clamp(100, 1_000_000),
        training: c.training.clone(),
        limit_bytes: c.memory.limit_bytes,
    };
    let dir =
        c.run.out.clone().unwrap_or_else(|| {
            PathBuf::from("runs").join(format!("report-{}", train::now_stamp()))
        });
    let rows = crate::bench::write_report(&opts, &dir, &mut |msg| eprintln!("grandmodel: {msg}"))?;
    println!("| component | baseline | optimized | ratio |\n|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2}x |",
            r.component,
            ByteSize(r.baseline_bytes),
            ByteSize(r.optimized_bytes),
            r.memory_ratio()
        );
    }
    println!(
        "reports: {0}/report.md, {0}/report.json, {0}/report.svg",
        dir.display()
    );
    Ok(exit::OK)
}

fn run() -> Result<i32, Error> {
    let m = match command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    print!("{e}");
                    Ok(exit::OK)
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    eprint!("{e}");
                    Ok(exit::USAGE)
                }
                _ => {
                    let text = e.to_string();
                    let first = text
                        .lines()
                        .next()
                        .unwrap_or("bad command line")
                        .trim_start_matches("error: ");
                    eprintln!("grandmodel: {first} (see grandmodel --help)");
                    Ok(exit::USAGE)
                }
            };
        }
    };
    match m.subcommand() {
        Some(("train", sm)) => train_cmd(sm),
        Some(("report", sm)) => report_cmd(sm),
        Some(("config", sm)) => match sm.subcommand() {
            Some(("show", ssm)) => {
                let r = config::resolve(&layers(ssm, None)?)?;
                print!("{}", r.show());
                Ok(exit::OK)
            }
            _ => Ok(exit::USAGE),
        },
        Some(("buffer", sm)) => match sm.subcommand() {
            Some(("inspect", ssm)) => {
                let file = PathBuf::from(ssm.get_one::<String>("file").map_or("", |s| s.as_str()));
                let info = crate::inspect::inspect_buffer(&file)?;
                if ssm.get_flag("json") {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&info).unwrap_or_default()
                    );
                } else {
                    print!("{}", info.to_text());
                }
                Ok(exit::OK)
            }
            _ => Ok(exit::USAGE),
        },
        _ => Ok(exit::USAGE),
    }
}

/// Runs the program on `std::env::args()` and returns its exit code.
/// Install `gm_leak::TrackingAllocator` as the binary's global allocator
/// first: memory figures and the training-step plan need it.
pub fn main() -> i32 {
    // Never a backtrace: a panic is a bug, reported in one line.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("grandmodel: internal error (a bug, please report it): {info}");
    }));
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("grandmodel: {e}");
            e.exit_code()
        }
    }
}
