//! [`Prefetcher`]: a background thread that keeps sampled batches ready in
//! a bounded channel, recycling batch memory; dropping the handle stops and
//! joins the thread.

use crate::batch::Batch;
use crate::buffer::Replay;
use crate::error::{Error, Result};
use crate::shared::SharedReplay;
use crossbeam_channel::{bounded, select, Receiver, RecvTimeoutError, Select, Sender};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::ops::{Deref, DerefMut};
use std::thread::JoinHandle;
use std::time::Duration;

/// Builds a [`Prefetcher`].
#[derive(Debug, Clone)]
pub struct PrefetchBuilder {
    batch_size: usize,
    depth: usize,
    seed: u64,
    min_len: Option<usize>,
    poll: Duration,
}

impl PrefetchBuilder {
    /// Batches of `batch_size`; defaults: depth 4, seed 0, start when the
    /// buffer holds `batch_size` transitions, poll every 1 ms while waiting.
    pub fn new(batch_size: usize) -> Self {
        Self {
            batch_size,
            depth: 4,
            seed: 0,
            min_len: None,
            poll: Duration::from_millis(1),
        }
    }
    /// Batches kept ready (channel bound, at least 1).
    pub fn depth(mut self, depth: usize) -> Self {
        self.depth = depth.max(1);
        self
    }
    /// Seed of the sampling RNG (sampling is deterministic for a seed when
    /// the buffer does not change underneath).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Wait until the buffer holds this many transitions before sampling.
    pub fn min_len(mut self, n: usize) -> Self {
        self.min_len = Some(n);
        self
    }
    /// How often to re-check the buffer's length while waiting for data
    /// (stopping does not wait for it).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll = d;
        self
    }

    /// Starts the thread.
    pub fn spawn<B: Replay>(self, shared: SharedReplay<B>) -> Result<Prefetcher> {
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", 0, "at least 1"));
        }
        let (tx, rx) = bounded::<Result<Batch>>(self.depth);
        // The pool: `depth` batches in the channel, one with the consumer,
        // one being filled.
        let (free_tx, free_rx) = bounded::<Batch>(self.depth + 2);
        for _ in 0..self.depth + 2 {
            free_tx.send(shared.new_batch()).expect("channel has room");
        }
        // crossbeam allocates a channel's list of waiting receivers (and a
        // thread's wait context) the first time a receiver blocks. Register
        // and withdraw once now, while nothing can be ready, so that a
        // consumer's first blocking `next` allocates nothing.
        let mut warm = Select::new();
        warm.recv(&rx);
        if let Ok(op) = warm.try_select() {
            let _ = op.recv(&rx);
        }
        drop(warm);
        // Never sent on: dropping the sender wakes the thread at once,
        // whatever it is waiting for and however long the poll interval.
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let min_len = self.min_len.unwrap_or(self.batch_size).max(1);
        let (batch_size, poll) = (self.batch_size, self.poll);
        let mut rng = StdRng::seed_from_u64(self.seed);
        let handle = std::thread::Builder::new()
            .name("gm-replay-prefetch".into())
            .spawn(move || {
                // A batch kept across a wait or a failed sample.
                let mut spare: Option<Batch> = None;
                loop {
                    let mut batch = match spare.take() {
                        Some(b) => b,
                        None => select! {
                            recv(free_rx) -> b => match b {
                                Ok(b) => b,
                                Err(_) => return,
                            },
                            recv(stop_rx) -> _ => return,
                        },
                    };
                    // The length check and the sample under one read lock,
                    // so a concurrent `clear` cannot slip in between.
                    let sampled = {
                        let buf = shared.read();
                        if buf.len() < min_len {
                            Err(Error::Empty)
                        } else {
                            buf.sample_into(&mut batch, batch_size, &mut rng)
                        }
                    };
                    let item = match sampled {
                        Ok(()) => Ok(batch),
                        // Not enough data (yet, or again after a clear): wait.
                        Err(Error::Empty) => {
                            spare = Some(batch);
                            match stop_rx.recv_timeout(poll) {
                                Err(RecvTimeoutError::Timeout) => continue,
                                _ => return,
                            }
                        }
                        Err(e) => {
                            spare = Some(batch);
                            Err(e)
                        }
                    };
                    select! {
                        send(tx, item) -> r => if r.is_err() { return },
                        recv(stop_rx) -> _ => return,
                    }
                }
            })
            .map_err(|e| {
                Error::Disconnected(format!("could not start the prefetch thread: {e}"))
            })?;
        Ok(Prefetcher {
            rx: Some(rx),
            free: Some(free_tx),
            stop: Some(stop_tx),
            handle: Some(handle),
        })
    }
}

/// Handle to the prefetch thread. Dropping it stops and joins the thread.
///
/// The thread samples only while the buffer holds at least `min_len`
/// transitions and otherwise waits (also after a `clear`); any other
/// sampling error is handed to the consumer in place of a batch, and the
/// thread carries on.
#[derive(Debug)]
pub struct Prefetcher {
    rx: Option<Receiver<Result<Batch>>>,
    free: Option<Sender<Batch>>,
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// The next ready batch (blocks). The batch returns to the pool when the
    /// guard is dropped.
    ///
    /// Allocates nothing on the thread that spawned the prefetcher; on any
    /// other thread, crossbeam creates a small wait context (once per thread)
    /// the first time it blocks.
    pub fn next(&self) -> Result<PrefetchedBatch<'_>> {
        let rx = self.rx.as_ref().expect("present until drop");
        let b = rx
            .recv()
            .map_err(|_| Error::Disconnected("the prefetch thread has exited".into()))??;
        Ok(PrefetchedBatch {
            batch: Some(b),
            free: self.free.as_ref().expect("present until drop"),
        })
    }

    /// The next batch if one arrives within `timeout`.
    pub fn next_timeout(&self, timeout: Duration) -> Option<Result<PrefetchedBatch<'_>>> {
        let rx = self.rx.as_ref().expect("present until drop");
        match rx.recv_timeout(timeout) {
            Ok(Ok(b)) => Some(Ok(PrefetchedBatch {
                batch: Some(b),
                free: self.free.as_ref().expect("present"),
            })),
            Ok(Err(e)) => Some(Err(e)),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Err(Error::Disconnected(
                "the prefetch thread has exited".into(),
            ))),
        }
    }

    /// Batches ready now.
    pub fn ready(&self) -> usize {
        self.rx.as_ref().map_or(0, |r| r.len())
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Each of these wakes the thread wherever it waits: for a free batch,
        // for data, or to hand a batch over on a full channel.
        self.stop.take();
        self.rx.take();
        self.free.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A prefetched batch; derefs to [`Batch`] and goes back to the pool on drop.
#[derive(Debug)]
pub struct PrefetchedBatch<'a> {
    batch: Option<Batch>,
    free: &'a Sender<Batch>,
}

impl Deref for PrefetchedBatch<'_> {
    type Target = Batch;
    fn deref(&self) -> &Batch {
        self.batch.as_ref().expect("present until drop")
    }
}

impl DerefMut for PrefetchedBatch<'_> {
    fn deref_mut(&mut self) -> &mut Batch {
        self.batch.as_mut().expect("present until drop")
    }
}

impl Drop for PrefetchedBatch<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.batch.take() {
            let _ = self.free.try_send(b);
        }
    }
}
