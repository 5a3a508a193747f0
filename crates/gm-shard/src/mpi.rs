//! The MPI backend: [`MpiComm`], one rank per process of an `mpirun` job
//! (launched the same way everywhere with [`crate::mpirun_command`]).
//!
//! # How a collective runs
//! 1. **Header exchange** (point-to-point, `MPI_Isend`/`MPI_Irecv` with
//!    every other rank): each rank sends a 56-byte [`Header`] (op, sequence
//!    number, buffer length, a 64-bit hash of `counts`, root) and receives
//!    everyone's. Every rank then runs the same [`check::check`] on the same
//!    table, so argument errors are the in-process backend's errors, in its
//!    order, on every rank, and the group stays usable. It is also the
//!    barrier, and it tells exactly which ranks are missing when it times
//!    out. Cost: 2·(world − 1) small messages per rank per call.
//! 2. **Data phase**, with MPI-3 non-blocking collectives on a duplicate of
//!    `MPI_COMM_WORLD`. Sums are never left to MPI's reductions (whose
//!    order is implementation-defined): all-reduce is an `MPI_Ialltoallv`
//!    that hands rank q the q-th of `world` near-equal parts of every
//!    rank's buffer, a local sum of those parts in rank order, and an
//!    `MPI_Iallgatherv` of the summed parts; reduce-scatter is the first
//!    two steps with the caller's `counts`. Each element is therefore
//!    summed once, in rank order, by one rank, and copied to the others:
//!    bit-identical on every rank and equal to the in-process backend's
//!    result. The bytes moved per rank are those of a ring all-reduce
//!    (2·(world − 1)/world of the buffer); the message count is O(world).
//!    Broadcast is `MPI_Ibcast`, all-gather `MPI_Iallgatherv`, gather of
//!    statistics `MPI_Igather`.
//!
//! Every request is polled with `MPI_Testsome` until it completes or the
//! call's deadline (one [`MpiComm::init`] timeout per call) passes.
//!
//! # What a timeout leaves behind
//! MPI cannot cancel a pending collective, so on a timeout (or an MPI error)
//! the buffers MPI may still read or write are leaked on purpose (never
//! freed, see [`InFlight`]), the requests are abandoned, and the
//! communicator is marked broken: later calls return [`Error::Aborted`]
//! without touching MPI. Dropping a broken `MpiComm` does **not** finalize
//! MPI (`MPI_Finalize` waits for every rank, and one of them is missing): the
//! process should then end, and `mpirun` ends the whole job because a rank
//! exited without finalizing. [`MpiComm::abort`] ends the job at once.

use crate::check::{self, Backoff, Header, InFlight, Mismatch, HEADER_WORDS};
use crate::comm::{validate_timeout, Communicator, Op};
use crate::error::{Error, Result};
use mpi::environment::{Threading, Universe};
use mpi::ffi;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, c_void};
use std::fmt;
use std::mem::ManuallyDrop;
use std::time::{Duration, Instant};

const BACKEND: &str = "mpi";

/// Tag of header messages on the duplicated communicator (which carries
/// nothing else point-to-point). Below 32767, the least `MPI_TAG_UB`.
const HEADER_TAG: c_int = 0x4753;

/// The most elements one buffer may have in one MPI call: MPI counts and
/// displacements are C `int`s.
pub(crate) const MAX_ELEMENTS: usize = i32::MAX as usize;

/// One rank of the `MPI_COMM_WORLD` of an `mpirun` job.
///
/// Owns MPI: [`MpiComm::init`] initializes it and dropping the communicator
/// finalizes it (unless the group is broken, see the module docs), so
/// there is at most one per process, for the life of the process.
///
/// `Send`, not `Sync`: MPI is initialized with `MPI_THREAD_SERIALIZED`, which
/// lets any thread call MPI as long as no two do so at once; `&self` methods
/// on a `!Sync` value are never concurrent, and no other code in this crate
/// calls MPI. Drop it on the thread that created it where you can
/// (`MPI_Finalize` "should" run on the thread that initialized MPI; Open MPI
/// accepts another).
///
/// Faults: a peer missing past the timeout gives [`Error::Timeout`] (with
/// the missing ranks) and breaks the group (later calls:
/// [`Error::Aborted`]); a dropped broken communicator leaves MPI
/// unfinalized, so when the process exits `mpirun` ends the job with an
/// error. A rank that dies ends the job the same way (its peers are killed
/// by `mpirun`, whatever they were waiting for).
///
/// ```no_run
/// use gm_shard::{launched_by_mpirun, mpirun_command, Communicator, MpiComm};
/// use std::time::Duration;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// if !launched_by_mpirun() {
///     // Relaunch this program as 4 ranks and report how the job ended.
///     let status = mpirun_command(4, &std::env::current_exe()?).status()?;
///     std::process::exit(status.code().unwrap_or(1));
/// }
/// let comm = MpiComm::init(Duration::from_secs(60))?;
/// let mut grads = vec![comm.rank() as f32; 1024];
/// comm.all_reduce_sum(&mut grads)?; // the same bits on every rank
/// let boxed: Box<dyn Communicator + Send> = Box::new(comm);
/// boxed.barrier()?;
/// # Ok(())
/// # }
/// ```
pub struct MpiComm {
    /// The `MPI_COMM_WORLD` duplicate every collective uses: our own
    /// matching space, with errors returned instead of aborting the job.
    comm: RawComm,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Sequence number of this rank's next collective.
    seq: Cell<u64>,
    /// Why the group is broken, once it is.
    broken: RefCell<Option<String>>,
    /// Finalizes MPI when dropped; dropped by hand in [`Drop`], after the
    /// communicator is freed, and only if the group is not broken.
    universe: ManuallyDrop<Universe>,
}

/// An MPI communicator handle.
struct RawComm(ffi::MPI_Comm);

// SAFETY: an `MPI_Comm` is a handle (in Open MPI a pointer to a library
// object) with no thread affinity. MPI is initialized with
// `MPI_THREAD_SERIALIZED`, so calls from whichever thread owns the
// `MpiComm` are allowed; `MpiComm` is `!Sync` (its `Cell`s), so they are
// never concurrent.
unsafe impl Send for RawComm {}

impl fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("timeout", &self.timeout)
            .field("seq", &self.seq.get())
            .field("broken", &self.broken.borrow())
            .finish_non_exhaustive()
    }
}

/// An element type MPI moves.
trait Word: Copy + Default {
    fn datatype() -> ffi::MPI_Datatype;
}

impl Word for f32 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: a constant of mpi-sys's C shim, set before `main`.
        unsafe { ffi::RSMPI_FLOAT }
    }
}

impl Word for u64 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as for `f32`.
        unsafe { ffi::RSMPI_UINT64_T }
    }
}

impl Word for u8 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as for `f32`.
        unsafe { ffi::RSMPI_UINT8_T }
    }
}

fn request_null() -> ffi::MPI_Request {
    // SAFETY: a constant of mpi-sys's C shim, set before `main`.
    unsafe { ffi::RSMPI_REQUEST_NULL }
}

/// `x` as a C int; callers have checked `x <= MAX_ELEMENTS` (saturates
/// otherwise, never panics).
fn int(x: usize) -> c_int {
    c_int::try_from(x).unwrap_or(c_int::MAX)
}

fn ints(xs: &[usize]) -> Vec<c_int> {
    xs.iter().map(|&x| int(x)).collect()
}

/// MPI's text for an error code.
fn error_string(code: c_int) -> String {
    let mut buf = [0 as c_char; ffi::MPI_MAX_ERROR_STRING as usize];
    let mut len: c_int = 0;
    // SAFETY: `buf` holds MPI_MAX_ERROR_STRING characters, as required.
    let rc = unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr(), &mut len) };
    let len = usize::try_from(len).unwrap_or(0).min(buf.len());
    if rc != ffi::MPI_SUCCESS as c_int || len == 0 {
        return format!("MPI error {code}");
    }
    let bytes: Vec<u8> = buf[..len].iter().map(|&c| c as u8).collect();
    format!("{} (MPI error {code})", String::from_utf8_lossy(&bytes))
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// One collective in progress: its name, number and deadline.
#[derive(Debug, Clone, Copy)]
struct Call {
    op: Op,
    seq: u64,
    deadline: Instant,
}

impl MpiComm {
    /// Initializes MPI (`MPI_Init_thread`, requesting
    /// `MPI_THREAD_SERIALIZED`) and returns this process's rank of
    /// `MPI_COMM_WORLD`, whose collectives fail with [`Error::Timeout`]
    /// after waiting `timeout` (1 ms ..= 7 days) for peers.
    ///
    /// Every rank of the job must call it (MPI's initialization is itself
    /// collective and not bounded by `timeout`; `mpirun` ends the job if a
    /// rank dies first). Run outside `mpirun`, MPI starts a one-rank world.
    ///
    /// Errors: [`Error::Config`] for the timeout; [`Error::Unavailable`] if
    /// MPI was already initialized in this process (a second `MpiComm`, or
    /// one after the first was dropped: MPI cannot be initialized twice),
    /// or the library lacks `MPI_THREAD_SERIALIZED`.
    pub fn init(timeout: Duration) -> Result<MpiComm> {
        validate_timeout(timeout)?;
        if mpi::environment::is_finalized() {
            return Err(unavailable(
                "MPI was already finalized in this process and cannot be initialized again",
            ));
        }
        let Some((universe, provided)) = mpi::initialize_with_threading(Threading::Serialized)
        else {
            return Err(unavailable(
                "MPI is already initialized in this process: there can be one MpiComm per \
                 process, for the life of the process",
            ));
        };
        if provided < Threading::Serialized {
            drop(universe); // finalizes: every rank got the same level
            return Err(unavailable(format!(
                "the MPI library provides thread level {provided:?}; MpiComm needs Serialized"
            )));
        }
        let universe = ManuallyDrop::new(universe);
        // SAFETY: a constant of mpi-sys's C shim, set before `main`.
        let mut comm = RawComm(unsafe { ffi::RSMPI_COMM_NULL });
        // SAFETY: MPI is initialized; `RSMPI_COMM_WORLD` is its world
        // communicator and `comm.0` a place for the new handle.
        let mut rc = unsafe { ffi::MPI_Comm_dup(ffi::RSMPI_COMM_WORLD, &mut comm.0) };
        if rc == ffi::MPI_SUCCESS as c_int {
            // SAFETY: `comm.0` is the communicator just created.
            rc = unsafe { ffi::MPI_Comm_set_errhandler(comm.0, ffi::RSMPI_ERRORS_RETURN) };
        }
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        if rc == ffi::MPI_SUCCESS as c_int {
            // SAFETY: as above; the out-pointers are valid.
            rc = unsafe { ffi::MPI_Comm_rank(comm.0, &mut rank) };
        }
        if rc == ffi::MPI_SUCCESS as c_int {
            // SAFETY: as above.
            rc = unsafe { ffi::MPI_Comm_size(comm.0, &mut size) };
        }
        if rc != ffi::MPI_SUCCESS as c_int {
            // The universe stays undropped: finalizing after a failed
            // collective setup could wait for ranks that are not coming.
            return Err(unavailable(format!(
                "could not set up the communicator: {}",
                error_string(rc)
            )));
        }
        Ok(MpiComm {
            comm,
            rank: usize::try_from(rank).unwrap_or(0),
            world: usize::try_from(size).unwrap_or(1).max(1),
            timeout,
            seq: Cell::new(0),
            broken: RefCell::new(None),
            universe,
        })
    }

    /// The timeout of every collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether an earlier failure broke the group (every collective now
    /// returns [`Error::Aborted`]).
    pub fn is_broken(&self) -> bool {
        self.broken.borrow().is_some()
    }

    /// Ends the whole job now (`MPI_Abort` on `MPI_COMM_WORLD`): every rank
    /// is killed and `mpirun` exits with an error, reporting `code`. For a
    /// rank that hit an error it cannot share with its peers; it does not
    /// wait for them and never returns.
    pub fn abort(&self, code: i32) -> ! {
        // SAFETY: MPI is initialized and not finalized (that happens only
        // when `self` is dropped).
        unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code) };
        // Open MPI's MPI_Abort does not return; should another one, end
        // this process at least.
        std::process::exit(if code == 0 { 1 } else { code })
    }

    /// Starts a collective: its sequence number and deadline, or
    /// [`Error::Aborted`] if the group is broken.
    fn begin(&self, op: Op) -> Result<Call> {
        if let Some(cause) = &*self.broken.borrow() {
            return Err(Error::Aborted {
                op,
                rank: self.rank,
                cause: cause.clone(),
            });
        }
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        Ok(Call {
            op,
            seq,
            deadline: Instant::now() + self.timeout,
        })
    }

    /// Marks the group broken by `e` and returns `e`.
    fn break_with(&self, e: Error) -> Error {
        self.broken
            .borrow_mut()
            .get_or_insert_with(|| e.to_string());
        e
    }

    /// An MPI call of `call` failed with `code`: the group is broken.
    fn mpi_failed(&self, call: Call, what: &str, code: c_int) -> Error {
        self.break_with(Error::Backend {
            backend: BACKEND,
            op: call.op,
            seq: call.seq,
            rank: self.rank,
            reason: format!("{what}: {}", error_string(code)),
        })
    }

    /// The deadline passed with `missing` ranks not arrived: the group is
    /// broken.
    fn timed_out(&self, call: Call, missing: Vec<usize>) -> Error {
        self.break_with(Error::Timeout {
            op: call.op,
            seq: call.seq,
            rank: self.rank,
            timeout: self.timeout,
            missing,
        })
    }

    /// Every rank but this one.
    fn others(&self) -> Vec<usize> {
        (0..self.world).filter(|&q| q != self.rank).collect()
    }

    /// Polls `reqs` until all have completed (`Ok(true)`) or the deadline
    /// has passed (`Ok(false)`; completed requests are then
    /// `MPI_REQUEST_NULL`, the others still pending). `Err` carries an MPI
    /// error code.
    fn poll(reqs: &mut [ffi::MPI_Request], deadline: Instant) -> Result<bool, c_int> {
        let null = request_null();
        let mut indices = vec![0 as c_int; reqs.len()];
        let backoff = Backoff::until(deadline);
        loop {
            let mut done: c_int = 0;
            // SAFETY: `reqs` holds active requests or MPI_REQUEST_NULL;
            // `indices` has room for one index per request; statuses are
            // ignored.
            let rc = unsafe {
                ffi::MPI_Testsome(
                    int(reqs.len()),
                    reqs.as_mut_ptr(),
                    &mut done,
                    indices.as_mut_ptr(),
                    ffi::RSMPI_STATUSES_IGNORE,
                )
            };
            if rc != ffi::MPI_SUCCESS as c_int {
                return Err(rc);
            }
            if reqs.iter().all(|&r| r == null) {
                return Ok(true);
            }
            if !backoff.wait() {
                return Ok(false);
            }
        }
    }

    /// Waits for the requests of a data phase (every rank has arrived, so
    /// a stall cannot be pinned on one: `missing` lists all others).
    fn finish(&self, call: Call, what: &str, reqs: &mut [ffi::MPI_Request]) -> Result<()> {
        match Self::poll(reqs, call.deadline) {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.timed_out(call, self.others())),
            Err(rc) => Err(self.mpi_failed(call, what, rc)),
        }
    }

    /// Sends this rank's header to every other rank and receives theirs:
    /// the table, index = rank.
    fn exchange_headers(&self, call: Call, header: Header) -> Result<Vec<Header>> {
        let (world, me) = (self.world, self.rank);
        if world == 1 {
            return Ok(vec![header]);
        }
        // Both on the heap: an abandoned send may still read its buffer
        // after this function has returned.
        let mut bufs = InFlight::new((header.encode().to_vec(), vec![0u64; world * HEADER_WORDS]));
        let others = self.others();
        // Receives first (index i = others[i]), then sends.
        let mut reqs = vec![request_null(); 2 * others.len()];
        let (send, table) = bufs.get_mut();
        for (i, &q) in others.iter().enumerate() {
            let slot = table[q * HEADER_WORDS..].as_mut_ptr();
            // SAFETY: `slot` has HEADER_WORDS u64s, owned by `bufs`, which
            // lives until the request completes or is leaked.
            let rc = unsafe {
                ffi::MPI_Irecv(
                    slot.cast::<c_void>(),
                    int(HEADER_WORDS),
                    u64::datatype(),
                    int(q),
                    HEADER_TAG,
                    self.comm.0,
                    &mut reqs[i],
                )
            };
            if rc != ffi::MPI_SUCCESS as c_int {
                return Err(self.mpi_failed(call, "MPI_Irecv (header)", rc));
            }
        }
        for (i, &q) in others.iter().enumerate() {
            // SAFETY: `send` has HEADER_WORDS u64s, owned by `bufs`.
            let rc = unsafe {
                ffi::MPI_Isend(
                    send.as_ptr().cast::<c_void>(),
                    int(HEADER_WORDS),
                    u64::datatype(),
                    int(q),
                    HEADER_TAG,
                    self.comm.0,
                    &mut reqs[others.len() + i],
                )
            };
            if rc != ffi::MPI_SUCCESS as c_int {
                return Err(self.mpi_failed(call, "MPI_Isend (header)", rc));
            }
        }
        match Self::poll(&mut reqs, call.deadline) {
            Ok(true) => {}
            Ok(false) => {
                let null = request_null();
                let missing = others
                    .iter()
                    .zip(&reqs)
                    .filter(|(_, &r)| r != null)
                    .map(|(&q, _)| q)
                    .collect::<Vec<_>>();
                // Only sends pending: the peers arrived but are not
                // receiving; no one in particular is missing.
                let missing = if missing.is_empty() { others } else { missing };
                return Err(self.timed_out(call, missing));
            }
            Err(rc) => return Err(self.mpi_failed(call, "header exchange", rc)),
        }
        let (_, table) = bufs.completed();
        let mut headers = Vec::with_capacity(world);
        for q in 0..world {
            let h = if q == me {
                Some(header)
            } else {
                Header::decode(&table[q * HEADER_WORDS..(q + 1) * HEADER_WORDS])
            };
            match h {
                Some(h) if h.seq == call.seq => headers.push(h),
                _ => {
                    return Err(self.break_with(Error::Backend {
                        backend: BACKEND,
                        op: call.op,
                        seq: call.seq,
                        rank: me,
                        reason: format!(
                            "rank {q} sent a header that is not collective #{}: {:?}",
                            call.seq,
                            &table[q * HEADER_WORDS..(q + 1) * HEADER_WORDS]
                        ),
                    }))
                }
            }
        }
        Ok(headers)
    }

    /// The header exchange and its verdict: `Ok` if the collective may
    /// run, else the argument error every rank returns.
    fn agree(&self, call: Call, header: Header, counts: &[usize]) -> Result<()> {
        let headers = self.exchange_headers(call, header)?;
        match check::check(self.world, &headers) {
            Ok(()) => Ok(()),
            Err(Mismatch::Fail(e)) => Err(e),
            Err(Mismatch::Counts { op, rank }) => {
                // Both lists have `world` entries (checked before): fetch
                // them to say how they differ.
                let mine: Vec<u64> = (0..self.world)
                    .map(|i| counts.get(i).map_or(0, |&c| c as u64))
                    .collect();
                let mut list0 = mine.clone();
                self.bcast(call, &mut list0, 0)?;
                let mut list = mine;
                self.bcast(call, &mut list, rank)?;
                let size = |v: Vec<u64>| -> Vec<usize> {
                    v.into_iter()
                        .map(|c| usize::try_from(c).unwrap_or(usize::MAX))
                        .collect()
                };
                Err(check::counts_mismatch(op, rank, &size(list0), &size(list)))
            }
        }
    }

    /// Fails (the same way on every rank: the sizes are agreed) if a
    /// buffer of `elements` is too large for one MPI call.
    fn limit(call: Call, what: &'static str, elements: usize) -> Result<()> {
        if elements <= MAX_ELEMENTS {
            Ok(())
        } else {
            Err(Error::TooLarge {
                backend: BACKEND,
                op: call.op,
                what,
                elements,
                max: MAX_ELEMENTS,
            })
        }
    }

    /// `MPI_Ibcast` of `buf` from `root` (arguments agreed).
    fn bcast<T: Word>(&self, call: Call, buf: &mut [T], root: usize) -> Result<()> {
        let mut data = InFlight::new(buf.to_vec());
        let mut req = [request_null()];
        let d = data.get_mut();
        // SAFETY: `d` holds `buf.len()` elements of `T`, owned by `data`
        // until the request completes (or leaked).
        let rc = unsafe {
            ffi::MPI_Ibcast(
                d.as_mut_ptr().cast::<c_void>(),
                int(d.len()),
                T::datatype(),
                int(root),
                self.comm.0,
                &mut req[0],
            )
        };
        if rc != ffi::MPI_SUCCESS as c_int {
            return Err(self.mpi_failed(call, "MPI_Ibcast", rc));
        }
        self.finish(call, "MPI_Ibcast", &mut req)?;
        buf.copy_from_slice(&data.completed());
        Ok(())
    }

    /// `MPI_Ialltoallv`: sends `send[offs[q]..][..counts[q]]` to rank q and
    /// receives `m` elements from every rank into part q of the result
    /// (`world * m` elements).
    fn all_to_all(
        &self,
        call: Call,
        send: Vec<f32>,
        counts: &[usize],
        offs: &[usize],
        m: usize,
    ) -> Result<Vec<f32>> {
        let world = self.world;
        let mut bufs = InFlight::new((
            send,
            vec![0f32; world * m],
            ints(counts),
            ints(offs),
            vec![int(m); world],
            (0..world).map(|q| int(q * m)).collect::<Vec<_>>(),
        ));
        let mut req = [request_null()];
        let (send, recv, sc, sd, rc_, rd) = bufs.get_mut();
        // SAFETY: every buffer and count/displacement array is owned by
        // `bufs` until the request completes (or leaked); the counts and
        // displacements stay within the buffers (checked by the callers).
        let rc = unsafe {
            ffi::MPI_Ialltoallv(
                send.as_ptr().cast::<c_void>(),
                sc.as_ptr(),
                sd.as_ptr(),
                f32::datatype(),
                recv.as_mut_ptr().cast::<c_void>(),
                rc_.as_ptr(),
                rd.as_ptr(),
                f32::datatype(),
                self.comm.0,
                &mut req[0],
            )
        };
        if rc != ffi::MPI_SUCCESS as c_int {
            return Err(self.mpi_failed(call, "MPI_Ialltoallv", rc));
        }
        self.finish(call, "MPI_Ialltoallv", &mut req)?;
        Ok(bufs.completed().1)
    }

    /// `MPI_Iallgatherv` of `local` (`counts[rank]` elements) into
    /// `total` elements, rank q's at `offs[q]`.
    fn all_gatherv(
        &self,
        call: Call,
        local: Vec<f32>,
        counts: &[usize],
        offs: &[usize],
        total: usize,
    ) -> Result<Vec<f32>> {
        let mut bufs = InFlight::new((local, vec![0f32; total], ints(counts), ints(offs)));
        let mut req = [request_null()];
        let (local, recv, rcounts, displs) = bufs.get_mut();
        // SAFETY: as in `all_to_all`.
        let rc = unsafe {
            ffi::MPI_Iallgatherv(
                local.as_ptr().cast::<c_void>(),
                int(local.len()),
                f32::datatype(),
                recv.as_mut_ptr().cast::<c_void>(),
                rcounts.as_ptr(),
                displs.as_ptr(),
                f32::datatype(),
                self.comm.0,
                &mut req[0],
            )
        };
        if rc != ffi::MPI_SUCCESS as c_int {
            return Err(self.mpi_failed(call, "MPI_Iallgatherv", rc));
        }
        self.finish(call, "MPI_Iallgatherv", &mut req)?;
        Ok(bufs.completed().1)
    }

    /// Broadcast of any element type, through the header check (as
    /// [`Op::Broadcast`]).
    fn broadcast_words<T: Word>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let call = self.begin(Op::Broadcast)?;
        self.agree(call, Header::broadcast(call.seq, buf.len(), root), &[])?;
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        Self::limit(call, "buffer", buf.len())?;
        self.bcast(call, buf, root)
    }

    /// Broadcast of bytes from `root` (same checks as
    /// [`Communicator::broadcast`]); for the NCCL id in
    /// `NcclComm::from_mpi`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.broadcast_words(buf, root)
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if self.broken.get_mut().is_some() {
            // Leave MPI initialized: finalizing waits for every rank, and
            // one did not arrive. The process should exit; mpirun then ends
            // the job (a rank exited without finalizing).
            return;
        }
        // SAFETY: `comm` was created by MPI_Comm_dup and is freed once, here;
        // no request on it is pending (the group is not broken).
        unsafe { ffi::MPI_Comm_free(&mut self.comm.0) };
        // SAFETY: dropped once, here; `universe` is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.universe) };
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let call = self.begin(Op::AllReduceSum)?;
        self.agree(call, Header::plain(call.op, call.seq, buf.len()), &[])?;
        let (n, world) = (buf.len(), self.world);
        if world == 1 || n == 0 {
            return Ok(());
        }
        // The receive buffer of the all-to-all is world·⌈n/world⌉ < n + world.
        Self::limit(call, "buffer", n.saturating_add(world))?;
        let counts = check::even_counts(n, world);
        let offs = check::offsets(&counts);
        let m = counts[self.rank];
        let parts = self.all_to_all(call, buf.to_vec(), &counts, &offs, m)?;
        let mine = check::sum_parts_in_rank_order(&parts, world);
        let full = self.all_gatherv(call, mine, &counts, &offs, n)?;
        buf.copy_from_slice(&full);
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let call = self.begin(Op::ReduceScatterSum)?;
        let h = Header::with_counts(call.op, call.seq, input.len(), counts, self.rank);
        self.agree(call, h, counts)?;
        let world = self.world;
        if world == 1 {
            return Ok(input.to_vec());
        }
        let m = counts[self.rank];
        let widest = counts.iter().copied().max().unwrap_or(0);
        Self::limit(call, "input", input.len())?;
        Self::limit(call, "received parts", widest.saturating_mul(world))?;
        let offs = check::offsets(counts);
        let parts = self.all_to_all(call, input.to_vec(), counts, &offs, m)?;
        Ok(check::sum_parts_in_rank_order(&parts, world))
    }

    fn all_gather(&self, local: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let call = self.begin(Op::AllGather)?;
        let h = Header::with_counts(call.op, call.seq, local.len(), counts, self.rank);
        self.agree(call, h, counts)?;
        if self.world == 1 {
            return Ok(local.to_vec());
        }
        let total = counts.iter().fold(0usize, |a, &b| a.saturating_add(b));
        Self::limit(call, "gathered buffer", total)?;
        let offs = check::offsets(counts);
        self.all_gatherv(call, local.to_vec(), counts, &offs, total)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast_words(buf, root)
    }

    fn barrier(&self) -> Result<()> {
        let call = self.begin(Op::Barrier)?;
        // Every rank sends its header on entry and waits for everyone's.
        self.agree(call, Header::plain(call.op, call.seq, 0), &[])
    }

    fn gather_stats(&self, values: &[u64]) -> Result<Option<Vec<Vec<u64>>>> {
        let call = self.begin(Op::GatherStats)?;
        self.agree(call, Header::plain(call.op, call.seq, values.len()), &[])?;
        let (m, world) = (values.len(), self.world);
        if world == 1 {
            return Ok(Some(vec![values.to_vec()]));
        }
        Self::limit(call, "gathered values", m.saturating_mul(world))?;
        let root = self.rank == 0;
        let recv_len = if root { m * world } else { 0 };
        let mut bufs = InFlight::new((values.to_vec(), vec![0u64; recv_len]));
        let mut req = [request_null()];
        let (send, recv) = bufs.get_mut();
        // SAFETY: both buffers are owned by `bufs` until the request
        // completes (or leaked); the receive buffer (significant at the
        // root only) holds `world * m` values there.
        let rc = unsafe {
            ffi::MPI_Igather(
                send.as_ptr().cast::<c_void>(),
                int(m),
                u64::datatype(),
                recv.as_mut_ptr().cast::<c_void>(),
                int(m),
                u64::datatype(),
                0,
                self.comm.0,
                &mut req[0],
            )
        };
        if rc != ffi::MPI_SUCCESS as c_int {
            return Err(self.mpi_failed(call, "MPI_Igather", rc));
        }
        self.finish(call, "MPI_Igather", &mut req)?;
        let (_, recv) = bufs.completed();
        if !root {
            return Ok(None);
        }
        Ok(Some(if m == 0 {
            vec![Vec::new(); world]
        } else {
            recv.chunks(m).map(<[u64]>::to_vec).collect()
        }))
    }
}
