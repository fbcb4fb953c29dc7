//! The choice of the home relay: the fastest reachable one, kept until
//! another is clearly faster, so a node does not move (and make every peer
//! re-learn where to reach it) on jitter.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::RelayId;

/// Latency samples kept per relay; the median of them is compared.
const SAMPLES: usize = 3;
/// Another relay must be faster by at least this much...
const MIN_GAIN: Duration = Duration::from_millis(10);
/// ...and take at most this share (in thirds) of the home's latency.
const MAX_THIRDS: u32 = 2;

#[derive(Debug, Default)]
pub(super) struct RelayChoice {
    latency: BTreeMap<RelayId, VecDeque<Duration>>,
    home: Option<RelayId>,
}

impl RelayChoice {
    pub(super) fn home(&self) -> Option<RelayId> {
        self.home
    }

    /// Records a measurement; returns the new home relay if it changed.
    pub(super) fn report(&mut self, relay: RelayId, latency: Option<Duration>) -> Option<RelayId> {
        match latency {
            Some(l) => {
                let s = self.latency.entry(relay).or_default();
                if s.len() == SAMPLES {
                    s.pop_front();
                }
                s.push_back(l);
            }
            // Unreachable: its old samples say nothing about it any more.
            None => {
                self.latency.remove(&relay);
            }
        }
        let (best, best_latency) = self
            .latency
            .iter()
            .filter_map(|(r, s)| Some((*r, median(s)?)))
            .min_by_key(|&(r, l)| (l, r))?;
        let better = match self
            .home
            .and_then(|h| self.latency.get(&h))
            .and_then(median)
        {
            None => true,
            Some(home) => {
                best_latency + MIN_GAIN <= home
                    && best_latency.saturating_mul(3) <= home.saturating_mul(MAX_THIRDS)
            }
        };
        if better && self.home != Some(best) {
            self.home = Some(best);
            return Some(best);
        }
        None
    }
}

fn median(samples: &VecDeque<Duration>) -> Option<Duration> {
    let mut v: Vec<Duration> = samples.iter().copied().collect();
    v.sort();
    v.get(v.len().saturating_sub(1) / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn the_fastest_relay_is_home_until_another_is_clearly_faster() {
        let mut c = RelayChoice::default();
        assert_eq!(c.report(RelayId(1), ms(50)), Some(RelayId(1)));
        assert_eq!(c.report(RelayId(2), ms(40)), None, "10 ms is not a third");
        assert_eq!(c.report(RelayId(2), ms(40)), None);
        assert_eq!(c.report(RelayId(3), ms(20)), Some(RelayId(3)));
        // One slow sample at home is outvoted by the median.
        assert_eq!(c.report(RelayId(3), ms(300)), None);
        assert_eq!(c.home(), Some(RelayId(3)));
        // Home unreachable: the best of the others at once.
        assert_eq!(c.report(RelayId(3), None), Some(RelayId(2)));
        assert_eq!(c.report(RelayId(2), None), Some(RelayId(1)));
        assert_eq!(c.report(RelayId(1), None), None);
        assert_eq!(c.home(), Some(RelayId(1)));
    }
}
