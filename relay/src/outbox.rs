//! What a connection has to write: control frames, and packets in one
//! queue per source served round-robin, all within a byte limit.
//!
//! A flooding source fills only its own queue: when the limit is reached, a
//! new packet evicts the oldest packet of the longest queue, or is dropped
//! if its own queue is the longest. So every source gets an equal share of
//! a slow destination, memory stays bounded, and a slow reader loses only
//! packets addressed to it. No I/O: the connection's writer takes batches.

use std::collections::{BTreeMap, VecDeque};

use meshd_proto::relay::{split_frame, ty, Frame, HEADER_LEN};
use meshd_proto::NodeKey;

/// Queue buffers of emptied sources kept for the next ones.
const SPARE_BUFFERS: usize = 8;

/// One source's frames, whole, oldest first from `start`.
#[derive(Debug, Default)]
struct Queue {
    buf: Vec<u8>,
    start: usize,
}

impl Queue {
    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Removes the oldest frame; returns its bytes.
    fn pop_into(&mut self, out: Option<&mut Vec<u8>>) -> Option<(u8, usize, usize)> {
        let (ty, body, _) = split_frame(&self.buf[self.start..])?;
        let (ty, len) = (ty, HEADER_LEN + body.len());
        let payload = payload_len(ty, body.len());
        if let Some(out) = out {
            out.extend_from_slice(&self.buf[self.start..self.start + len]);
        }
        self.start += len;
        Some((ty, len, payload))
    }
}

/// The datagram bytes of a packet frame, so counters count what users sent.
fn payload_len(frame_type: u8, body: usize) -> usize {
    match frame_type {
        ty::FORWARD_PACKET => body.saturating_sub(64),
        _ => body.saturating_sub(32),
    }
}

/// What [`Outbox::take`] moved into a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Taken {
    pub packets: u64,
    pub bytes: u64,
}

/// What became of a packet offered to [`Outbox::push_packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pushed {
    /// It was queued (else it was dropped: over the limit with its own
    /// source's queue the longest, or not a packet frame).
    pub queued: bool,
    /// Packets dropped for it: older ones evicted, and itself if not queued.
    pub dropped: u64,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    control: Vec<u8>,
    control_limit: usize,
    /// By key, so which of two equally long queues loses a packet does not
    /// depend on a hash seed.
    queues: BTreeMap<NodeKey, Queue>,
    /// Sources with queued packets, in the order they are served.
    turn: VecDeque<NodeKey>,
    queued: usize,
    limit: usize,
    spare: Vec<Vec<u8>>,
}

impl Outbox {
    pub(crate) fn new(limit: usize, control_limit: usize) -> Self {
        Outbox {
            control: Vec::new(),
            control_limit,
            queues: BTreeMap::new(),
            turn: VecDeque::new(),
            queued: 0,
            limit,
            spare: Vec::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.control.is_empty() && self.queued == 0
    }

    /// Packet bytes queued (whole frames).
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Queues a packet frame from `source`, evicting older packets of a
    /// longer queue if need be.
    pub(crate) fn push_packet(&mut self, source: NodeKey, frame: &Frame<'_>) -> Pushed {
        let refused = |evicted: u64| Pushed {
            queued: false,
            dropped: evicted + 1,
        };
        let size = match frame {
            Frame::SendPacket { datagram, .. } | Frame::RecvPacket { datagram, .. } => {
                HEADER_LEN + 32 + datagram.len()
            }
            Frame::ForwardPacket { datagram, .. } => HEADER_LEN + 64 + datagram.len(),
            _ => return refused(0),
        };
        if size > self.limit {
            return refused(0);
        }
        let mut evicted = 0;
        while self.queued + size > self.limit {
            let own = self.queues.get(&source).map_or(0, Queue::len);
            let longest = self
                .queues
                .iter()
                .max_by_key(|(_, q)| q.len())
                .map(|(k, q)| (*k, q.len()));
            match longest {
                Some((k, len)) if k != source && len > own + size => {
                    self.evict(k);
                    evicted += 1;
                }
                _ => return refused(evicted),
            }
        }
        let spare = &mut self.spare;
        let queue = self.queues.entry(source).or_insert_with(|| Queue {
            buf: spare.pop().unwrap_or_default(),
            start: 0,
        });
        if queue.start > 0 && queue.start >= queue.buf.len() / 2 {
            queue.buf.drain(..queue.start);
            queue.start = 0;
        }
        let was_empty = queue.len() == 0;
        if frame.encode(&mut queue.buf).is_err() {
            // Only a datagram over the protocol's limit fails to encode, and
            // `size > limit` refused those already; an empty new queue is
            // harmless (taking it retires it).
            return refused(evicted);
        }
        if was_empty {
            self.turn.push_back(source);
        }
        self.queued += size;
        Pushed {
            queued: true,
            dropped: evicted,
        }
    }

    /// Drops the oldest packet of `source`'s queue.
    fn evict(&mut self, source: NodeKey) {
        if let Some(q) = self.queues.get_mut(&source) {
            if let Some((_, len, _)) = q.pop_into(None) {
                self.queued -= len;
            }
            if q.len() == 0 {
                self.retire(source);
            }
        }
    }

    /// Forgets an emptied queue, keeping its buffer for another source.
    fn retire(&mut self, source: NodeKey) {
        if let Some(mut q) = self.queues.remove(&source) {
            self.turn.retain(|k| *k != source);
            if self.spare.len() < SPARE_BUFFERS {
                q.buf.clear();
                self.spare.push(q.buf);
            }
        }
    }

    /// Queues a control frame (sent before any packet); `false` when the
    /// control queue is full.
    pub(crate) fn push_control(&mut self, frame: &Frame<'_>) -> bool {
        let start = self.control.len();
        if frame.encode(&mut self.control).is_err() {
            return false;
        }
        if self.control.len() > self.control_limit && start > 0 {
            self.control.truncate(start);
            return false;
        }
        true
    }

    /// Moves control frames, then packets one per source in turn, into
    /// `out` until it holds at least `max` bytes or nothing is left.
    pub(crate) fn take(&mut self, out: &mut Vec<u8>, max: usize) -> Taken {
        out.append(&mut self.control);
        let mut taken = Taken::default();
        while out.len() < max {
            let Some(source) = self.turn.pop_front() else {
                break;
            };
            let Some(q) = self.queues.get_mut(&source) else {
                continue;
            };
            if let Some((_, len, payload)) = q.pop_into(Some(out)) {
                self.queued -= len;
                taken.packets += 1;
                taken.bytes += payload as u64;
            }
            if q.len() == 0 {
                self.retire(source);
            } else {
                self.turn.push_back(source);
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(n: u8) -> NodeKey {
        NodeKey([n; 32])
    }

    fn packet(src: u8, data: &[u8]) -> Frame<'_> {
        Frame::RecvPacket {
            src: key(src),
            datagram: data,
        }
    }

    /// The sources of the packets in a batch, in order.
    fn sources(batch: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = batch;
        while let Some((_, body, tail)) = split_frame(rest) {
            out.push(body[0]);
            rest = tail;
        }
        out
    }

    #[test]
    fn sources_are_served_in_turn_and_control_goes_first() {
        let mut o = Outbox::new(1 << 20, 1024);
        for _ in 0..3 {
            assert!(o.push_packet(key(1), &packet(1, &[0; 100])).queued);
        }
        assert!(o.push_packet(key(2), &packet(2, &[0; 100])).queued);
        assert!(o.push_control(&Frame::Pong([9; 8])));
        let mut out = Vec::new();
        let taken = o.take(&mut out, usize::MAX);
        assert_eq!(out[0], ty::PONG);
        assert_eq!(sources(&out[11..]), [1, 2, 1, 1]);
        assert_eq!(
            taken,
            Taken {
                packets: 4,
                bytes: 400
            }
        );
        assert!(o.is_empty());
    }

    #[test]
    fn a_flood_evicts_its_own_packets_not_a_quiet_sources() {
        let frame = HEADER_LEN + 32 + 100;
        let mut o = Outbox::new(10 * frame, 1024);
        let (mut dropped, mut evicted) = (0, 0);
        assert!(o.push_packet(key(2), &packet(2, &[0; 100])).queued);
        for _ in 0..1000 {
            let p = o.push_packet(key(1), &packet(1, &[0; 100]));
            if p.queued {
                evicted += p.dropped;
            } else {
                dropped += p.dropped;
            }
            assert!(o.queued() <= 10 * frame);
        }
        // The quiet source still gets in, evicting the flood's oldest.
        assert_eq!(
            o.push_packet(key(2), &packet(2, &[0; 100])),
            Pushed {
                queued: true,
                dropped: 1
            }
        );
        assert_eq!((dropped, evicted), (991, 0));
        let mut out = Vec::new();
        o.take(&mut out, usize::MAX);
        let s = sources(&out);
        assert_eq!(s.iter().filter(|&&k| k == 2).count(), 2);
        assert_eq!(&s[..4], [2, 1, 2, 1]);
    }

    #[test]
    fn batches_stop_at_their_size_and_buffers_are_reused() {
        let mut o = Outbox::new(1 << 20, 1024);
        for i in 0..10u8 {
            assert!(o.push_packet(key(i), &packet(i, &[0; 1000])).queued);
        }
        let mut out = Vec::new();
        assert_eq!(o.take(&mut out, 2500).packets, 3);
        out.clear();
        assert_eq!(o.take(&mut out, usize::MAX).packets, 7);
        assert_eq!(o.spare.len(), SPARE_BUFFERS);
        assert!(o.is_empty());
    }

    #[test]
    fn the_control_queue_is_bounded_but_takes_one_frame_always() {
        let mut o = Outbox::new(1024, 10);
        assert!(o.push_control(&Frame::PeerPresent(key(1))));
        assert!(!o.push_control(&Frame::PeerPresent(key(2))));
        assert!(!o.push_packet(key(1), &Frame::ServerOk).queued);
    }

    proptest::proptest! {
        /// Whatever is pushed and taken, in any order: the packet bytes
        /// queued never exceed the limit and match what the queues hold, and
        /// every packet offered is in the end either taken or counted as
        /// dropped.
        #[test]
        fn the_limit_holds_and_no_packet_is_lost_uncounted(
            ops in proptest::collection::vec((0u8..4, 0usize..3000, 0usize..8000), 0..300),
        ) {
            let mut o = Outbox::new(16 << 10, 1024);
            let data = vec![0u8; 3000];
            let (mut offered, mut dropped, mut taken) = (0u64, 0u64, 0u64);
            let mut out = Vec::new();
            for (src, len, max) in ops {
                if max < 4000 {
                    offered += 1;
                    dropped += o.push_packet(key(src), &packet(src, &data[..len])).dropped;
                } else {
                    out.clear();
                    taken += o.take(&mut out, max - 4000).packets;
                }
                proptest::prop_assert!(o.queued() <= 16 << 10);
                proptest::prop_assert_eq!(o.queued(), o.queues.values().map(Queue::len).sum::<usize>());
                proptest::prop_assert_eq!(o.turn.len(), o.queues.len());
            }
            out.clear();
            taken += o.take(&mut out, usize::MAX).packets;
            proptest::prop_assert!(o.is_empty());
            proptest::prop_assert_eq!(taken + dropped, offered);
        }
    }
}
