//! Anti-entropy: what the streams missed (a dropped backlog, a gap, a member
//! back from the dead) is repaired by comparing the store with a peer's,
//! bucket digests first, then the entries of the buckets that differ, then
//! pushing and pulling the differing sessions as whole states.

use super::Core;
use crate::core::identity::SessionId;
use crate::core::message::PeerMsg;
use crate::core::store::{Entry, SessionState, BUCKETS};
use std::collections::HashMap;
use tracing::debug;

/// Most entries one detail message lists.
const MAX_DETAIL_ENTRIES: usize = 100_000;

/// The buckets whose digests differ (a missing digest differs).
pub(super) fn differing_buckets(theirs: &[u64], mine: &[u64]) -> Vec<u16> {
    (0..BUCKETS.min(mine.len()))
        .filter(|i| theirs.get(*i).copied() != Some(mine[*i]))
        .map(|i| i as u16)
        .collect()
}

/// Given both sides' `(id, entry hash)` for the same buckets: the ids to push
/// (ours differ or they lack them) and to pull (theirs differ or we lack them).
pub(super) fn reconcile(
    mine: &[(SessionId, u64)],
    theirs: &[(SessionId, u64)],
) -> (Vec<SessionId>, Vec<SessionId>) {
    let mine_map: HashMap<&SessionId, u64> = mine.iter().map(|(i, h)| (i, *h)).collect();
    let theirs_map: HashMap<&SessionId, u64> = theirs.iter().map(|(i, h)| (i, *h)).collect();
    let push = mine
        .iter()
        .filter(|(id, h)| theirs_map.get(id) != Some(h))
        .map(|(id, _)| id.clone())
        .collect();
    let pull = theirs
        .iter()
        .filter(|(id, h)| mine_map.get(id) != Some(h))
        .map(|(id, _)| id.clone())
        .collect();
    (push, pull)
}

impl Core {
    /// The digest compared with `peer`: in backup mode, of the sessions both hold.
    fn ae_digest(&mut self, peer: &str) -> Vec<u64> {
        match self.backup {
            None => self.store.bucket_digest(),
            Some(_) => self.pair_digest(peer),
        }
    }

    fn ae_entries(&self, peer: &str, buckets: &[u16]) -> Vec<(SessionId, u64)> {
        self.store
            .bucket_entries_where(buckets, MAX_DETAIL_ENTRIES, |id| {
                self.holds(peer, id) && self.holds(&self.me.name, id)
            })
    }

    pub(super) fn on_ae_digest(&mut self, name: &str, round: u64, buckets: Vec<u64>) {
        let diff = differing_buckets(&buckets, &self.ae_digest(name));
        if diff.is_empty() {
            return;
        }
        let entries = self.ae_entries(name, &diff);
        let detail = PeerMsg::AeDetail {
            round,
            buckets: diff,
            entries,
        };
        self.send(name, detail);
    }

    pub(super) fn on_ae_detail(
        &mut self,
        name: &str,
        buckets: Vec<u16>,
        theirs: Vec<(SessionId, u64)>,
    ) {
        let mine = self.ae_entries(name, &buckets);
        let (push, pull) = reconcile(&mine, &theirs);
        if !push.is_empty() || !pull.is_empty() {
            debug!(peer = %name, push = push.len(), pull = pull.len(), "anti-entropy found differences");
        }
        let states = push.iter().filter_map(|id| self.store.state(id)).collect();
        self.send_states(name, states);
        if !pull.is_empty() {
            self.send(name, PeerMsg::AePull { ids: pull });
        }
    }

    pub(super) fn on_ae_pull(&mut self, name: &str, ids: Vec<SessionId>) {
        let states = ids.iter().filter_map(|id| self.store.state(id)).collect();
        self.send_states(name, states);
    }

    pub(super) fn on_ae_states(&mut self, name: &str, states: Vec<SessionState>, now_ms: u64) {
        self.stats.ae_repairs += self.merge_remote(name, states, now_ms);
    }

    /// Sends whole states in messages of about a transfer chunk each.
    fn send_states(&mut self, to: &str, states: Vec<SessionState>) {
        let max = self.cfg.transfer_chunk_bytes.max(1024);
        let mut batch = Vec::new();
        let mut bytes = 0;
        for st in states {
            bytes += 64
                + match &st.entry {
                    Entry::Live(s) => s.payload_bytes(),
                    _ => 0,
                };
            batch.push(st);
            if bytes >= max {
                let states = std::mem::take(&mut batch);
                self.send(to, PeerMsg::AeStates { states });
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.send(to, PeerMsg::AeStates { states: batch });
        }
    }

    /// Starts the rounds that are due: one with a random ready peer every
    /// interval (jittered), and one with every peer that asked for repair.
    pub(super) fn tick_anti_entropy(&mut self, now_ms: u64) {
        let periodic = now_ms >= self.timers.next_ae_ms;
        if !self.is_ready() || (!periodic && self.ae_wanted.is_empty()) {
            return;
        }
        let mut targets: Vec<String> = Vec::new();
        if periodic {
            let interval = self.cfg.anti_entropy_interval_ms;
            let jitter = self.rng_next() % (interval / 5 + 1);
            self.timers.next_ae_ms = now_ms + interval - interval / 10 + jitter;
            let mut c = self.transfer_candidates();
            c.retain(|n| !self.ae_wanted.contains(n));
            if !c.is_empty() {
                let i = (self.rng_next() as usize) % c.len();
                targets.push(c.swap_remove(i));
            }
        }
        targets.extend(std::mem::take(&mut self.ae_wanted));
        for t in targets {
            if self.peers.get(&t).is_some_and(|p| p.connected) {
                self.stats.ae_rounds += 1;
                let round = self.next_id;
                self.next_id += 1;
                let buckets = self.ae_digest(&t);
                self.send(&t, PeerMsg::AeDigest { round, buckets });
            } else if self.detector.state(&t).is_some_and(|s| s.is_live()) {
                // Not connected yet: try again on a later tick.
                self.ae_wanted.insert(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).expect("id")
    }

    #[test]
    fn only_buckets_whose_digests_differ_are_compared() {
        let mine = vec![1u64; BUCKETS];
        let mut theirs = mine.clone();
        assert!(differing_buckets(&theirs, &mine).is_empty());
        theirs[3] = 9;
        theirs.truncate(BUCKETS - 1);
        assert_eq!(
            differing_buckets(&theirs, &mine),
            vec![3, (BUCKETS - 1) as u16],
            "a changed and a missing digest"
        );
    }

    #[test]
    fn each_side_gets_what_it_lacks_or_holds_differently() {
        let mine = vec![(id("same"), 1), (id("changed"), 2), (id("only-mine"), 3)];
        let theirs = vec![(id("same"), 1), (id("changed"), 5), (id("only-theirs"), 4)];
        let (mut push, mut pull) = reconcile(&mine, &theirs);
        push.sort();
        pull.sort();
        assert_eq!(push, vec![id("changed"), id("only-mine")]);
        assert_eq!(pull, vec![id("changed"), id("only-theirs")]);
        let (push, pull) = reconcile(&mine, &mine);
        assert!(push.is_empty() && pull.is_empty());
    }
}
