//! Backup mode: each session lives on an owner and `backups` more members,
//! chosen by rendezvous hashing over the live members (`placement`).
//!
//! - **Writes** go to the session's holders only, over the same numbered
//!   streams as in `all` mode; a sync write waits for every live holder. A
//!   write on a member that holds no copy is applied to a fetched copy there
//!   and streamed to the holders: the owner and backups get it directly.
//! - **Reads anywhere**: before a transaction runs, the runtime asks
//!   `fetch_for` for the sessions it names. A member that holds no copy (or
//!   holds none yet) fetches the session from its first live holder; if that
//!   one lacks it or goes away, from the other holders and as many members
//!   ranked next (where copies are while they move). The transaction runs
//!   when the answers are in or the fetch timed out. Such copies
//!   are never served without a fetch, and are dropped a second later.
//! - **Rebalancing**: when the live members change (or one restarts and
//!   lost its copies), each member walks its store once. For every session
//!   whose new holders include members that did not hold it, one member
//!   sends it: an old holder that is no longer one (it drops its copy once
//!   the new holder acknowledged), else the first old holder still alive.
//!   Every member then tells each new or restarted member it is done, and a
//!   joiner turns ready once every ready peer said so.
//! - **Leftovers**: a copy this member should not hold (a leftover of a
//!   rebalance whose receiver died, a repair from anti-entropy) is sent to
//!   its holders every anti-entropy interval and dropped once acknowledged.

use super::{Core, Output};
use crate::core::identity::SessionId;
use crate::core::message::PeerMsg;
use crate::core::placement;
use crate::core::store::{Entry, SessionState};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

mod digest;
mod rebalance;

/// A fetched copy of a session this member does not hold is dropped after this.
const CACHE_KEEP_MS: u64 = 1_000;
/// Copies not acknowledged within this are given up (the leftover pass retries).
const ROUND_TIMEOUT_MS: u64 = 5_000;
/// A rebalance waits this long at most for new members to be connected.
const CONNECT_WAIT_MS: u64 = 2_000;

/// Backup mode's counters (`/metrics`).
#[derive(Debug, Default, Clone, Serialize)]
pub struct BackupStats {
    pub fetches: u64,
    pub fetch_timeouts: u64,
    pub rebalances: u64,
    pub copies_sent: u64,
    pub copies_acked: u64,
    pub copies_received: u64,
    pub surplus_dropped: u64,
    /// Sessions this member sent and no receiver acknowledged yet.
    pub copies_in_flight: u64,
    /// Sessions this member holds while fewer members are live than copies wanted.
    pub under_replicated: u64,
}

#[derive(Debug)]
struct Fetch {
    waiting: BTreeSet<String>,
    deadline_ms: u64,
    /// Sessions some answer held.
    received: BTreeSet<SessionId>,
    /// Whom to ask next for what the first answers lacked; `None` once asked.
    later: Option<BTreeMap<String, Vec<SessionId>>>,
}

#[derive(Debug)]
struct Round {
    peer: String,
    ids: Vec<SessionId>,
    sent_ms: u64,
}

#[derive(Debug)]
pub(super) struct Backup {
    /// Owner plus backups.
    pub(super) copies: usize,
    /// The live members (this one included), sorted, as of the last rebalance.
    pub(super) view: Vec<String>,
    /// Peers that restarted (a new generation) since: they hold nothing.
    fresh: BTreeSet<String>,
    /// Since when a rebalance waits for new members to be connected.
    waiting_since_ms: Option<u64>,
    fetches: BTreeMap<u64, Fetch>,
    rounds: BTreeMap<u64, Round>,
    in_flight: BTreeMap<SessionId, u32>,
    /// Fetched copies of sessions this member does not hold, and when.
    cached: BTreeMap<SessionId, u64>,
    /// Peers that said they sent everything this member holds.
    done_from: BTreeSet<String>,
    next_leftover_ms: u64,
    pub(super) stats: BackupStats,
    pairs: digest::PairDigests,
}

impl Backup {
    /// A round is over (acknowledged or given up): its sessions are one
    /// round less in flight. Returns those no round holds any more.
    fn release(&mut self, ids: Vec<SessionId>) -> Vec<SessionId> {
        let mut settled = Vec::new();
        for id in ids {
            if let Some(n) = self.in_flight.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(&id);
                    settled.push(id);
                }
            }
        }
        settled
    }

    pub(super) fn new(backups: usize, view: Vec<String>, now_ms: u64) -> Self {
        Backup {
            copies: backups + 1,
            view,
            fresh: BTreeSet::new(),
            waiting_since_ms: None,
            fetches: BTreeMap::new(),
            rounds: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            cached: BTreeMap::new(),
            done_from: BTreeSet::new(),
            next_leftover_ms: now_ms,
            stats: BackupStats::default(),
            pairs: digest::PairDigests::default(),
        }
    }
}

impl Core {
    /// Copies per session in backup mode; `None` in `all` mode.
    pub fn backup_copies(&self) -> Option<usize> {
        self.backup.as_ref().map(|b| b.copies)
    }

    /// A write made here to a session this member does not hold (a create
    /// that fetched nothing): its copy goes a second later, as a fetched one.
    pub(super) fn backup_wrote_unheld(&mut self, id: &SessionId, now_ms: u64) {
        if !self.holds(&self.me.name, id) {
            if let Some(b) = self.backup.as_mut() {
                b.cached.entry(id.clone()).or_insert(now_ms);
            }
        }
    }

    /// The view's size, for the simulator's diagnostics.
    #[cfg(test)]
    pub fn backup_view_len(&self) -> usize {
        self.backup.as_ref().map_or(0, |b| b.view.len())
    }

    pub fn backup_stats(&self) -> Option<BackupStats> {
        self.backup.as_ref().map(|b| {
            let mut s = b.stats.clone();
            s.copies_in_flight = b.in_flight.len() as u64;
            s.under_replicated = if b.view.len() < b.copies {
                self.store.live_count() as u64
            } else {
                s.copies_in_flight
            };
            s
        })
    }

    /// This member and the peers the detector holds live, sorted.
    pub(super) fn live_members(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .peers
            .keys()
            .filter(|n| self.detector.state(n).is_some_and(|s| s.is_live()))
            .cloned()
            .collect();
        v.push(self.me.name.clone());
        v.sort();
        v
    }

    /// Whether the view is the live members and no peer restarted since,
    /// checked without allocating (it runs every tick).
    pub(super) fn view_current(&self) -> bool {
        let Some(b) = self.backup.as_ref() else {
            return true;
        };
        let me = self.me.name.as_str();
        let live = self
            .peers
            .keys()
            .filter(|n| self.detector.state(n).is_some_and(|s| s.is_live()))
            .map(String::as_str);
        let mut view = b.view.iter().map(String::as_str).filter(|n| *n != me);
        b.fresh.is_empty()
            && b.view.iter().any(|n| n == me)
            && live.map(Some).eq(view.by_ref().map(Some))
    }

    /// Whether `member` should receive the session's writes (always in `all` mode).
    pub(super) fn holds(&self, member: &str, id: &SessionId) -> bool {
        match &self.backup {
            None => true,
            Some(b) => placement::holds(&b.view, member, id, b.copies),
        }
    }

    /// A peer restarted: it holds none of its copies any more.
    pub(super) fn backup_peer_restarted(&mut self, peer: &str) {
        if let Some(b) = self.backup.as_mut() {
            b.fresh.insert(peer.to_owned());
            b.done_from.remove(peer);
        }
    }

    /// Before a transaction on `ids` runs: `Some(fetch)` when sessions must
    /// first come from their holders; `Output::FetchDone { fetch }` follows.
    pub fn fetch_for(&mut self, ids: &[SessionId], now_ms: u64) -> Option<u64> {
        let b = self.backup.as_ref()?;
        if ids.is_empty() || self.check_serving().is_err() {
            return None;
        }
        let me = self.me.name.as_str();
        // First the first live holder (normally the owner); if it lacks a
        // session or goes away, the others of twice as many as hold it: while
        // copies move (a rebalance, a view that lags the detector) the old
        // holders rank next.
        let mut first: BTreeMap<String, Vec<SessionId>> = BTreeMap::new();
        let mut later: BTreeMap<String, Vec<SessionId>> = BTreeMap::new();
        for id in ids {
            if placement::holds(&b.view, me, id, b.copies) && self.store.has(id) {
                continue;
            }
            let mut asked = false;
            for h in placement::holders(&b.view, id, 2 * b.copies) {
                let up = self.peers.get(h).is_some_and(|p| p.connected);
                if h == me || !up {
                    continue;
                }
                let into = if asked { &mut later } else { &mut first };
                into.entry(h.to_owned()).or_default().push(id.clone());
                asked = true;
            }
        }
        if first.is_empty() {
            return None;
        }
        let fetch = self.next_id;
        self.next_id += 1;
        let timeout = self.cfg.fetch_timeout_ms;
        let b = self.backup.as_mut()?;
        b.stats.fetches += 1;
        b.fetches.insert(
            fetch,
            Fetch {
                waiting: first.keys().cloned().collect(),
                deadline_ms: now_ms + timeout,
                received: BTreeSet::new(),
                later: Some(later),
            },
        );
        for (to, ids) in first {
            self.send(&to, PeerMsg::Fetch { fetch, ids });
        }
        Some(fetch)
    }

    /// Every member asked has answered (or is gone): asks the next ones for
    /// what no answer held, once; else the fetch is done.
    fn fetch_next(&mut self, fetch: u64) {
        let Some(f) = self.backup.as_mut().and_then(|b| b.fetches.get_mut(&fetch)) else {
            return;
        };
        let mut next: Vec<(String, Vec<SessionId>)> = Vec::new();
        if let Some(later) = f.later.take() {
            for (to, ids) in later {
                let ids: Vec<SessionId> = ids
                    .into_iter()
                    .filter(|i| !f.received.contains(i))
                    .collect();
                if !ids.is_empty() {
                    next.push((to, ids));
                }
            }
        }
        if next.is_empty() {
            if let Some(b) = self.backup.as_mut() {
                b.fetches.remove(&fetch);
            }
            self.outbox.push(Output::FetchDone { fetch });
            return;
        }
        f.waiting = next.iter().map(|(to, _)| to.clone()).collect();
        for (to, ids) in next {
            self.send(&to, PeerMsg::Fetch { fetch, ids });
        }
    }

    pub(super) fn on_fetch(&mut self, from: &str, fetch: u64, ids: Vec<SessionId>) {
        let states = ids.iter().filter_map(|id| self.store.state(id)).collect();
        self.send(from, PeerMsg::Fetched { fetch, states });
    }

    pub(super) fn on_fetched(
        &mut self,
        from: &str,
        fetch: u64,
        states: Vec<SessionState>,
        now_ms: u64,
    ) {
        let waiting = self
            .backup
            .as_mut()
            .and_then(|b| b.fetches.get_mut(&fetch))
            .is_some_and(|f| f.waiting.remove(from));
        if !waiting {
            return;
        }
        let me = self.me.name.clone();
        let ids: Vec<SessionId> = states.iter().map(|s| s.id.clone()).collect();
        self.merge_remote(from, states, now_ms);
        let not_held: Vec<SessionId> = ids
            .iter()
            .filter(|id| !self.holds(&me, id))
            .cloned()
            .collect();
        let Some(b) = self.backup.as_mut() else {
            return;
        };
        for id in not_held {
            b.cached.insert(id, now_ms);
        }
        let Some(f) = b.fetches.get_mut(&fetch) else {
            return;
        };
        f.received.extend(ids);
        if f.waiting.is_empty() {
            self.fetch_next(fetch);
        }
    }

    pub(super) fn on_copies(
        &mut self,
        from: &str,
        round: u64,
        states: Vec<SessionState>,
        done: bool,
        now_ms: u64,
    ) {
        let n = states.len() as u64;
        self.merge_remote(from, states, now_ms);
        if round != 0 {
            self.send(from, PeerMsg::CopiesAck { round });
        }
        if let Some(b) = self.backup.as_mut() {
            b.stats.copies_received += n;
            if done {
                b.done_from.insert(from.to_owned());
            }
        }
    }

    /// The receiver merged a round: copies of sessions this member no
    /// longer holds can go.
    pub(super) fn on_copies_ack(&mut self, from: &str, round: u64) {
        let me = self.me.name.clone();
        let Some(b) = self.backup.as_mut() else {
            return;
        };
        let Some(r) = b.rounds.remove(&round) else {
            return;
        };
        if r.peer != from {
            b.rounds.insert(round, r);
            return;
        }
        b.stats.copies_acked += r.ids.len() as u64;
        for id in b.release(r.ids) {
            let cached = self
                .backup
                .as_ref()
                .is_some_and(|b| b.cached.contains_key(&id));
            if !cached && !self.holds(&me, &id) && self.store.forget(&id) {
                if let Some(b) = self.backup.as_mut() {
                    b.stats.surplus_dropped += 1;
                }
            }
        }
    }

    /// Sends whole sessions in rounds of about a transfer chunk, each
    /// acknowledged; `done` marks the last as the end of this rebalance.
    fn send_copies(&mut self, to: &str, ids: Vec<SessionId>, done: bool, now_ms: u64) {
        let max = self.cfg.transfer_chunk_bytes.max(1024);
        let mut chunks: Vec<Vec<SessionState>> = vec![Vec::new()];
        let mut bytes = 0;
        for id in &ids {
            let Some(st) = self.store.state(id) else {
                continue;
            };
            bytes += 64
                + match &st.entry {
                    Entry::Live(s) => s.payload_bytes(),
                    Entry::Tombstone { .. } => 0,
                };
            if let Some(c) = chunks.last_mut() {
                c.push(st);
            }
            if bytes >= max {
                chunks.push(Vec::new());
                bytes = 0;
            }
        }
        let last = chunks.len() - 1;
        for (i, states) in chunks.into_iter().enumerate() {
            if states.is_empty() && !(done && i == last) {
                continue;
            }
            let round = if states.is_empty() {
                0
            } else {
                let round = self.next_id;
                self.next_id += 1;
                round
            };
            if let Some(b) = self.backup.as_mut() {
                if round != 0 {
                    let ids: Vec<SessionId> = states.iter().map(|s| s.id.clone()).collect();
                    for id in &ids {
                        *b.in_flight.entry(id.clone()).or_default() += 1;
                    }
                    b.stats.copies_sent += ids.len() as u64;
                    b.rounds.insert(
                        round,
                        Round {
                            peer: to.to_owned(),
                            ids,
                            sent_ms: now_ms,
                        },
                    );
                }
            }
            let done = done && i == last;
            self.send(
                to,
                PeerMsg::Copies {
                    round,
                    states,
                    done,
                },
            );
        }
    }

    /// Backup mode's periodic work: fetch deadlines, dropping fetched
    /// copies, rounds given up, rebalancing and the leftover pass.
    pub(super) fn tick_backup(&mut self, now_ms: u64) {
        if self.backup.is_none() {
            return;
        }
        let Some(b) = self.backup.as_ref() else {
            return;
        };
        let (fetches, rounds, cached) = (
            !b.fetches.is_empty(),
            !b.rounds.is_empty(),
            !b.cached.is_empty(),
        );
        if fetches {
            self.expire_fetches(now_ms);
        }
        if rounds {
            self.expire_rounds(now_ms);
        }
        if cached {
            self.drop_cached(now_ms);
        }
        if !self.view_current() {
            self.maybe_rebalance(now_ms);
        }
        self.refresh_pair_digests(false);
        let due = self
            .backup
            .as_ref()
            .is_some_and(|b| now_ms >= b.next_leftover_ms);
        if due && self.is_ready() {
            if let Some(b) = self.backup.as_mut() {
                b.next_leftover_ms = now_ms + self.cfg.anti_entropy_interval_ms;
            }
            self.send_leftovers(now_ms);
        }
    }

    fn expire_fetches(&mut self, now_ms: u64) {
        let live: BTreeSet<String> = self.live_members().into_iter().collect();
        let connected: BTreeSet<&String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(n, _)| n)
            .collect();
        let Some(b) = self.backup.as_mut() else {
            return;
        };
        let (mut done, mut next) = (Vec::new(), Vec::new());
        for (id, f) in b.fetches.iter_mut() {
            f.waiting
                .retain(|w| live.contains(w) && connected.contains(w));
            if now_ms >= f.deadline_ms {
                if !f.waiting.is_empty() {
                    b.stats.fetch_timeouts += 1;
                }
                done.push(*id);
            } else if f.waiting.is_empty() {
                next.push(*id);
            }
        }
        for fetch in done {
            b.fetches.remove(&fetch);
            self.outbox.push(Output::FetchDone { fetch });
        }
        for fetch in next {
            self.fetch_next(fetch);
        }
    }

    fn expire_rounds(&mut self, now_ms: u64) {
        let live: BTreeSet<String> = self.live_members().into_iter().collect();
        let Some(b) = self.backup.as_mut() else {
            return;
        };
        let gone: Vec<u64> = b
            .rounds
            .iter()
            .filter(|(_, r)| !live.contains(&r.peer) || now_ms >= r.sent_ms + ROUND_TIMEOUT_MS)
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            if let Some(r) = b.rounds.remove(&k) {
                b.release(r.ids);
            }
        }
    }

    fn drop_cached(&mut self, now_ms: u64) {
        let me = self.me.name.clone();
        let Some(b) = self.backup.as_mut() else {
            return;
        };
        let old: Vec<SessionId> = b
            .cached
            .iter()
            .filter(|(_, at)| now_ms >= **at + CACHE_KEEP_MS)
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            b.cached.remove(&id);
            let keep =
                b.in_flight.contains_key(&id) || placement::holds(&b.view, &me, &id, b.copies);
            if !keep {
                self.store.forget(&id);
            }
        }
    }

    /// Nothing sent is waiting for an acknowledgement.
    pub(super) fn copies_settled(&self) -> bool {
        self.backup.as_ref().is_none_or(|b| b.rounds.is_empty())
    }

    /// A starting member in backup mode: ready once every ready peer said it
    /// sent what this member holds.
    pub(super) fn backup_start_done(&self, ready_peers: &[String]) -> bool {
        self.backup
            .as_ref()
            .is_some_and(|b| ready_peers.iter().all(|p| b.done_from.contains(p)))
    }
}
