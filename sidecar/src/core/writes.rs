//! Local reads and writes, and the writes that wait: a sync write completes
//! when every member that was live when it was written has acknowledged it
//! (or died, left or restarted); any write waits while a live member's queue
//! is over the bound. Past the write timeout it completes with `Timeout`.

use super::{Core, Output, Phase, SendMode, WriteError};
use crate::core::identity::{Generation, SessionId};
use crate::core::store::{Delta, Op, Session};

/// One acknowledgement a sync write waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Wait {
    pub(super) peer: String,
    /// The peer's life when the write was made; another life owes nothing.
    pub(super) gen: Option<Generation>,
    pub(super) seq: u64,
}

#[derive(Debug)]
pub(super) struct PendingWrite {
    pub(super) write: u64,
    pub(super) waits: Vec<Wait>,
    /// The write also waits until no live member's queue is over the bound.
    pub(super) backpressure: bool,
    pub(super) deadline_ms: u64,
}

/// The writes that have not completed.
#[derive(Debug, Default)]
pub(super) struct PendingWrites(Vec<PendingWrite>);

impl PendingWrites {
    pub(super) fn push(&mut self, w: PendingWrite) {
        self.0.push(w);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes and returns the writes that are done: `(write, true)` when
    /// every wait is `acked` and, for a write under back-pressure, no
    /// `backlog` remains; `(write, false)` when its deadline passed first.
    pub(super) fn settle(
        &mut self,
        now_ms: u64,
        backlog: bool,
        acked: impl Fn(&Wait) -> bool,
    ) -> Vec<(u64, bool)> {
        let mut done = Vec::new();
        self.0.retain(|w| {
            if w.waits.iter().all(&acked) && (!w.backpressure || !backlog) {
                done.push((w.write, true));
                false
            } else if now_ms >= w.deadline_ms {
                done.push((w.write, false));
                false
            } else {
                true
            }
        });
        done
    }
}

impl Core {
    /// Reads a session; `touch` records an access (replicated coalesced).
    pub fn read(
        &mut self,
        id: &SessionId,
        touch: bool,
        now_ms: u64,
    ) -> Result<Session, WriteError> {
        self.check_serving()?;
        let grace = self.cfg.touch_flush_ms;
        let s = self.store.get(id, now_ms, grace)?.clone();
        self.note_read(id);
        if touch && now_ms > s.last_accessed_ms {
            let d = Delta {
                id: id.clone(),
                hlc: self.clock.now(now_ms),
                created_ms: s.created_ms,
                last_accessed_ms: now_ms,
                max_inactive_ms: s.max_inactive_ms,
                ops: vec![Op::Touch],
            };
            self.store.apply(&d, now_ms);
            if self.holds(&self.me.name, id) {
                self.dirty_touch.insert(id.clone());
            } else {
                // A fetched copy is dropped soon: its touch goes out now.
                self.replicate(d, now_ms);
            }
        }
        Ok(s)
    }

    pub fn list(&self, cursor: Option<&SessionId>, limit: usize, now_ms: u64) -> Vec<SessionId> {
        self.store
            .list(cursor, limit, now_ms, self.cfg.touch_flush_ms)
    }

    pub fn check_serving(&self) -> Result<(), WriteError> {
        if self.phase != Phase::Leaving {
            // Whatever the phase, a wrong clock is the reason that matters.
            if let Some(offset_ms) = self.clock_skew() {
                return Err(WriteError::ClockSkew {
                    offset_ms,
                    bound_ms: self.cfg.max_clock_skew_ms,
                });
            }
        }
        match self.phase {
            Phase::Ready => Ok(()),
            Phase::Leaving => Err(WriteError::Leaving),
            _ => Err(WriteError::NotReady),
        }
    }

    /// A local write. `Ok(true)` means it completed; `Ok(false)` means an
    /// `Output::WriteDone` for `write` will follow.
    pub fn write(
        &mut self,
        write: u64,
        id: SessionId,
        ops: Vec<Op>,
        max_inactive_ms: Option<u64>,
        mode: Option<SendMode>,
        now_ms: u64,
    ) -> Result<bool, WriteError> {
        let grace = self.cfg.touch_flush_ms;
        self.write_with(write, id, ops, max_inactive_ms, mode, now_ms, grace)
    }

    /// `write` with an explicit expiry grace: the Redis endpoint uses 0, since
    /// its keys expire at exact absolute times.
    #[allow(clippy::too_many_arguments)]
    pub fn write_with(
        &mut self,
        write: u64,
        id: SessionId,
        mut ops: Vec<Op>,
        max_inactive_ms: Option<u64>,
        mode: Option<SendMode>,
        now_ms: u64,
        grace: u64,
    ) -> Result<bool, WriteError> {
        self.check_serving()?;
        let existing = self.store.get(&id, now_ms, grace).ok();
        let created_ms = existing.map_or(now_ms, |s| s.created_ms);
        let current_mi = existing.map_or(self.cfg.default_max_inactive_ms, |s| s.max_inactive_ms);
        let creating = ops.contains(&Op::Create);
        if (max_inactive_ms.is_some() || creating) && !ops.contains(&Op::MaxInactive) {
            ops.push(Op::MaxInactive);
        }
        let d = Delta {
            id,
            hlc: self.clock.now(now_ms),
            created_ms,
            last_accessed_ms: now_ms,
            max_inactive_ms: max_inactive_ms.unwrap_or(current_mi),
            ops,
        };
        self.store.check_local(&d, now_ms, grace)?;
        // An expired session under the same id is replaced, not merged into.
        if creating {
            self.store.remove_if_expired(&d.id, now_ms, grace);
        }
        self.store.apply(&d, now_ms);
        self.note_change(&d, true);
        self.dirty_touch.remove(&d.id);
        let renamed = d.ops.iter().find_map(|o| match o {
            Op::Rename { to } => Some(to.clone()),
            _ => None,
        });
        if self.backup.is_some() {
            self.backup_wrote_unheld(&d.id, now_ms);
        }
        let waits = self.replicate(d, now_ms);
        if let Some(to) = renamed {
            self.backup_renamed(to, now_ms);
        }
        let mode = mode.unwrap_or(self.cfg.send);
        let backpressure = self
            .peers
            .values()
            .any(|p| p.out.bytes > self.cfg.max_queue_bytes);
        if (mode == SendMode::Async || waits.is_empty()) && !backpressure {
            return Ok(true);
        }
        let waits = if mode == SendMode::Sync {
            waits
        } else {
            Vec::new()
        };
        self.pending.push(PendingWrite {
            write,
            waits,
            backpressure,
            deadline_ms: now_ms + self.cfg.write_timeout_ms,
        });
        Ok(false)
    }

    pub(super) fn check_pending(&mut self, now_ms: u64) {
        if self.pending.is_empty() {
            return;
        }
        let bound = self.cfg.max_queue_bytes;
        let backlog = self.peers.iter().any(|(n, p)| {
            p.out.bytes > bound && self.detector.state(n).is_some_and(|s| s.is_live())
        });
        let (peers, det) = (&self.peers, &self.detector);
        let settled = self
            .pending
            .settle(now_ms, backlog, |w| match peers.get(&w.peer) {
                None => true,
                Some(p) => {
                    p.gen != w.gen && w.gen.is_some()
                        || !det.state(&w.peer).is_some_and(|s| s.is_live())
                        || p.out.acked >= w.seq
                }
            });
        for (write, ok) in settled {
            let result = if ok {
                Ok(())
            } else {
                self.stats.write_timeouts += 1;
                Err(WriteError::Timeout(self.cfg.write_timeout_ms))
            };
            self.outbox.push(Output::WriteDone { write, result });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(peer: &str, seq: u64) -> Wait {
        Wait {
            peer: peer.into(),
            gen: Some(Generation(1)),
            seq,
        }
    }

    fn pending(write: u64, waits: Vec<Wait>, backpressure: bool) -> PendingWrite {
        PendingWrite {
            write,
            waits,
            backpressure,
            deadline_ms: 100,
        }
    }

    #[test]
    fn a_write_completes_when_every_wait_is_acknowledged() {
        let mut p = PendingWrites::default();
        p.push(pending(1, vec![wait("b", 3), wait("c", 4)], false));
        p.push(pending(2, vec![wait("b", 5)], false));
        assert!(p
            .settle(10, false, |w| w.peer == "b" && w.seq <= 3)
            .is_empty());
        assert_eq!(p.settle(10, false, |w| w.seq <= 4), vec![(1, true)]);
        assert_eq!(
            p.settle(10, true, |_| true),
            vec![(2, true)],
            "no back-pressure asked"
        );
        assert!(p.is_empty());
    }

    #[test]
    fn back_pressure_holds_a_write_until_the_backlog_clears_or_the_deadline() {
        let mut p = PendingWrites::default();
        p.push(pending(1, Vec::new(), true));
        p.push(pending(2, Vec::new(), true));
        assert!(p.settle(99, true, |_| true).is_empty());
        assert_eq!(p.settle(100, true, |_| true), vec![(1, false), (2, false)]);
        p.push(pending(3, Vec::new(), true));
        assert_eq!(p.settle(50, false, |_| true), vec![(3, true)]);
    }

    #[test]
    fn an_unacknowledged_write_times_out_at_its_deadline_not_before() {
        let mut p = PendingWrites::default();
        p.push(pending(9, vec![wait("b", 1)], false));
        assert!(p.settle(99, false, |_| false).is_empty());
        assert_eq!(p.settle(100, false, |_| false), vec![(9, false)]);
        assert!(p.settle(200, false, |_| false).is_empty(), "reported once");
    }
}
