//! The NCCL backend: [`NcclComm`], one rank per CUDA device, through
//! cudarc's NCCL bindings (dynamically loaded: this builds, and returns
//! [`Error::Unavailable`], on machines without CUDA).
//!
//! Host slices in, host results out: each call copies its buffer to the
//! device, runs the NCCL collective on the rank's stream, polls an event
//! recorded after it until it completes or the deadline passes, and copies
//! the result back.
//!
//! # How a collective runs
//! 1. **Header check**: `ncclAllGather` of every rank's 56-byte header
//!    (the MPI backend's: op, sequence number, lengths, hash of `counts`,
//!    root), then the shared check, so argument errors are the in-process
//!    backend's, on every rank, and the group stays usable. It is also the
//!    barrier.
//! 2. **Data**: `ncclAllReduce` (sum), `ncclReduceScatter` and
//!    `ncclAllGather` (uneven `counts` are padded to the largest part, so
//!    they move `world · max(counts)` elements), `ncclBroadcast`, and an
//!    `ncclAllGather` of the statistics records.
//!
//! # Sums are not in rank order
//! NCCL chooses its own reduction order (ring, tree, NVLink SHARP…), so the
//! sums of this backend equal the rank-order sums of the others within
//! float rounding (about `world` ulps of the largest addend), not bit for
//! bit, and NCCL does not document that every rank receives the same bits.
//! Use the MPI backend (or reduce on the host) where bit-identical
//! replicas matter.
//!
//! # Timeouts and what they leave behind
//! While polling, `ncclCommGetAsyncError` is checked too. On the deadline
//! the communicator is aborted (`ncclCommAbort`, which stops its kernels),
//! the device buffers of the call are leaked (never freed: NCCL may have
//! been writing them), and the group is broken: later calls return
//! [`Error::Aborted`]. `missing` lists every other rank (NCCL cannot say
//! which one is late).
//!
//! Not bounded by the timeout: creating a communicator (NCCL's blocking
//! initialization waits for every rank), and an NCCL call that connects to
//! its peers the first time a collective of a kind and size runs (NCCL
//! connects lazily and waits for the peer inside the call). Once a group
//! has run its collectives, a stalled peer is caught by the timeout.
//!
//! With one rank the collectives still go through NCCL (so single-device
//! tests exercise every path).

use crate::check::{self, Backoff, Header, InFlight, Mismatch, HEADER_WORDS};
use crate::comm::{validate_timeout, Communicator, Op};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};
use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BACKEND: &str = "nccl";

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// Checks that the CUDA driver and NCCL libraries can be loaded: cudarc
/// panics on first use otherwise.
fn libraries_present() -> Result<()> {
    // SAFETY: only tries to load the shared library (dlopen) by its names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable("no CUDA driver: libcuda could not be loaded"));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(unavailable("libnccl could not be loaded"));
    }
    Ok(())
}

/// NCCL's text for a result code.
fn nccl_error(e: &nccl::NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string
    // (or null) for any result code.
    let text = unsafe { sys::ncclGetErrorString(e.0) };
    if text.is_null() {
        return format!("{:?}", e.0);
    }
    // SAFETY: non-null, NUL-terminated, static (see above).
    let text = unsafe { CStr::from_ptr(text) };
    format!("{} ({:?})", text.to_string_lossy(), e.0)
}

/// An NCCL communicator handle.
struct RawComm(sys::ncclComm_t);

// SAFETY: an `ncclComm_t` may be used from any thread, one at a time (NCCL
// documents that a communicator must not be used concurrently); `NcclComm`
// is `!Sync` (its `Cell`s), so its `&self` methods never run concurrently.
unsafe impl Send for RawComm {}

/// One rank of an NCCL group: one CUDA device, driven from one thread.
///
/// `Send`, not `Sync`. Built by [`NcclComm::for_devices`] (ranks in this
/// process, one per device; move each to its own thread) or, with the
/// `mpi` feature, [`NcclComm::from_mpi`] (one rank per MPI process).
/// Dropping it destroys the NCCL communicator (every rank should drop its
/// own after the last collective).
pub struct NcclComm {
    comm: RawComm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Sequence number of this rank's next collective.
    seq: Cell<u64>,
    /// Why the group is broken, once it is.
    broken: RefCell<Option<String>>,
}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.stream.context().ordinal())
            .field("timeout", &self.timeout)
            .field("seq", &self.seq.get())
            .field("broken", &self.broken.borrow())
            .finish_non_exhaustive()
    }
}

/// One collective in progress.
#[derive(Debug, Clone, Copy)]
struct Call {
    op: Op,
    seq: u64,
    deadline: Instant,
}

/// An element type NCCL moves.
trait Element: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Default {
    const NCCL: sys::ncclDataType_t;
}

impl Element for f32 {
    const NCCL: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
}

impl Element for u64 {
    const NCCL: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint64;
}

/// A device stream for `ordinal`.
fn stream_on(ordinal: usize) -> Result<Arc<CudaStream>> {
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| unavailable(format!("CUDA device {ordinal}: {e:?}")))?;
    ctx.new_stream()
        .map_err(|e| unavailable(format!("a stream on CUDA device {ordinal}: {e:?}")))
}

impl NcclComm {
    /// The number of CUDA devices this process sees.
    ///
    /// Errors: [`Error::Unavailable`] without a CUDA driver or NCCL.
    pub fn device_count() -> Result<usize> {
        libraries_present()?;
        let n = CudaContext::device_count()
            .map_err(|e| unavailable(format!("cuDeviceGetCount: {e:?}")))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// One communicator per device of `ordinals` (rank i drives
    /// `ordinals[i]`), all in this process (`ncclCommInitAll`): move each to
    /// its own thread. Collectives fail with [`Error::Timeout`] after
    /// waiting `timeout` (1 ms ..= 7 days).
    ///
    /// Errors: [`Error::Config`] for an empty list or the timeout;
    /// [`Error::Unavailable`] without CUDA or NCCL, for a missing device, or
    /// when NCCL refuses the list (a device twice).
    pub fn for_devices(ordinals: &[usize], timeout: Duration) -> Result<Vec<NcclComm>> {
        validate_timeout(timeout)?;
        if ordinals.is_empty() || ordinals.len() > crate::MAX_RANKS {
            return Err(Error::config(
                "devices",
                ordinals.len(),
                format!("1 ..= {} device ordinals", crate::MAX_RANKS),
            ));
        }
        libraries_present()?;
        let streams = ordinals
            .iter()
            .map(|&o| stream_on(o))
            .collect::<Result<Vec<_>>>()?;
        let devs: Vec<c_int> = ordinals
            .iter()
            .map(|&o| c_int::try_from(o).unwrap_or(c_int::MAX))
            .collect();
        let mut comms: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); ordinals.len()];
        // SAFETY: `comms` has room for one handle per device of `devs`.
        unsafe {
            nccl::comm_init_all(
                comms.as_mut_ptr(),
                c_int::try_from(devs.len()).unwrap_or(c_int::MAX),
                devs.as_ptr(),
            )
        }
        .map_err(|e| unavailable(format!("ncclCommInitAll({ordinals:?}): {}", nccl_error(&e))))?;
        let world = ordinals.len();
        Ok(comms
            .into_iter()
            .zip(streams)
            .enumerate()
            .map(|(rank, (comm, stream))| NcclComm {
                comm: RawComm(comm),
                stream,
                rank,
                world,
                timeout,
                seq: Cell::new(0),
                broken: RefCell::new(None),
            })
            .collect())
    }

    /// This MPI rank's NCCL rank on device `device_ordinal`, in a group of
    /// all the MPI job's ranks (same rank numbers), with the MPI
    /// communicator's timeout. Rank 0 creates the NCCL id and broadcasts it
    /// over MPI. Every rank must call it.
    ///
    /// The ranks first agree (over MPI) that each could load CUDA and NCCL
    /// and open its device, so a local failure is an error on every rank
    /// rather than a hang in NCCL's initialization; that initialization
    /// itself is not bounded by the timeout.
    ///
    /// Errors: [`Error::Unavailable`] (on every rank) when some rank lacks
    /// CUDA, NCCL or its device, or NCCL's initialization fails; MPI's
    /// errors.
    #[cfg(feature = "mpi")]
    pub fn from_mpi(mpi: &crate::MpiComm, device_ordinal: usize) -> Result<NcclComm> {
        let (rank, world) = (mpi.rank(), mpi.world());
        let local = local_setup(rank, device_ordinal);
        let failed = agree_ok(mpi, local.is_ok())?;
        let (stream, mut id) = match local {
            Ok(l) if failed.is_empty() => l,
            Ok(_) => {
                return Err(unavailable(format!(
                    "ranks {failed:?} could not set up CUDA and NCCL"
                )))
            }
            Err(e) => return Err(e),
        };
        mpi.broadcast_bytes(&mut id, 0)?;
        let mut unique = sys::ncclUniqueId { internal: [0; 128] };
        for (c, &b) in unique.internal.iter_mut().zip(id.iter()) {
            *c = b as std::ffi::c_char;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let to_int = |x: usize| c_int::try_from(x).unwrap_or(c_int::MAX);
        // SAFETY: `comm` is a place for the new handle; the id came from
        // ncclGetUniqueId on rank 0.
        let init = unsafe { nccl::comm_init_rank(&mut comm, to_int(world), unique, to_int(rank)) };
        let failed = agree_ok(mpi, init.is_ok())?;
        match init {
            Ok(_) if failed.is_empty() => Ok(NcclComm {
                comm: RawComm(comm),
                stream,
                rank,
                world,
                timeout: mpi.timeout(),
                seq: Cell::new(0),
                broken: RefCell::new(None),
            }),
            Ok(_) => {
                // SAFETY: `comm` was initialized above and is not used again.
                let _ = unsafe { nccl::comm_abort(comm) };
                Err(unavailable(format!(
                    "ncclCommInitRank failed on ranks {failed:?}"
                )))
            }
            Err(e) => Err(unavailable(format!(
                "ncclCommInitRank (rank {rank} of {world}, device {device_ordinal}): {}",
                nccl_error(&e)
            ))),
        }
    }

    /// The timeout of every collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The CUDA device this rank drives.
    pub fn device_ordinal(&self) -> usize {
        self.stream.context().ordinal()
    }

    /// Whether an earlier failure broke the group.
    pub fn is_broken(&self) -> bool {
        self.broken.borrow().is_some()
    }

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

    /// Aborts the communicator (stopping its kernels), marks the group
    /// broken by `e` and returns `e`.
    fn break_with(&self, e: Error) -> Error {
        let mut broken = self.broken.borrow_mut();
        if broken.is_none() {
            // SAFETY: the communicator is live; after this it is only
            // dropped (Drop skips destroying a broken one).
            let _ = unsafe { nccl::comm_abort(self.comm.0) };
            *broken = Some(e.to_string());
        }
        e
    }

    fn failed(&self, call: Call, reason: String) -> Error {
        self.break_with(Error::Backend {
            backend: BACKEND,
            op: call.op,
            seq: call.seq,
            rank: self.rank,
            reason,
        })
    }

    /// Copies `host` to a new device buffer.
    fn to_device<T: Element>(&self, call: Call, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.zeros(call, 0);
        }
        self.stream
            .clone_htod(host)
            .map_err(|e| self.failed(call, format!("copy to device: {e:?}")))
    }

    /// A zeroed device buffer of `len` elements.
    fn zeros<T: Element>(&self, call: Call, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| self.failed(call, format!("device allocation: {e:?}")))
    }

    /// Copies a completed device buffer back.
    fn to_host<T: Element>(&self, call: Call, dev: &CudaSlice<T>, len: usize) -> Result<Vec<T>> {
        let mut host = self
            .stream
            .clone_dtoh(dev)
            .map_err(|e| self.failed(call, format!("copy to host: {e:?}")))?;
        host.truncate(len);
        Ok(host)
    }

    /// Runs `enqueue` (NCCL calls on the stream, given the communicator and
    /// stream) and polls until the stream has finished them. On a timeout
    /// or error the group is broken and the caller must leak the buffers
    /// (they are in an [`InFlight`]).
    fn run(
        &self,
        call: Call,
        what: &str,
        enqueue: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<(), nccl::NcclError>,
    ) -> Result<()> {
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        enqueue(self.comm.0, stream)
            .map_err(|e| self.failed(call, format!("{what}: {}", nccl_error(&e))))?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| self.failed(call, format!("cuEventRecord: {e:?}")))?;
        let backoff = Backoff::until(call.deadline);
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.failed(call, format!("{what}: {e:?}"))),
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator is live; `async_err` is a valid place.
            let rc = unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut async_err) };
            for r in [rc, async_err] {
                if let Err(e) = r.result() {
                    return Err(self.failed(call, format!("{what}: {}", nccl_error(&e))));
                }
            }
            if !backoff.wait() {
                let missing = (0..self.world).filter(|&q| q != self.rank).collect();
                return Err(self.break_with(Error::Timeout {
                    op: call.op,
                    seq: call.seq,
                    rank: self.rank,
                    timeout: self.timeout,
                    missing,
                }));
            }
        }
    }

    /// `ncclAllGather` of `local` (the same length on every rank, agreed).
    fn gather_equal<T: Element>(&self, call: Call, local: &[T]) -> Result<Vec<T>> {
        let total = local.len() * self.world;
        let mut bufs = InFlight::new((self.to_device(call, local)?, self.zeros::<T>(call, total)?));
        let (send, recv) = bufs.get_mut();
        let count = local.len();
        let (src, src_sync) = send.device_ptr(&self.stream);
        let (dst, dst_sync) = recv.device_ptr_mut(&self.stream);
        self.run(call, "ncclAllGather", |comm, stream| {
            // SAFETY: `src` holds `count` and `dst` `world * count` elements
            // of `T`, owned by `bufs` until the stream finished (or leaked).
            unsafe {
                nccl::all_gather(
                    src as *const c_void,
                    dst as *mut c_void,
                    count,
                    T::NCCL,
                    comm,
                    stream,
                )
            }
            .map(drop)
        })?;
        drop((src_sync, dst_sync));
        let (_, recv) = bufs.completed();
        self.to_host(call, &recv, total)
    }

    /// The header exchange and its verdict.
    fn agree(&self, call: Call, header: Header, counts: &[usize]) -> Result<()> {
        // Also with one rank: the single-device tests then run every NCCL
        // path.
        let headers = {
            let table = self.gather_equal(call, &header.encode())?;
            let mut headers = Vec::with_capacity(self.world);
            for (q, w) in table.chunks(HEADER_WORDS).enumerate() {
                match Header::decode(w) {
                    Some(h) if h.seq == call.seq => headers.push(h),
                    _ => {
                        return Err(self.failed(
                            call,
                            format!(
                                "rank {q} sent a header that is not collective #{}: {w:?}",
                                call.seq
                            ),
                        ))
                    }
                }
            }
            headers
        };
        match check::check(self.world, &headers) {
            Ok(()) => Ok(()),
            Err(Mismatch::Fail(e)) => Err(e),
            Err(Mismatch::Counts { op, rank }) => {
                // Both lists have `world` entries: all-gather everyone's
                // (padded to `world`) and report rank 0's and `rank`'s.
                let mine: Vec<u64> = (0..self.world)
                    .map(|i| counts.get(i).map_or(0, |&c| c as u64))
                    .collect();
                let all = self.gather_equal(call, &mine)?;
                let list = |q: usize| -> Vec<usize> {
                    all[q * self.world..(q + 1) * self.world]
                        .iter()
                        .map(|&c| usize::try_from(c).unwrap_or(usize::MAX))
                        .collect()
                };
                Err(check::counts_mismatch(op, rank, &list(0), &list(rank)))
            }
        }
    }
}

/// This rank's part of [`NcclComm::from_mpi`] before any NCCL call that
/// waits for peers: the device's stream and, on rank 0, a new NCCL id.
#[cfg(feature = "mpi")]
fn local_setup(rank: usize, device_ordinal: usize) -> Result<(Arc<CudaStream>, [u8; 128])> {
    libraries_present()?;
    let stream = stream_on(device_ordinal)?;
    let mut id = [0u8; 128];
    if rank == 0 {
        let unique = nccl::get_uniqueid()
            .map_err(|e| unavailable(format!("ncclGetUniqueId: {}", nccl_error(&e))))?;
        for (b, &c) in id.iter_mut().zip(unique.internal.iter()) {
            *b = c as u8;
        }
    }
    Ok((stream, id))
}

/// Over MPI: which ranks reported `ok == false` (every rank gets the same
/// list).
#[cfg(feature = "mpi")]
fn agree_ok(mpi: &crate::MpiComm, ok: bool) -> Result<Vec<usize>> {
    let flags = mpi.all_gather(&[if ok { 1.0 } else { 0.0 }], &vec![1; mpi.world()])?;
    Ok(flags
        .iter()
        .enumerate()
        .filter(|(_, &f)| f != 1.0)
        .map(|(q, _)| q)
        .collect())
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.broken.get_mut().is_some() {
            return; // aborted when it broke
        }
        // SAFETY: the communicator is live, no work of ours is pending on
        // it (every call waited for its stream), and it is not used again.
        let _ = unsafe { nccl::comm_destroy(self.comm.0) };
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let call = self.begin(Op::AllReduceSum)?;
        self.agree(call, Header::plain(call.op, call.seq, buf.len()), &[])?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        let mut bufs = InFlight::new(self.to_device(call, buf)?);
        let dev = bufs.get_mut();
        let (ptr, sync) = dev.device_ptr_mut(&self.stream);
        self.run(call, "ncclAllReduce", |comm, stream| {
            // SAFETY: in place on `n` f32s owned by `bufs` until the stream
            // finished (or leaked).
            unsafe {
                nccl::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    n,
                    f32::NCCL,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
            .map(drop)
        })?;
        drop(sync);
        let out = self.to_host(call, &bufs.completed(), n)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let call = self.begin(Op::ReduceScatterSum)?;
        let h = Header::with_counts(call.op, call.seq, input.len(), counts, self.rank);
        self.agree(call, h, counts)?;
        let world = self.world;
        // Pad every part to the widest, as NCCL needs equal parts.
        let m = counts.iter().copied().max().unwrap_or(0);
        if m == 0 {
            return Ok(Vec::new());
        }
        let mut padded = vec![0f32; m * world];
        for (q, (&c, &o)) in counts.iter().zip(&check::offsets(counts)).enumerate() {
            padded[q * m..q * m + c].copy_from_slice(&input[o..o + c]);
        }
        let mut bufs = InFlight::new((self.to_device(call, &padded)?, self.zeros::<f32>(call, m)?));
        let (send, recv) = bufs.get_mut();
        let (src, src_sync) = send.device_ptr(&self.stream);
        let (dst, dst_sync) = recv.device_ptr_mut(&self.stream);
        self.run(call, "ncclReduceScatter", |comm, stream| {
            // SAFETY: `src` holds `world * m`, `dst` `m` f32s, owned by
            // `bufs` until the stream finished (or leaked).
            unsafe {
                nccl::reduce_scatter(
                    src as *const c_void,
                    dst as *mut c_void,
                    m,
                    f32::NCCL,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
            .map(drop)
        })?;
        drop((src_sync, dst_sync));
        let (_, recv) = bufs.completed();
        self.to_host(call, &recv, counts[self.rank])
    }

    fn all_gather(&self, local: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let call = self.begin(Op::AllGather)?;
        let h = Header::with_counts(call.op, call.seq, local.len(), counts, self.rank);
        self.agree(call, h, counts)?;
        let m = counts.iter().copied().max().unwrap_or(0);
        if m == 0 {
            return Ok(Vec::new());
        }
        let mut mine = local.to_vec();
        mine.resize(m, 0.0);
        let all = self.gather_equal(call, &mine)?;
        Ok(counts
            .iter()
            .enumerate()
            .flat_map(|(q, &c)| all[q * m..q * m + c].iter().copied())
            .collect())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let call = self.begin(Op::Broadcast)?;
        self.agree(call, Header::broadcast(call.seq, buf.len(), root), &[])?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        let mut bufs = InFlight::new(self.to_device(call, buf)?);
        let dev = bufs.get_mut();
        let (ptr, sync) = dev.device_ptr_mut(&self.stream);
        let root = c_int::try_from(root).unwrap_or(c_int::MAX);
        self.run(call, "ncclBroadcast", |comm, stream| {
            // SAFETY: in place on `n` f32s owned by `bufs` until the stream
            // finished (or leaked).
            unsafe {
                nccl::broadcast(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    n,
                    f32::NCCL,
                    root,
                    comm,
                    stream,
                )
            }
            .map(drop)
        })?;
        drop(sync);
        let out = self.to_host(call, &bufs.completed(), n)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let call = self.begin(Op::Barrier)?;
        // The header all-gather completes only once every rank has joined.
        self.agree(call, Header::plain(call.op, call.seq, 0), &[])
    }

    fn gather_stats(&self, values: &[u64]) -> Result<Option<Vec<Vec<u64>>>> {
        let call = self.begin(Op::GatherStats)?;
        self.agree(call, Header::plain(call.op, call.seq, values.len()), &[])?;
        let world = self.world;
        let all = if values.is_empty() {
            values.repeat(world)
        } else {
            self.gather_equal(call, values)?
        };
        if self.rank != 0 {
            return Ok(None);
        }
        let m = values.len();
        Ok(Some(
            (0..world)
                .map(|q| all[q * m..(q + 1) * m].to_vec())
                .collect(),
        ))
    }
}
