//! WAN emulation in userspace. This kernel has no `netem`, so packets crossing an impaired
//! uplink are queued to userspace with NFQUEUE (`iptables -j NFQUEUE` in the core namespace),
//! held for their delay here, and released with a verdict. Only metadata crosses to
//! userspace; GSO super-packets stay whole, which keeps the emulator far from being the
//! bottleneck.
//!
//! [`DelayLine`] is the whole decision (delay, jitter, loss, order) with time passed in;
//! [`Shaper`] is the thread that feeds it from the netlink socket.
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::nfqueue::{NfQueue, Queued, NF_ACCEPT, NF_DROP};
use crate::topology::Impairment;
use crate::LabError;

/// One direction of one uplink: packets leave in arrival order, each no earlier than its delay.
pub struct DelayLine<T> {
    base: Duration,
    spread: Duration,
    loss: f64,
    rng: SmallRng,
    last_release: Option<Instant>,
    queue: VecDeque<(Instant, T)>,
}

impl<T> DelayLine<T> {
    /// Half the configured round-trip latency delays this direction (see [`Impairment`]).
    pub fn new(imp: &Impairment, seed: u64) -> Self {
        DelayLine {
            base: Duration::from_micros(u64::from(imp.latency_ms) * 500),
            spread: Duration::from_micros(u64::from(imp.jitter_ms) * 500),
            loss: imp.loss_pct / 100.0,
            rng: SmallRng::seed_from_u64(seed),
            last_release: None,
            queue: VecDeque::new(),
        }
    }

    /// Takes a packet that arrived at `now`. Returns it straight back if it is lost.
    pub fn handle_packet(&mut self, pkt: T, now: Instant) -> Option<T> {
        if self.loss > 0.0 && self.rng.random_bool(self.loss.min(1.0)) {
            return Some(pkt);
        }
        let delay = if self.spread.is_zero() {
            self.base
        } else {
            // Uniform over base ± spread/2 (spread/2 ≤ base since jitter ≤ latency).
            let low = self.base.saturating_sub(self.spread / 2);
            low + self.spread.mul_f64(self.rng.random::<f64>())
        };
        // Never before a packet that arrived earlier: a real link does not reorder.
        let release = self
            .last_release
            .map_or(now + delay, |last| (now + delay).max(last));
        self.last_release = Some(release);
        self.queue.push_back((release, pkt));
        None
    }

    /// The next packet due at `now`, if any.
    pub fn poll_release(&mut self, now: Instant) -> Option<T> {
        match self.queue.front() {
            Some((at, _)) if *at <= now => self.queue.pop_front().map(|(_, p)| p),
            _ => None,
        }
    }

    /// When the next packet falls due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _)| *at)
    }
}

/// Longest the thread sleeps before looking at its stop flag.
const IDLE_WAKE: Duration = Duration::from_millis(50);
/// Packets one queue may hold; at 500 Mbit/s and 100 ms one way, TCP keeps a few thousand
/// GSO packets in flight.
const QUEUE_LEN: u32 = 16384;

/// The emulator thread of one lab, running in the lab's core namespace.
pub struct Shaper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Shaper {
    /// Enters `ns`, binds one NFQUEUE per (queue number, impairment) and returns once every
    /// queue is bound, so rules that target them can be installed without losing packets.
    pub fn start(ns: &str, lines: Vec<(u16, Impairment)>) -> Result<Shaper, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns_owned = ns.to_owned();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("shaper-{ns}"))
            .spawn(move || {
                let setup = || -> Result<NfQueue, LabError> {
                    crate::sys::enter_netns(&ns_owned)?;
                    // Wake on time: the default 50 µs slack on every timed wait adds up to a
                    // visible bias on a 1 ms link.
                    let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
                    let mut q =
                        NfQueue::open().map_err(|e| shaper_err("opening the NFQUEUE socket", e))?;
                    for (num, _) in &lines {
                        q.bind(*num, QUEUE_LEN)
                            .map_err(|e| shaper_err(&format!("binding queue {num}"), e))?;
                    }
                    Ok(q)
                };
                match setup() {
                    Ok(q) => {
                        let _ = ready_tx.send(Ok(()));
                        run(q, lines, &stop2);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|source| LabError::Io {
                what: "starting the shaper thread".into(),
                source,
            })?;
        let shaper = Shaper {
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(shaper),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LabError::Shaper(
                "the shaper thread ended during setup".into(),
            )),
        }
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn shaper_err(what: &str, e: std::io::Error) -> LabError {
    LabError::Shaper(format!(
        "{what}: {e} (is the nfnetlink_queue kernel module available?)"
    ))
}

fn run(mut q: NfQueue, lines: Vec<(u16, Impairment)>, stop: &AtomicBool) {
    let mut delay: BTreeMap<u16, DelayLine<u32>> = lines
        .iter()
        .map(|(num, imp)| {
            (
                *num,
                DelayLine::new(imp, u64::from(*num) ^ 0x6e65_746c_6162),
            )
        })
        .collect();
    let mut arrived = Vec::with_capacity(1024);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let next = delay.values().filter_map(DelayLine::poll_timeout).min();
        let wait = next.map_or(IDLE_WAKE, |at| {
            at.saturating_duration_since(now).min(IDLE_WAKE)
        });
        if !wait.is_zero() {
            let timeout = rustix::event::Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            let mut fds = [rustix::event::PollFd::new(&q, rustix::event::PollFlags::IN)];
            if let Err(e) = rustix::event::poll(&mut fds, Some(&timeout)) {
                if e != rustix::io::Errno::INTR {
                    tracing::error!(error = %e, "shaper poll failed; impaired links stop");
                    return;
                }
            }
        }
        arrived.clear();
        if let Err(e) = q.recv(&mut arrived) {
            tracing::warn!(error = %e, "shaper receive failed");
        }
        let now = Instant::now();
        for p in &arrived {
            let lost = match delay.get_mut(&p.queue) {
                Some(line) => line.handle_packet(p.id, now).is_some(),
                None => true,
            };
            if lost {
                verdict(&mut q, *p, NF_DROP, false);
            }
        }
        for (num, line) in delay.iter_mut() {
            // Every packet still queued in the kernel for this queue with a lower id was either
            // dropped above or is released now (the line is FIFO), so one batch verdict for
            // the newest due id releases exactly the due packets.
            let mut newest = None;
            while let Some(id) = line.poll_release(now) {
                newest = Some(id);
            }
            if let Some(id) = newest {
                verdict(&mut q, Queued { queue: *num, id }, NF_ACCEPT, true);
            }
        }
    }
}

fn verdict(q: &mut NfQueue, p: Queued, v: u32, batch: bool) {
    let r = if batch {
        q.verdict_batch(p, v)
    } else {
        q.verdict(p, v)
    };
    if let Err(e) = r {
        tracing::warn!(queue = p.queue, id = p.id, error = %e, "shaper verdict failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp(latency_ms: u32, jitter_ms: u32, loss_pct: f64) -> Impairment {
        Impairment {
            latency_ms,
            jitter_ms,
            loss_pct,
        }
    }

    /// Feeds packets at the given offsets (ms) and returns when each left (ms), or None if lost.
    fn drive(line: &mut DelayLine<usize>, arrivals_ms: &[u64]) -> Vec<Option<f64>> {
        let t0 = Instant::now();
        let mut out = vec![None; arrivals_ms.len()];
        for (i, a) in arrivals_ms.iter().enumerate() {
            assert!(
                line.handle_packet(i, t0 + Duration::from_millis(*a))
                    .is_none()
                    || line.loss > 0.0
            );
        }
        while let Some(at) = line.poll_timeout() {
            while let Some(i) = line.poll_release(at) {
                out[i] = Some((at - t0).as_secs_f64() * 1e3);
            }
        }
        out
    }

    #[test]
    fn delays_each_direction_by_half_the_latency() {
        let mut line = DelayLine::new(&imp(20, 0, 0.0), 1);
        let out = drive(&mut line, &[0, 1, 5]);
        assert_eq!(out, vec![Some(10.0), Some(11.0), Some(15.0)]);
    }

    #[test]
    fn nothing_leaves_early_and_nothing_waits_after_its_time() {
        let mut line = DelayLine::new(&imp(30, 0, 0.0), 1);
        let t0 = Instant::now();
        line.handle_packet(0, t0);
        assert_eq!(line.poll_release(t0 + Duration::from_micros(14_999)), None);
        assert_eq!(line.poll_timeout(), Some(t0 + Duration::from_millis(15)));
        assert_eq!(line.poll_release(t0 + Duration::from_millis(15)), Some(0));
        assert_eq!(line.poll_timeout(), None);
    }

    #[test]
    fn jitter_stays_in_range_and_never_reorders() {
        let mut line = DelayLine::new(&imp(40, 10, 0.0), 7);
        let arrivals: Vec<u64> = (0..2000).map(|i| i / 4).collect();
        let out = drive(&mut line, &arrivals);
        let mut last = 0.0;
        let mut saw_spread = false;
        for (a, d) in arrivals.iter().zip(&out) {
            let d = d.unwrap();
            assert!(d >= last, "reordered");
            last = d;
            let delay = d - *a as f64;
            // 20 ms ± 2.5 ms, or later only because an earlier packet held it back.
            assert!(delay >= 17.5 - 1e-9, "delay {delay}");
            if (delay - 20.0).abs() > 1.0 {
                saw_spread = true;
            }
        }
        assert!(saw_spread, "jitter had no effect");
    }

    #[test]
    fn loss_matches_the_configured_rate() {
        let mut line = DelayLine::new(&imp(0, 0, 10.0), 3);
        let t0 = Instant::now();
        let lost = (0..20_000)
            .filter(|i| line.handle_packet(*i, t0).is_some())
            .count();
        let pct = lost as f64 / 200.0;
        assert!((9.0..11.0).contains(&pct), "lost {pct}%");
        let mut none = DelayLine::new(&imp(5, 0, 0.0), 3);
        assert!((0..1000).all(|i| none.handle_packet(i, t0).is_none()));
    }
}
