//! State transfer: a starting member pulls every session from a ready peer,
//! chunk by chunk with a cursor, before it serves. A stalled or lost source is
//! replaced by another (resuming at the cursor). With no ready peer the member
//! starts empty only when that is safe: every peer is unreachable or was
//! reached and holds nothing ready (a cold cluster).

use super::{max_hlc, Core, Phase};
use crate::core::detector::MemberState;
use crate::core::identity::SessionId;
use crate::core::message::PeerMsg;
use crate::core::store::SessionState;
use std::collections::BTreeSet;
use tracing::{error, info, warn};

/// A transfer under way.
#[derive(Debug)]
pub(super) struct Transfer {
    pub(super) id: u64,
    pub(super) source: String,
    pub(super) cursor: Option<SessionId>,
    pub(super) last_progress_ms: u64,
    pub(super) started_ms: u64,
    pub(super) tried: BTreeSet<String>,
}

/// How a starting member sees one peer.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PeerAtStart {
    /// Reached (or found unreachable): it no longer holds the start back.
    pub(super) settled: bool,
    /// Answered and refused our handshake: running, may hold sessions.
    pub(super) refused: bool,
    /// Accepted our connection and never answered: alive but hung.
    pub(super) silent: bool,
    pub(super) left: bool,
}

/// What a starting member with no ready peer to pull from does.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Start {
    /// A cold cluster: serve with an empty store.
    Empty,
    /// Only hung peers hold it back, past the bound: serve empty, loudly.
    EmptyDespiteSilent,
    /// Keep waiting; `stalled` once the start-up wait is over.
    Wait { stalled: bool },
}

/// The start-up decision, given each peer's state and how long we waited.
pub(super) fn decide_start(
    peers: &[PeerAtStart],
    waited_ms: u64,
    startup_wait_ms: u64,
    silent_peer_wait_ms: u64,
) -> Start {
    let all_settled = peers
        .iter()
        .all(|p| !p.refused && !p.silent && (p.settled || p.left));
    let waited = waited_ms >= startup_wait_ms;
    let any_silent = peers.iter().any(|p| p.silent);
    if all_settled && (waited || peers.iter().all(|p| p.settled)) {
        Start::Empty
    } else if any_silent && waited_ms >= silent_peer_wait_ms && peers.iter().all(|p| !p.refused) {
        Start::EmptyDespiteSilent
    } else {
        Start::Wait { stalled: waited }
    }
}

/// The member to resume a failed transfer from: one not tried yet, else
/// anyone but the source that failed, else the same one again.
pub(super) fn next_source(
    candidates: &[String],
    tried: &BTreeSet<String>,
    failed: &str,
) -> Option<String> {
    candidates
        .iter()
        .find(|c| !tried.contains(*c))
        .or_else(|| candidates.iter().find(|c| *c != failed))
        .or(candidates.first())
        .cloned()
}

impl Core {
    /// Connected, ready and live peers: those that can serve a transfer.
    pub(super) fn transfer_candidates(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(n, p)| {
                p.connected && p.ready && self.detector.state(n).is_some_and(|s| s.is_live())
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn start_transfer(
        &mut self,
        source: String,
        cursor: Option<SessionId>,
        now_ms: u64,
        mut tried: BTreeSet<String>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        info!(source = %source, resume = cursor.is_some(), "state transfer started");
        let started_ms = self.transfer.as_ref().map_or(now_ms, |t| t.started_ms);
        tried.insert(source.clone());
        self.phase = Phase::Transferring {
            source: source.clone(),
            received: self.stats.transfer_sessions,
            total: self.stats.transfer_total,
        };
        let max_bytes = self.cfg.transfer_chunk_bytes as u32;
        let pull = PeerMsg::TransferPull {
            transfer: id,
            cursor: cursor.clone(),
            max_bytes,
        };
        self.send(&source, pull);
        self.transfer = Some(Transfer {
            id,
            source,
            cursor,
            last_progress_ms: now_ms,
            started_ms,
            tried,
        });
    }

    /// A peer asks for the chunk after `cursor`.
    pub(super) fn serve_pull(
        &mut self,
        to: &str,
        transfer: u64,
        cursor: Option<SessionId>,
        max_bytes: u32,
    ) {
        let cap = (max_bytes as usize).clamp(1024, self.cfg.max_frame_bytes / 2);
        let (states, next) = self.store.chunk_after(cursor.as_ref(), cap);
        let total = (self.store.live_count() + self.store.tombstone_count()) as u64;
        let chunk = PeerMsg::TransferChunk {
            transfer,
            states,
            next,
            total,
        };
        self.send(to, chunk);
    }

    /// Merges remote states that pass the clock and limit checks; returns how
    /// many changed the store.
    pub(super) fn merge_remote(
        &mut self,
        from: &str,
        states: Vec<SessionState>,
        now_ms: u64,
    ) -> u64 {
        let skewed = self.clock_skew().is_some();
        let mut changed = 0;
        for st in states {
            if let Some(v) = max_hlc(&st) {
                if !self.accept_remote(from, v, skewed, now_ms) {
                    continue;
                }
            }
            if let Err(e) = self.store.check_remote_state(&st) {
                self.refuse_over_limits(from, &e);
                continue;
            }
            let id = self.changes.is_some().then(|| st.id.clone());
            if self.store.merge(st, now_ms) == crate::core::store::Applied::Changed {
                if let Some(id) = id {
                    self.note_changed_id(&id);
                }
                changed += 1;
            }
        }
        changed
    }

    pub(super) fn on_chunk(
        &mut self,
        name: &str,
        transfer: u64,
        states: Vec<SessionState>,
        next: Option<SessionId>,
        total: u64,
        now_ms: u64,
    ) {
        match self.transfer.as_ref() {
            Some(t) if t.id == transfer && t.source == name => {}
            _ => return,
        }
        let n = states.len() as u64;
        self.merge_remote(name, states, now_ms);
        self.stats.transfer_sessions += n;
        self.stats.transfer_total = total;
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        t.last_progress_ms = now_ms;
        let Some(cursor) = next else {
            self.stats.transfer_ms = now_ms.saturating_sub(t.started_ms);
            self.transfer = None;
            self.phase = Phase::Ready;
            info!(
                source = %name,
                entries = self.stats.transfer_sessions,
                ms = self.stats.transfer_ms,
                "state transfer complete; member is ready"
            );
            return;
        };
        t.cursor = Some(cursor.clone());
        let id = t.id;
        self.phase = Phase::Transferring {
            source: name.to_owned(),
            received: self.stats.transfer_sessions,
            total,
        };
        if self.timers.progress_log.due(now_ms) {
            info!(received = self.stats.transfer_sessions, total, source = %name, "state transfer progress");
        }
        let max_bytes = self.cfg.transfer_chunk_bytes as u32;
        let pull = PeerMsg::TransferPull {
            transfer: id,
            cursor: Some(cursor),
            max_bytes,
        };
        self.send(name, pull);
    }

    pub(super) fn tick_startup(&mut self, now_ms: u64) {
        match self.phase {
            Phase::Starting => self.tick_starting(now_ms),
            Phase::Transferring { .. } => self.tick_transferring(now_ms),
            _ => {}
        }
    }

    fn tick_starting(&mut self, now_ms: u64) {
        if self.backup.is_some() {
            // Backup mode: the peers hand over what this member holds (see
            // `backup.rs`); it is ready when every ready peer said it is done.
            let ready = self.transfer_candidates();
            if !ready.is_empty() {
                // Placement must be over the members that are really live: a
                // member never heard from (dead before this one started) would
                // take the place of a holder, and a sync write would count it.
                if self.detector.unheard_live() > 0 || !self.view_current() {
                    return;
                }
                let waited_ms = now_ms.saturating_sub(self.started_ms);
                if self.backup_start_done(&ready) {
                    info!(
                        peers = ready.len(),
                        "backup mode: every ready peer handed over; member is ready"
                    );
                    self.phase = Phase::Ready;
                } else if waited_ms > 4 * self.cfg.transfer_stall_ms {
                    warn!(waited_ms, "backup mode: not every ready peer handed over in time; ready anyway (missing copies are fetched on demand and repaired)");
                    self.phase = Phase::Ready;
                }
                return;
            }
        }
        if let Some(src) = self.transfer_candidates().first().cloned() {
            self.start_transfer(src, None, now_ms, BTreeSet::new());
            return;
        }
        let peers: Vec<PeerAtStart> = self
            .peers
            .iter()
            .map(|(n, p)| PeerAtStart {
                settled: p.settled,
                refused: p.refused,
                silent: p.silent,
                left: self.detector.state(n) == Some(MemberState::Left),
            })
            .collect();
        let waited_ms = now_ms.saturating_sub(self.started_ms);
        let silent: Vec<&String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.silent)
            .map(|(n, _)| n)
            .collect();
        match decide_start(
            &peers,
            waited_ms,
            self.cfg.startup_wait_ms,
            self.cfg.silent_peer_wait_ms,
        ) {
            Start::Empty => {
                info!(
                    peers = self.peers.len(),
                    "no ready peer to transfer from; starting with an empty store"
                );
                self.phase = Phase::Ready;
            }
            Start::EmptyDespiteSilent => {
                // Every peer that may hold sessions is alive but hung. Serving
                // nothing forever helps no one either: after the bound, serve
                // what comes (an empty store) and say so loudly.
                error!(
                    ?silent,
                    waited_ms,
                    "peers accept connections but do not answer (hung?); starting with an EMPTY store: sessions they hold are not served until they recover and anti-entropy repairs"
                );
                self.stats.started_empty_with_silent_peers = 1;
                self.phase = Phase::Ready;
            }
            Start::Wait { stalled: true } if self.timers.stall_log.due(now_ms) => {
                let refused: Vec<&String> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.refused)
                    .map(|(n, _)| n)
                    .collect();
                warn!(?refused, ?silent, "still waiting for peers before deciding on state transfer (not ready meanwhile)");
            }
            Start::Wait { .. } => {}
        }
    }

    fn tick_transferring(&mut self, now_ms: u64) {
        let Some(t) = self.transfer.as_ref() else {
            return;
        };
        let src_ok = self.peers.get(&t.source).is_some_and(|p| p.connected)
            && self.detector.state(&t.source).is_some_and(|s| s.is_live());
        let stalled = now_ms.saturating_sub(t.last_progress_ms) > self.cfg.transfer_stall_ms;
        if src_ok && !stalled {
            return;
        }
        match next_source(&self.transfer_candidates(), &t.tried, &t.source) {
            Some(next) => {
                warn!(
                    from = %t.source,
                    to = %next,
                    reason = if stalled { "stalled" } else { "source lost" },
                    "state transfer retrying with another member"
                );
                let (cursor, tried) = (t.cursor.clone(), t.tried.clone());
                self.stats.transfer_retries += 1;
                self.start_transfer(next, cursor, now_ms, tried);
            }
            None => {
                let source = t.source.clone();
                if self.timers.stall_log.due(now_ms) {
                    warn!(source = %source, "state transfer has no live ready source; staying not ready");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLED: PeerAtStart = PeerAtStart {
        settled: true,
        refused: false,
        silent: false,
        left: false,
    };

    #[test]
    fn a_cold_cluster_starts_empty_at_once_when_every_peer_settled() {
        assert_eq!(decide_start(&[], 0, 1_500, 30_000), Start::Empty);
        assert_eq!(
            decide_start(&[SETTLED, SETTLED], 0, 1_500, 30_000),
            Start::Empty
        );
        let left = PeerAtStart {
            settled: false,
            left: true,
            ..SETTLED
        };
        assert_eq!(
            decide_start(&[SETTLED, left], 10, 1_500, 30_000),
            Start::Wait { stalled: false },
            "a left peer not yet settled waits for the start-up wait"
        );
        assert_eq!(
            decide_start(&[SETTLED, left], 1_500, 1_500, 30_000),
            Start::Empty
        );
    }

    #[test]
    fn a_peer_that_refused_us_is_waited_for_without_bound() {
        let refused = PeerAtStart {
            refused: true,
            ..SETTLED
        };
        assert_eq!(
            decide_start(&[refused], 1_000_000, 1_500, 30_000),
            Start::Wait { stalled: true }
        );
        let silent = PeerAtStart {
            silent: true,
            ..SETTLED
        };
        assert_eq!(
            decide_start(&[refused, silent], 1_000_000, 1_500, 30_000),
            Start::Wait { stalled: true },
            "a refusing peer may hold sessions even when another is hung"
        );
    }

    #[test]
    fn hung_peers_are_waited_for_up_to_the_silent_bound() {
        let silent = PeerAtStart {
            silent: true,
            settled: false,
            ..SETTLED
        };
        assert_eq!(
            decide_start(&[SETTLED, silent], 29_999, 1_500, 30_000),
            Start::Wait { stalled: true }
        );
        assert_eq!(
            decide_start(&[SETTLED, silent], 30_000, 1_500, 30_000),
            Start::EmptyDespiteSilent
        );
    }

    #[test]
    fn a_failed_transfer_resumes_elsewhere_first() {
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let tried: BTreeSet<String> = ["a".to_string()].into();
        assert_eq!(next_source(&c(&["a", "b"]), &tried, "a"), Some("b".into()));
        let all: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        assert_eq!(next_source(&c(&["a", "b"]), &all, "a"), Some("b".into()));
        assert_eq!(next_source(&c(&["a"]), &all, "a"), Some("a".into()));
        assert_eq!(next_source(&[], &all, "a"), None);
    }
}
