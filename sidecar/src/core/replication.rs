//! Replication streams. Every member keeps, for each peer, a numbered log of
//! the deltas it owes that peer (`OutLog`), and the position it has reached
//! in the peer's stream to it (`InStream`). Deltas stay in the log until the
//! peer acknowledges them, so a broken connection loses nothing the log holds;
//! the receiver drops duplicates and reports gaps, which anti-entropy repairs.

use super::writes::Wait;
use super::{Core, Output};
use crate::core::message::PeerMsg;
use crate::core::store::Delta;
use std::collections::VecDeque;
use std::sync::Arc;
use tracing::{debug, warn};

/// How long deltas to a peer whose writer is full are held back.
const WRITER_FULL_PAUSE_MS: u64 = 100;
/// Outstanding deltas with no acknowledgement for this long are resent.
pub(super) const RESEND_AFTER_MS: u64 = 1_000;

/// What this member owes one peer.
#[derive(Debug, Default)]
pub(super) struct OutLog {
    /// Random per log: a receiver that still counts an older stream of ours
    /// starts this one afresh instead of taking its deltas for duplicates.
    pub(super) epoch: u64,
    next_seq: u64,
    pub(super) acked: u64,
    sent_upto: u64,
    /// `(seq, delta, size, joined)`: `joined` means the next delta belongs to
    /// the same atomic group (a Redis MULTI/EXEC), and no batch ends here.
    unacked: VecDeque<(u64, Arc<Delta>, usize, bool)>,
    pub(super) bytes: usize,
    /// When `acked` last moved (or a resend was last tried).
    progress_ms: u64,
}

impl OutLog {
    pub(super) fn fresh() -> Self {
        let mut b = [0u8; 8];
        crate::core::identity::fill_random(&mut b);
        Self::with_epoch(u64::from_le_bytes(b))
    }

    fn with_epoch(epoch: u64) -> Self {
        OutLog {
            epoch,
            next_seq: 1,
            ..Default::default()
        }
    }

    /// Forgets every delta; numbering goes on, so the receiver sees the gap
    /// and repairs by anti-entropy.
    pub(super) fn clear(&mut self) {
        self.unacked.clear();
        self.bytes = 0;
        self.acked = self.next_seq - 1;
        self.sent_upto = self.acked;
    }

    /// Appends a delta; returns its sequence number. `joined`: the next delta
    /// pushed belongs to the same atomic group (see `close_group`).
    pub(super) fn push(&mut self, d: Arc<Delta>, size: usize, now_ms: u64, joined: bool) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.unacked.is_empty() {
            self.progress_ms = now_ms;
        }
        self.unacked.push_back((seq, d, size, joined));
        self.bytes += size;
        seq
    }

    /// The atomic group pushed last is complete: a batch may end after it.
    pub(super) fn close_group(&mut self) {
        if let Some(last) = self.unacked.back_mut() {
            last.3 = false;
        }
    }

    /// The peer applied everything of stream `epoch` up to `upto`. An
    /// acknowledgement of another stream, or of what was never sent, is ignored.
    pub(super) fn ack(&mut self, epoch: u64, upto: u64, now_ms: u64) -> bool {
        if epoch != self.epoch || upto <= self.acked || upto >= self.next_seq {
            return false;
        }
        self.acked = upto;
        self.progress_ms = now_ms;
        while self.unacked.front().is_some_and(|(s, ..)| *s <= upto) {
            if let Some((_, _, sz, _)) = self.unacked.pop_front() {
                self.bytes -= sz;
            }
        }
        self.sent_upto = self.sent_upto.max(upto);
        true
    }

    /// What was not handed out yet, as `(first_seq, deltas)` batches of about
    /// `max` bytes; it counts as handed out afterwards. A batch never ends
    /// inside an atomic group (the receiver applies a batch in one go, so no
    /// member shows half a transaction), unless the group outgrows half as
    /// much again as `max`: the frame limit comes first.
    pub(super) fn take_batches(&mut self, max: usize) -> Vec<(u64, Vec<Arc<Delta>>)> {
        let hard = max.saturating_add(max / 2);
        let mut out = Vec::new();
        let mut batch = Vec::new();
        let mut first = 0;
        let mut bytes = 0;
        // The log is contiguous by sequence number: start right after what was
        // already handed out instead of scanning from the front.
        let skip = match self.unacked.front() {
            Some((front, ..)) => (self.sent_upto + 1).saturating_sub(*front) as usize,
            None => 0,
        };
        for (seq, d, sz, joined) in self.unacked.range(skip.min(self.unacked.len())..) {
            if batch.is_empty() {
                first = *seq;
            }
            batch.push(d.clone());
            bytes += sz;
            if (bytes >= max && !joined) || bytes >= hard {
                out.push((first, std::mem::take(&mut batch)));
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            out.push((first, batch));
        }
        self.sent_upto = self.next_seq - 1;
        out
    }

    /// Everything not acknowledged goes out again (the receiver drops duplicates).
    pub(super) fn rewind(&mut self) {
        self.sent_upto = self.acked;
    }

    /// Rewinds when deltas are outstanding and nothing was acknowledged for
    /// `RESEND_AFTER_MS`. Returns whether it did.
    pub(super) fn resend_if_stalled(&mut self, now_ms: u64) -> bool {
        if self.unacked.is_empty() || now_ms.saturating_sub(self.progress_ms) < RESEND_AFTER_MS {
            return false;
        }
        self.rewind();
        self.progress_ms = now_ms;
        true
    }

    pub(super) fn len(&self) -> usize {
        self.unacked.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }
}

/// How far this member got in one peer's stream to it.
#[derive(Debug, Default)]
pub(super) struct InStream {
    epoch: u64,
    seq: u64,
    ack_due: bool,
}

/// What to do with a batch of deltas from a peer's stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Accept {
    /// Nothing new (duplicates, or an empty batch); an ack is due anyway.
    Nothing,
    /// Apply the batch from index `skip`; `gap` is the sequence number that
    /// was expected when deltas are missing before this batch.
    Apply { skip: usize, gap: Option<u64> },
}

impl InStream {
    pub(super) fn accept(&mut self, epoch: u64, first_seq: u64, n: usize) -> Accept {
        if epoch != self.epoch {
            // A new stream from this peer (it forgot us and met us again, or
            // restarted): count from its start, not from the old stream's end.
            self.epoch = epoch;
            self.seq = 0;
        }
        let Some(last) = first_seq
            .checked_add(n as u64)
            .and_then(|e| e.checked_sub(1))
        else {
            return Accept::Nothing;
        };
        self.ack_due = true;
        if n == 0 || last <= self.seq {
            return Accept::Nothing;
        }
        let gap = (first_seq > self.seq + 1).then_some(self.seq + 1);
        let skip = (self.seq + 1).saturating_sub(first_seq) as usize;
        self.seq = last;
        Accept::Apply { skip, gap }
    }

    /// The peer restarted: its next stream starts from nothing.
    pub(super) fn reset(&mut self) {
        self.seq = 0;
    }

    /// After a reconnect: acknowledge again what we have, if anything.
    pub(super) fn reconnected(&mut self) {
        self.ack_due = self.seq > 0;
    }

    /// The acknowledgement owed, once.
    pub(super) fn take_ack(&mut self) -> Option<PeerMsg> {
        if !std::mem::take(&mut self.ack_due) {
            return None;
        }
        Some(PeerMsg::Ack {
            epoch: self.epoch,
            upto: self.seq,
        })
    }
}

impl Core {
    /// Hands out everything queued since the last call; deltas and acks are
    /// batched per peer here.
    pub fn drain(&mut self, now_ms: u64) -> Vec<Output> {
        let max = self.cfg.max_frame_bytes / 2;
        for (name, p) in self.peers.iter_mut() {
            if !p.connected {
                continue;
            }
            if p.gen.is_some() && now_ms >= p.hold_until_ms {
                for (first_seq, deltas) in p.out.take_batches(max) {
                    self.stats.deltas_sent += deltas.len() as u64;
                    let msg = PeerMsg::Deltas {
                        epoch: p.out.epoch,
                        first_seq,
                        deltas,
                    };
                    self.outbox.push(Output::Send {
                        to: name.clone(),
                        msg,
                    });
                }
            }
            // Acks wait for our connection to the peer to exist.
            if let Some(msg) = p.inbound.take_ack() {
                self.outbox.push(Output::Send {
                    to: name.clone(),
                    msg,
                });
            }
        }
        std::mem::take(&mut self.outbox)
    }

    pub(super) fn on_deltas(
        &mut self,
        name: &str,
        epoch: u64,
        first_seq: u64,
        deltas: Vec<Arc<Delta>>,
        now_ms: u64,
    ) {
        let Some(p) = self.peers.get_mut(name) else {
            return;
        };
        let Accept::Apply { skip, gap } = p.inbound.accept(epoch, first_seq, deltas.len()) else {
            return;
        };
        if let Some(expected) = gap {
            self.stats.seq_gaps += 1;
            debug!(peer = %name, expected, got = first_seq, "gap in delta stream; scheduling anti-entropy");
            self.ae_wanted.insert(name.to_owned());
        }
        let skewed = self.clock_skew().is_some();
        for d in deltas.into_iter().skip(skip) {
            // Refused deltas still count as received: the stream moves on, and
            // the peer, whose clock is wrong, is not ready and takes no writes.
            if !self.accept_remote(name, d.hlc, skewed, now_ms) {
                continue;
            }
            if let Err(e) = self.store.check_remote_delta(&d) {
                self.refuse_over_limits(name, &e);
                continue;
            }
            self.store.apply(&d, now_ms);
            self.note_change(&d, false);
            self.stats.deltas_applied += 1;
        }
    }

    pub(super) fn on_ack(&mut self, name: &str, epoch: u64, upto: u64, now_ms: u64) {
        if let Some(p) = self.peers.get_mut(name) {
            p.out.ack(epoch, upto, now_ms);
        }
        self.check_pending(now_ms);
    }

    /// Queues a delta for every live member; returns what a sync write waits for.
    pub(super) fn replicate(&mut self, d: Delta, now_ms: u64) -> Vec<Wait> {
        let size = d.size_hint();
        // One copy, shared by every peer's log and message.
        let d = Arc::new(d);
        let mut waits = Vec::new();
        let hard_cap = self.cfg.max_queue_bytes.saturating_mul(2);
        let holders: Option<Vec<&str>> = self
            .backup
            .as_ref()
            .map(|b| crate::core::placement::holders(&b.view, &d.id, b.copies));
        for (name, p) in self.peers.iter_mut() {
            if !self.detector.state(name).is_some_and(|s| s.is_live()) {
                continue;
            }
            if holders
                .as_ref()
                .is_some_and(|h| !h.contains(&name.as_str()))
            {
                continue;
            }
            if p.out.bytes + size > hard_cap {
                // Far past the bound: stop buffering for this member and let
                // anti-entropy repair it once it keeps up again.
                warn!(peer = %name, bytes = p.out.bytes, "replication queue overflow; dropping backlog, anti-entropy will repair");
                self.stats.queue_overflows += 1;
                p.out.clear();
                self.ae_wanted.insert(name.clone());
            }
            let seq = p.out.push(d.clone(), size, now_ms, self.group_open);
            waits.push(Wait {
                peer: name.clone(),
                gen: p.gen,
                seq,
            });
        }
        waits
    }

    /// Writes from now until `end_group` form one atomic group: each peer
    /// gets them in one message and applies them in one go.
    pub fn begin_group(&mut self) {
        self.group_open = true;
    }

    pub fn end_group(&mut self) {
        self.group_open = false;
        for p in self.peers.values_mut() {
            p.out.close_group();
        }
    }

    /// The runtime's writer to `peer` is full (the peer does not read): stop
    /// handing it deltas for a moment; they stay in the log and go out again
    /// from the last acknowledgement.
    pub fn writer_full(&mut self, peer: &str, now_ms: u64) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.out.rewind();
            p.hold_until_ms = now_ms + WRITER_FULL_PAUSE_MS;
        }
    }

    /// Connected peers whose deltas went unacknowledged too long get them again.
    pub(super) fn resend_stalled(&mut self, now_ms: u64) {
        for p in self.peers.values_mut() {
            if p.connected && p.out.resend_if_stalled(now_ms) {
                debug!("resending unacknowledged deltas");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::hlc::Hlc;
    use crate::core::identity::SessionId;
    use crate::core::store::Op;

    fn delta(n: u64) -> Arc<Delta> {
        Arc::new(Delta {
            id: SessionId::parse(&format!("s{n}")).expect("id"),
            hlc: Hlc {
                wall_ms: n,
                logical: 0,
                node: 1,
            },
            created_ms: 0,
            last_accessed_ms: 0,
            max_inactive_ms: 1000,
            ops: vec![Op::Touch],
        })
    }

    fn seqs(b: &[(u64, Vec<Arc<Delta>>)]) -> Vec<(u64, usize)> {
        b.iter().map(|(f, d)| (*f, d.len())).collect()
    }

    #[test]
    fn the_log_hands_out_each_delta_once_in_batches_and_again_after_a_rewind() {
        let mut log = OutLog::with_epoch(7);
        for n in 1..=5 {
            assert_eq!(log.push(delta(n), 10, 0, false), n);
        }
        assert_eq!(seqs(&log.take_batches(25)), vec![(1, 3), (4, 2)]);
        assert!(log.take_batches(25).is_empty(), "nothing new");
        log.push(delta(6), 10, 0, false);
        assert_eq!(seqs(&log.take_batches(1000)), vec![(6, 1)]);
        assert!(log.ack(7, 3, 5));
        log.rewind();
        assert_eq!(seqs(&log.take_batches(1000)), vec![(4, 3)]);
        assert_eq!((log.len(), log.bytes), (3, 30));
    }

    #[test]
    fn a_batch_never_ends_inside_an_atomic_group_below_the_hard_limit() {
        let mut log = OutLog::with_epoch(7);
        log.push(delta(1), 10, 0, false);
        // A group of three: 2, 3, 4.
        log.push(delta(2), 10, 0, true);
        log.push(delta(3), 10, 0, true);
        log.push(delta(4), 10, 0, true);
        log.close_group();
        log.push(delta(5), 10, 0, false);
        // max 25 (hard limit 37): the batch passes 25 bytes inside the group
        // and goes on to its end.
        assert_eq!(
            seqs(&log.take_batches(25)),
            vec![(1, 4), (5, 1)],
            "the batch that reaches 25 bytes inside the group goes on to its end"
        );
        // Without the group the same log is cut at 30 bytes.
        let mut plain = OutLog::with_epoch(7);
        for n in 1..=5 {
            plain.push(delta(n), 10, 0, false);
        }
        assert_eq!(seqs(&plain.take_batches(25)), vec![(1, 3), (4, 2)]);
        // A group bigger than the hard limit (max + max/2) is cut there.
        let mut big = OutLog::with_epoch(7);
        for n in 1..=6 {
            big.push(delta(n), 10, 0, true);
        }
        big.close_group();
        assert_eq!(seqs(&big.take_batches(20)), vec![(1, 3), (4, 3)]);
    }

    #[test]
    fn acks_of_another_stream_or_of_unsent_deltas_change_nothing() {
        let mut log = OutLog::with_epoch(7);
        log.push(delta(1), 10, 0, false);
        log.push(delta(2), 10, 0, false);
        assert!(!log.ack(8, 1, 1), "another epoch");
        assert!(!log.ack(7, 3, 1), "beyond what exists");
        assert!(!log.ack(7, 0, 1), "nothing new");
        assert_eq!(log.len(), 2);
        assert!(log.ack(7, 2, 1));
        assert!(!log.ack(7, 1, 1), "older than the last ack");
        assert!(log.is_empty());
        assert_eq!(log.bytes, 0);
    }

    #[test]
    fn a_stalled_log_is_resent_once_per_interval_and_clear_keeps_numbering() {
        let mut log = OutLog::with_epoch(1);
        log.push(delta(1), 10, 1_000, false);
        log.take_batches(100);
        assert!(!log.resend_if_stalled(1_000 + RESEND_AFTER_MS - 1));
        assert!(log.resend_if_stalled(1_000 + RESEND_AFTER_MS));
        assert_eq!(seqs(&log.take_batches(100)), vec![(1, 1)]);
        assert!(!log.resend_if_stalled(1_000 + RESEND_AFTER_MS + 1));
        log.clear();
        assert!(log.is_empty());
        assert_eq!(
            log.push(delta(2), 10, 0, false),
            2,
            "numbering goes on after clear"
        );
    }

    #[test]
    fn the_inbound_stream_skips_duplicates_reports_gaps_and_restarts_with_a_new_epoch() {
        let mut s = InStream::default();
        assert_eq!(s.accept(5, 1, 3), Accept::Apply { skip: 0, gap: None });
        assert_eq!(s.accept(5, 2, 2), Accept::Nothing, "all duplicates");
        assert_eq!(s.accept(5, 3, 3), Accept::Apply { skip: 1, gap: None });
        assert_eq!(
            s.accept(5, 9, 1),
            Accept::Apply {
                skip: 0,
                gap: Some(6)
            }
        );
        assert_eq!(s.take_ack(), Some(PeerMsg::Ack { epoch: 5, upto: 9 }));
        assert_eq!(s.take_ack(), None, "an ack is owed once");
        assert_eq!(s.accept(6, 1, 1), Accept::Apply { skip: 0, gap: None });
        assert_eq!(
            s.accept(6, u64::MAX, 2),
            Accept::Nothing,
            "overflowing numbers"
        );
        assert_eq!(s.accept(6, 2, 0), Accept::Nothing, "an empty batch");
        assert!(
            s.take_ack().is_some(),
            "an empty batch is still acknowledged"
        );
        s.reset();
        s.reconnected();
        assert_eq!(s.take_ack(), None, "nothing to acknowledge after a reset");
    }
}
