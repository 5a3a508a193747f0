//! [`MonitorHandle`]: owns the sampler thread (and the Prometheus HTTP
//! thread); dropping it stops and joins both. [`Report`]: what
//! [`MonitorHandle::stop`] hands back.

use crate::error::{Error, Result};
use crate::monitor::{Monitor, MonitorStats};
use crate::prometheus::HttpServer;
use crate::sample::Sample;
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use std::net::SocketAddr;
use std::ops::Deref;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a stopped monitor leaves behind.
#[derive(Debug, Clone)]
pub struct Report {
    /// The history ring, oldest first.
    pub history: Vec<Sample>,
    /// The final counters, with the sampler thread's total CPU time.
    pub stats: MonitorStats,
}

/// A running monitor. Dereferences to [`Monitor`] (`sample_now`,
/// `register_gauge`, `history`, ...). Dropping it stops the sampler thread
/// at once (it waits on a channel, not a sleep: no need to wait out the
/// interval) and joins it, then stops and joins the HTTP thread.
#[derive(Debug)]
pub struct MonitorHandle {
    monitor: Monitor,
    /// Never sent on: dropping it wakes the thread.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<Option<Duration>>>,
    server: Option<HttpServer>,
}

impl MonitorHandle {
    pub(crate) fn start(monitor: Monitor, prometheus_port: Option<u16>) -> Result<Self> {
        // The server first: if the port cannot be bound, no thread runs.
        let server = prometheus_port
            .map(|p| HttpServer::start(p, monitor.metrics()))
            .transpose()?;
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let m = monitor.clone();
        let interval = monitor.config().interval;
        let thread = std::thread::Builder::new()
            .name("gm-monitor".into())
            .spawn(move || {
                let mut next = Instant::now();
                loop {
                    m.sample_now();
                    next += interval;
                    let now = Instant::now();
                    if next <= now {
                        // Fell behind (a slow callback, a suspended
                        // process): skip the missed ticks, do not burst.
                        next = now + interval;
                    }
                    match stop_rx.recv_deadline(next) {
                        Err(RecvTimeoutError::Timeout) => continue,
                        _ => break,
                    }
                }
                thread_cpu_time::<()>(None)
            })
            .map_err(|source| Error::Spawn {
                thread: "sampler",
                source,
            })?;
        Ok(Self {
            monitor,
            stop: Some(stop_tx),
            thread: Some(thread),
            server,
        })
    }

    /// The monitor.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// The address the Prometheus endpoint is bound to (`127.0.0.1:PORT`),
    /// if one was configured.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|s| s.addr())
    }

    /// CPU time (user + system) the sampler thread has used so far, from
    /// its POSIX thread CPU clock (nanosecond resolution). `None` once
    /// stopped, or where the platform has no such clock.
    pub fn sampler_cpu_time(&self) -> Option<Duration> {
        let t = self.thread.as_ref()?;
        thread_cpu_time(Some(t))
    }

    /// Counters so far, with the sampler thread's CPU time.
    pub fn stats(&self) -> MonitorStats {
        let mut s = self.monitor.stats();
        s.sampler_cpu_time = self.sampler_cpu_time();
        s
    }

    /// Stops and joins the threads; returns the history and final stats.
    pub fn stop(mut self) -> Report {
        let cpu = self.shutdown();
        let mut stats = self.monitor.stats();
        stats.sampler_cpu_time = cpu;
        Report {
            history: self.monitor.history(),
            stats,
        }
    }

    /// Idempotent: stops the sampler and the server; returns the sampler's
    /// CPU time.
    fn shutdown(&mut self) -> Option<Duration> {
        drop(self.stop.take());
        let cpu = match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                tracing::error!("the monitor's sampler thread panicked");
                None
            }),
            None => None,
        };
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
        cpu
    }
}

impl Deref for MonitorHandle {
    type Target = Monitor;
    fn deref(&self) -> &Monitor {
        &self.monitor
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// CPU time of `thread` (or of the calling thread for `None`).
#[cfg(unix)]
fn thread_cpu_time<T>(thread: Option<&JoinHandle<T>>) -> Option<Duration> {
    use std::os::unix::thread::JoinHandleExt;
    let clock = match thread {
        None => libc::CLOCK_THREAD_CPUTIME_ID,
        Some(t) => {
            let mut id: libc::clockid_t = 0;
            // SAFETY: the pthread_t comes from a JoinHandle that has not been
            // joined (we hold it by reference), so the thread's id is valid;
            // `id` is a valid out-pointer.
            let rc = unsafe { libc::pthread_getcpuclockid(t.as_pthread_t(), &mut id) };
            if rc != 0 {
                return None;
            }
            id
        }
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; an invalid clock id returns an
    // error, it is not undefined behaviour.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

#[cfg(not(unix))]
fn thread_cpu_time<T>(_thread: Option<&JoinHandle<T>>) -> Option<Duration> {
    None
}
