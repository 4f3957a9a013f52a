//! Backup mode's anti-entropy digests. Two members compare only the sessions
//! both hold, so each member keeps, per peer, the per-bucket sums of those
//! sessions' hashes. The store journals every hash change; the sums follow
//! the journal, and are rebuilt by one walk of the store only when the view
//! changed (a rebalance walks the store then anyway) or the journal
//! overflowed. A digest so costs `BUCKETS` words, not a walk of the store.

use crate::core::identity::SessionId;
use crate::core::placement;
use crate::core::store::{bucket_of, BUCKETS};
use crate::core::Core;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub(in crate::core) struct PairDigests {
    /// Whether `sums` are valid for `view`.
    built: bool,
    /// The view the sums were built for.
    view: Vec<String>,
    /// Per peer, per bucket: the sum of the hashes of the sessions this
    /// member and that peer both hold.
    sums: BTreeMap<String, Vec<u64>>,
}

impl PairDigests {
    /// Adds `id`'s hash change to the sums of the peers that share it.
    fn add(&mut self, copies: usize, me: &str, id: &SessionId, before: u64, after: u64) {
        let holders = placement::holders(&self.view, id, copies);
        if !holders.contains(&me) {
            return;
        }
        let i = bucket_of(id);
        for h in holders.into_iter().filter(|h| *h != me) {
            let s = match self.sums.get_mut(h) {
                Some(s) => s,
                None => self
                    .sums
                    .entry(h.to_owned())
                    .or_insert_with(|| vec![0; BUCKETS]),
            };
            s[i] = s[i].wrapping_sub(before).wrapping_add(after);
        }
    }
}

impl Core {
    /// Brings the per-peer sums up to date from the store's journal. When
    /// they are stale (another view, a lost journal), drops them, and with
    /// `rebuild` builds them again from the store.
    pub(in crate::core) fn refresh_pair_digests(&mut self, rebuild: bool) {
        let journal = self.store.take_journal();
        let Some(b) = self.backup.as_mut() else {
            return;
        };
        let me = self.me.name.as_str();
        let p = &mut b.pairs;
        match journal {
            Some(changes) if p.built && p.view == b.view => {
                for (id, before, after) in changes {
                    p.add(b.copies, me, &id, before, after);
                }
                return;
            }
            _ => p.built = false,
        }
        if !rebuild {
            return;
        }
        p.view.clone_from(&b.view);
        p.sums.clear();
        for (id, _, h) in self.store.hashes() {
            p.add(b.copies, me, id, 0, h);
        }
        p.built = true;
    }

    /// The digest compared with `peer`: of the sessions both hold.
    pub(crate) fn pair_digest(&mut self, peer: &str) -> Vec<u64> {
        self.refresh_pair_digests(true);
        self.backup
            .as_ref()
            .and_then(|b| b.pairs.sums.get(peer).cloned())
            .unwrap_or_else(|| vec![0; BUCKETS])
    }

    /// `pair_digest` computed by walking the store: the reference the kept
    /// sums are tested against.
    #[cfg(test)]
    pub(crate) fn scanned_pair_digest(&self, peer: &str) -> Vec<u64> {
        let mut out = vec![0u64; BUCKETS];
        for (id, i, h) in self.store.hashes() {
            if self.holds(peer, id) && self.holds(&self.me.name, id) {
                out[i] = out[i].wrapping_add(h);
            }
        }
        out
    }
}
