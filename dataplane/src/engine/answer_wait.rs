//! When the engine has just sent a lone packet from the TUN (a ping, a request,
//! a TCP segment after a pause), the answer is often back within tens of
//! microseconds — from a peer in the same data centre or on the same machine.
//! Going to sleep in `epoll_wait` then costs a wake-up of the engine thread,
//! which on a virtual machine can be a halted vCPU to wake: about 100 µs per
//! round trip on the 2-vCPU lab host (docs/benchmarks.md, "Added RTT, A/B").
//! So after such a send the engine can poll without sleeping for up to a window
//! (`--answer-poll`, e.g. 150 µs; off by default, since it costs CPU that
//! only sparse request/response traffic gets back). After [`MISSES`] windows in a row without an answer, polling
//! backs off exponentially, so traffic that is not answered quickly (one-way
//! streams, distant peers) soon costs at most one window every [`MAX_SKIP`]
//! lone packets; one answer within a window ends the back-off. (Backing off
//! after each miss would lose most of the gain: on a busy host a fair share of
//! quick answers still take longer than the window.)
//!
//! Only the decisions live here; the engine does the polling.

use std::time::{Duration, Instant};

/// Windows in a row without an answer before polling backs off.
pub const MISSES: u32 = 4;
/// The most lone packets sent without polling after windows that saw no answer.
pub const MAX_SKIP: u32 = 64;

#[derive(Debug)]
pub struct AnswerWait {
    /// How long a window lasts; zero: never poll.
    window: Duration,
    /// Poll until then, if set.
    due: Option<Instant>,
    /// Something arrived since the packet was sent.
    seen: bool,
    /// Lone packets still to send without polling.
    skip: u32,
    /// Windows in a row that saw no answer.
    misses: u32,
}

impl AnswerWait {
    pub fn new(window: Duration) -> Self {
        AnswerWait {
            window,
            due: None,
            seen: false,
            skip: 0,
            misses: 0,
        }
    }

    /// A lone packet from the TUN was just sent at `now`.
    pub fn sent(&mut self, now: Instant) {
        if self.window.is_zero() {
            return;
        }
        if self.skip > 0 {
            self.skip -= 1;
        } else {
            self.due = Some(now + self.window);
            self.seen = false;
        }
    }

    /// The deadline to poll until before sleeping, if a window is open and
    /// nothing is `ready`. With something ready the window stays open: the
    /// engine then also polls through what is left of it after handling an
    /// early answer, which keeps the vCPU awake while the answer is delivered
    /// (on the lab host most of the gain: without it 0.04 of 0.135 ms).
    pub fn deadline(&mut self, ready: bool) -> Option<Instant> {
        if ready && self.due.is_some() {
            self.seen = true;
            return None;
        }
        self.due
    }

    /// The window polled for until now closed: `answered` if something
    /// arrived before its deadline.
    pub fn ended(&mut self, answered: bool) {
        self.due = None;
        if answered || self.seen {
            self.misses = 0;
        } else {
            self.misses = self.misses.saturating_add(1);
            if let Some(over) = self.misses.checked_sub(MISSES) {
                self.skip = 1u32.checked_shl(over).unwrap_or(MAX_SKIP).min(MAX_SKIP);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// A window that covers a quick answer on the lab host.
    const WINDOW: Duration = Duration::from_micros(150);
    use super::*;

    /// Sends one lone packet and ends its window (if one opened) as `answered`;
    /// returns whether a window opened.
    fn round(w: &mut AnswerWait, now: Instant, answered: bool) -> bool {
        w.sent(now);
        match w.deadline(false) {
            Some(deadline) => {
                assert_eq!(deadline, now + WINDOW);
                w.ended(answered);
                true
            }
            None => false,
        }
    }

    #[test]
    fn a_zero_window_never_polls() {
        let mut w = AnswerWait::new(Duration::ZERO);
        let now = Instant::now();
        w.sent(now);
        assert_eq!(w.deadline(false), None);
        assert_eq!(w.deadline(true), None);
    }

    #[test]
    fn answered_packets_are_polled_for_every_time() {
        let mut w = AnswerWait::new(WINDOW);
        let now = Instant::now();
        assert!((0..100).all(|_| round(&mut w, now, true)));
    }

    #[test]
    fn a_window_is_polled_for_once_and_stays_open_while_work_is_ready() {
        let mut w = AnswerWait::new(WINDOW);
        let now = Instant::now();
        assert_eq!(w.deadline(false), None);
        w.sent(now);
        assert_eq!(w.deadline(true), None);
        assert_eq!(w.deadline(false), Some(now + WINDOW));
        w.ended(false);
        assert_eq!(w.deadline(false), None);
    }

    #[test]
    fn an_answer_before_the_poll_is_no_miss() {
        let mut w = AnswerWait::new(WINDOW);
        let now = Instant::now();
        for _ in 0..100 {
            w.sent(now);
            // The answer is ready at the first look; the rest of the window
            // then passes without anything more.
            assert_eq!(w.deadline(true), None);
            assert_eq!(w.deadline(false), Some(now + WINDOW));
            w.ended(false);
        }
        assert_eq!(w.misses, 0);
    }

    #[test]
    fn unanswered_packets_back_off_exponentially_up_to_the_cap() {
        let mut w = AnswerWait::new(WINDOW);
        let now = Instant::now();
        // Which of the lone packets open a window when none is answered.
        let opened: Vec<usize> = (0..400).filter(|_| round(&mut w, now, false)).collect();
        let gaps: Vec<usize> = opened.windows(2).map(|p| p[1] - p[0] - 1).collect();
        assert_eq!(&gaps[..11], &[0, 0, 0, 1, 2, 4, 8, 16, 32, 64, 64]);
        assert!(gaps.iter().all(|&g| g <= MAX_SKIP as usize));
    }

    #[test]
    fn a_few_misses_among_answers_do_not_back_off() {
        let mut w = AnswerWait::new(WINDOW);
        let now = Instant::now();
        for _ in 0..50 {
            for _ in 0..MISSES - 1 {
                assert!(round(&mut w, now, false));
            }
            assert!(round(&mut w, now, true));
        }
    }

    #[test]
    fn one_answer_ends_the_back_off() {
        let mut w = AnswerWait::new(WINDOW);
        let now = Instant::now();
        for _ in 0..200 {
            round(&mut w, now, false);
        }
        // Send until a window opens, answer it: from then on every packet polls.
        while !round(&mut w, now, true) {}
        assert!((0..10).all(|_| round(&mut w, now, true)));
    }
}
