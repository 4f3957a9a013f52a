//! Backup mode: each session lives on an owner and `backups` more members,
//! chosen by rendezvous hashing over the live members (`placement`).
//!
//! - **Writes** go to the session's holders only, over the same numbered
//!   streams as in `all` mode; a sync write waits for every live holder. A
//!   write on a member that holds no copy is applied to a fetched copy there
//!   and streamed to the holders: the owner and backups get it directly.
//! - **Reads anywhere**: before a transaction runs, the runtime asks
//!   `fetch_for` for the sessions it names. A member that holds no copy (or
//!   holds none yet) fetches the session from its live holders, and as many
//!   members ranked next (where copies are while they move), and runs the
//!   transaction when every one answered or the fetch timed out. Such copies
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
use tracing::{info, warn};

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
}

impl Backup {
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
        }
    }
}

/// Who sends a session to its new holders after a change from `old` to
/// `new`: the members of `old`'s holders (minus `fresh`, which lost their
/// copies) still live that are holders no more; if none, the first old holder
/// still live; if none is left, whoever has it. Returns the new holders that
/// need it and whether `me` sends.
fn handoff<'a>(
    old: &[String],
    new: &'a [String],
    fresh: &BTreeSet<String>,
    id: &SessionId,
    copies: usize,
    me: &str,
) -> (Vec<&'a str>, bool) {
    let h0 = placement::holders(old, id, copies);
    let h1 = placement::holders(new, id, copies);
    let had: Vec<&str> = h0.into_iter().filter(|m| !fresh.contains(*m)).collect();
    let targets: Vec<&str> = h1
        .iter()
        .copied()
        .filter(|m| *m != me && !had.contains(m))
        .collect();
    if targets.is_empty() {
        return (targets, false);
    }
    let live_had: Vec<&str> = had
        .into_iter()
        .filter(|m| new.iter().any(|n| n == m))
        .collect();
    let surplus: Vec<&str> = live_had
        .iter()
        .copied()
        .filter(|m| !h1.contains(m))
        .collect();
    let sender = if !surplus.is_empty() {
        surplus.contains(&me)
    } else {
        live_had.first().is_none_or(|f| *f == me)
    };
    (targets, sender)
}

impl Core {
    /// Copies per session in backup mode; `None` in `all` mode.
    pub fn backup_copies(&self) -> Option<usize> {
        self.backup.as_ref().map(|b| b.copies)
    }

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
    fn view_current(&self) -> bool {
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
        let mut per: BTreeMap<String, Vec<SessionId>> = BTreeMap::new();
        for id in ids {
            if placement::holds(&b.view, me, id, b.copies) && self.store.has(id) {
                continue;
            }
            // Twice as many as hold it: while copies move (a rebalance, a
            // view that lags the detector) the old holders rank next.
            for h in placement::holders(&b.view, id, 2 * b.copies) {
                let up = self.peers.get(h).is_some_and(|p| p.connected);
                if h != me && up {
                    per.entry(h.to_owned()).or_default().push(id.clone());
                }
            }
        }
        if per.is_empty() {
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
                waiting: per.keys().cloned().collect(),
                deadline_ms: now_ms + timeout,
            },
        );
        for (to, ids) in per {
            self.send(&to, PeerMsg::Fetch { fetch, ids });
        }
        Some(fetch)
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
        let not_held: Vec<SessionId> = ids.into_iter().filter(|id| !self.holds(&me, id)).collect();
        if let Some(b) = self.backup.as_mut() {
            for id in not_held {
                b.cached.insert(id, now_ms);
            }
            if b.fetches.get(&fetch).is_some_and(|f| f.waiting.is_empty()) {
                b.fetches.remove(&fetch);
                self.outbox.push(Output::FetchDone { fetch });
            }
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
        let mut settled = Vec::new();
        for id in r.ids {
            if let Some(n) = b.in_flight.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    b.in_flight.remove(&id);
                    settled.push(id);
                }
            }
        }
        for id in settled {
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
        let mut done = Vec::new();
        for (id, f) in b.fetches.iter_mut() {
            f.waiting
                .retain(|w| live.contains(w) && connected.contains(w));
            if f.waiting.is_empty() || now_ms >= f.deadline_ms {
                if !f.waiting.is_empty() {
                    b.stats.fetch_timeouts += 1;
                }
                done.push(*id);
            }
        }
        for fetch in done {
            b.fetches.remove(&fetch);
            self.outbox.push(Output::FetchDone { fetch });
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
                for id in r.ids {
                    if let Some(n) = b.in_flight.get_mut(&id) {
                        *n -= 1;
                        if *n == 0 {
                            b.in_flight.remove(&id);
                        }
                    }
                }
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

    /// Rebalances when the live members changed or a peer restarted, once the
    /// new members are connected (or after `CONNECT_WAIT_MS`).
    fn maybe_rebalance(&mut self, now_ms: u64) {
        let live = self.live_members();
        let Some(b) = self.backup.as_ref() else {
            return;
        };
        if live == b.view && b.fresh.is_empty() {
            return;
        }
        let joined: Vec<&String> = live
            .iter()
            .filter(|m| !b.view.contains(m) || b.fresh.contains(*m))
            .filter(|m| **m != self.me.name)
            .collect();
        let unconnected = joined
            .iter()
            .any(|m| !self.peers.get(*m).is_some_and(|p| p.connected));
        let since = b.waiting_since_ms.unwrap_or(now_ms);
        if unconnected && now_ms < since + CONNECT_WAIT_MS {
            if let Some(b) = self.backup.as_mut() {
                b.waiting_since_ms = Some(since);
            }
            return;
        }
        let Some(b) = self.backup.as_mut() else {
            return;
        };
        b.waiting_since_ms = None;
        let old = std::mem::replace(&mut b.view, live.clone());
        let fresh = std::mem::take(&mut b.fresh);
        let told: Vec<String> = joined.into_iter().cloned().collect();
        self.rebalance(&old, &live, &fresh, told, now_ms);
    }

    fn rebalance(
        &mut self,
        old: &[String],
        new: &[String],
        fresh: &BTreeSet<String>,
        told: Vec<String>,
        now_ms: u64,
    ) {
        let Some(copies) = self.backup_copies() else {
            return;
        };
        let me = self.me.name.clone();
        let mut batches: BTreeMap<String, Vec<SessionId>> = BTreeMap::new();
        for id in self.store.ids() {
            let (targets, send) = handoff(old, new, fresh, &id, copies, &me);
            if send {
                for t in targets {
                    batches.entry(t.to_owned()).or_default().push(id.clone());
                }
            }
        }
        let sessions: usize = batches.values().map(Vec::len).sum();
        info!(
            members = new.len(),
            was = old.len(),
            sessions,
            receivers = batches.len(),
            "backup mode: members changed; rebalancing"
        );
        if let Some(b) = self.backup.as_mut() {
            b.stats.rebalances += 1;
        }
        for t in told {
            batches.entry(t).or_default();
        }
        for (to, ids) in batches {
            self.send_copies(&to, ids, true, now_ms);
        }
    }

    /// Copies this member should not hold go to their holders, and are
    /// dropped once acknowledged.
    fn send_leftovers(&mut self, now_ms: u64) {
        let Some(b) = self.backup.as_ref() else {
            return;
        };
        let me = self.me.name.as_str();
        let mut batches: BTreeMap<String, Vec<SessionId>> = BTreeMap::new();
        for id in self.store.ids() {
            if b.cached.contains_key(&id)
                || b.in_flight.contains_key(&id)
                || placement::holds(&b.view, me, &id, b.copies)
            {
                continue;
            }
            for h in placement::holders(&b.view, &id, b.copies) {
                batches.entry(h.to_owned()).or_default().push(id.clone());
            }
        }
        if !batches.is_empty() {
            let n: usize = batches.values().map(Vec::len).sum();
            warn!(
                copies = n,
                "backup mode: handing copies this member should not hold to their holders"
            );
        }
        for (to, ids) in batches {
            self.send_copies(&to, ids, false, now_ms);
        }
    }

    /// A leaving member hands every session it holds to the members that
    /// hold it once it is gone; `flushed` waits for their acknowledgements.
    pub(super) fn backup_leave(&mut self, now_ms: u64) {
        let Some(b) = self.backup.as_ref() else {
            return;
        };
        let me = self.me.name.clone();
        let old = b.view.clone();
        let new: Vec<String> = old.iter().filter(|m| **m != me).cloned().collect();
        let copies = b.copies;
        let mut batches: BTreeMap<String, Vec<SessionId>> = BTreeMap::new();
        for id in self.store.ids() {
            if !placement::holds(&old, &me, &id, copies) {
                continue;
            }
            let h0 = placement::holders(&old, &id, copies);
            for t in placement::holders(&new, &id, copies) {
                if !h0.contains(&t) {
                    batches.entry(t.to_owned()).or_default().push(id.clone());
                }
            }
        }
        for (to, ids) in batches {
            self.send_copies(&to, ids, false, now_ms);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn m(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn one_member_sends_each_moved_session_and_a_surplus_holder_is_the_one() {
        let old = m(&["a", "b", "c", "d", "e"]);
        let none = BTreeSet::new();
        for i in 0..300 {
            let id = SessionId::parse(&format!("s{i}")).expect("id");
            // A death: the first surviving old holder sends.
            let dead = placement::holders(&old, &id, 2)[0].to_owned();
            let new: Vec<String> = old.iter().filter(|n| **n != dead).cloned().collect();
            let senders: Vec<&String> = new
                .iter()
                .filter(|me| handoff(&old, &new, &none, &id, 2, me).1)
                .collect();
            assert_eq!(senders.len(), 1, "exactly one sender after a death");
            let (targets, _) = handoff(&old, &new, &none, &id, 2, senders[0]);
            assert_eq!(targets.len(), 1);
            // A join where the joiner takes a place: the holder it displaced sends.
            let mut joined = old.clone();
            joined.push("z".into());
            let h0 = placement::holders(&old, &id, 2);
            let h1 = placement::holders(&joined, &id, 2);
            if h1.contains(&"z") {
                let displaced: Vec<&&str> = h0.iter().filter(|x| !h1.contains(x)).collect();
                let senders: Vec<&String> = joined
                    .iter()
                    .filter(|me| handoff(&old, &joined, &none, &id, 2, me).1)
                    .collect();
                assert_eq!(senders.len(), 1);
                assert_eq!(senders[0].as_str(), *displaced[0]);
            }
            // A restart: the restarted holder gets it back from the other one.
            let fresh: BTreeSet<String> = [h0[0].to_owned()].into();
            let (targets, _) = handoff(&old, &old, &fresh, &id, 2, "nobody");
            assert_eq!(targets, vec![h0[0]]);
            let (_, sends) = handoff(&old, &old, &fresh, &id, 2, h0[1]);
            assert!(sends, "the other holder sends to the restarted one");
        }
    }
}
