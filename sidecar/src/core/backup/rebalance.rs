//! Rebalancing in backup mode: who hands which session to whom when the
//! live members change, the leftover pass, a rename's new id, and the
//! handover of a member that leaves.

use super::CONNECT_WAIT_MS;
use crate::core::identity::SessionId;
use crate::core::placement;
use crate::core::Core;
use std::collections::{BTreeMap, BTreeSet};
use tracing::{info, warn};

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
    /// Rebalances when the live members changed or a peer restarted, once the
    /// new members are connected (or after `CONNECT_WAIT_MS`).
    pub(super) fn maybe_rebalance(&mut self, now_ms: u64) {
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
    pub(super) fn send_leftovers(&mut self, now_ms: u64) {
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

    /// A rename's delta goes to the old id's holders, which rename their
    /// copies; the new id's holders get the session now, as copies.
    pub(in crate::core) fn backup_renamed(&mut self, to: SessionId, now_ms: u64) {
        let Some(b) = self.backup.as_ref() else {
            return;
        };
        let me = self.me.name.as_str();
        let targets: Vec<String> = placement::holders(&b.view, &to, b.copies)
            .into_iter()
            .filter(|h| *h != me)
            .map(str::to_owned)
            .collect();
        for t in targets {
            self.send_copies(&t, vec![to.clone()], false, now_ms);
        }
    }

    /// A leaving member hands every session it holds to the members that
    /// hold it once it is gone; `flushed` waits for their acknowledgements.
    pub(in crate::core) fn backup_leave(&mut self, now_ms: u64) {
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
