//! [`Prefetcher`]: a background thread that keeps sampled batches ready in
//! a bounded channel, recycling batch memory; dropping the handle stops and
//! joins the thread.

use crate::batch::Batch;
use crate::buffer::Replay;
use crate::error::{Error, Result};
use crate::shared::SharedReplay;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    /// How often to re-check while waiting for data or stopping.
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
        let (free_tx, free_rx) = bounded::<Batch>(self.depth + 2);
        for _ in 0..self.depth + 2 {
            free_tx.send(shared.new_batch()).expect("channel has room");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let min_len = self.min_len.unwrap_or(self.batch_size).max(1);
        // The thread returns a batch to the pool itself when sampling fails.
        let free_back = free_tx.clone();
        let handle = std::thread::Builder::new()
            .name("gm-replay-prefetch".into())
            .spawn(move || {
                let mut rng = StdRng::seed_from_u64(self.seed);
                while !stop2.load(Ordering::Relaxed) {
                    let mut batch = match free_rx.recv_timeout(self.poll) {
                        Ok(b) => b,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return,
                    };
                    while shared.len() < min_len {
                        if stop2.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(self.poll);
                    }
                    let item = match shared.sample_into(&mut batch, self.batch_size, &mut rng) {
                        Ok(()) => Ok(batch),
                        Err(e) => {
                            let _ = free_back.try_send(batch);
                            Err(e)
                        }
                    };
                    if tx.send(item).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| {
                Error::Disconnected(format!("could not start the prefetch thread: {e}"))
            })?;
        Ok(Prefetcher {
            rx: Some(rx),
            free: Some(free_tx),
            stop,
            handle: Some(handle),
        })
    }
}

/// Handle to the prefetch thread. Dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Prefetcher {
    rx: Option<Receiver<Result<Batch>>>,
    free: Option<Sender<Batch>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// The next ready batch (blocks). The batch returns to the pool when the
    /// guard is dropped.
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
        self.stop.store(true, Ordering::Relaxed);
        // Closing the ready channel wakes a thread blocked in `send`; a thread
        // waiting for a free batch or for data sees `stop` within one poll.
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
