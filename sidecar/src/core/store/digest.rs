//! Digests for anti-entropy: per-bucket sums of entry hashes, kept up to date
//! on every change instead of computed by walking the store, and a journal of
//! hash changes from which backup mode keeps its per-peer digests.

use super::{bucket_of, entry_hash, Store, BUCKETS};
use crate::core::identity::SessionId;

/// Most changes the journal keeps between two drains; past that it is
/// dropped and the reader rebuilds from the store (`take_journal` says so).
const MAX_JOURNAL: usize = 1 << 20;

impl Store {
    /// The hash of `id`'s entry now, 0 when there is none.
    pub(super) fn hash_now(&self, id: &SessionId) -> u64 {
        self.entries.get(id).map_or(0, |e| entry_hash(id, e))
    }

    /// Accounts for a change of `id`'s entry whose hash was `before`.
    pub(super) fn rehash(&mut self, id: &SessionId, before: u64) {
        let after = self.hash_now(id);
        if after == before {
            return;
        }
        let b = bucket_of(id);
        self.sums[b] = self.sums[b].wrapping_sub(before).wrapping_add(after);
        if let Some(j) = &mut self.journal {
            if j.len() < MAX_JOURNAL {
                j.push((id.clone(), before, after));
            } else {
                self.journal_lost = true;
            }
        }
    }

    /// Digest of every bucket: a wrapping sum of entry hashes (order-free).
    pub fn bucket_digest(&self) -> Vec<u64> {
        self.sums.clone()
    }

    /// The store, journaling hash changes for `take_journal` when `on`.
    pub fn journaled(mut self, on: bool) -> Self {
        self.journal = on.then(Vec::new);
        self.journal_lost = false;
        self
    }

    /// The hash changes since the last call, in order; `None` when some were
    /// dropped (too many between two calls), so the reader must rebuild from
    /// `hashes`.
    pub fn take_journal(&mut self) -> Option<Vec<super::Change>> {
        let taken = self
            .journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        if std::mem::take(&mut self.journal_lost) {
            return None;
        }
        Some(taken)
    }

    /// Every entry's id, bucket and hash: what a journal reader rebuilds from.
    pub fn hashes(&self) -> impl Iterator<Item = (&SessionId, usize, u64)> {
        self.entries
            .iter()
            .map(|(id, e)| (id, bucket_of(id), entry_hash(id, e)))
    }

    /// `bucket_digest` computed by walking the store: the reference the
    /// maintained sums are tested against.
    #[cfg(test)]
    pub fn scanned_digest(&self) -> Vec<u64> {
        let mut b = vec![0u64; BUCKETS];
        for (_, i, h) in self.hashes() {
            b[i] = b[i].wrapping_add(h);
        }
        b
    }

    /// (id, hash) of every entry in the given buckets whose id passes
    /// `keep`. A walk of the store, made only when digests differ.
    pub fn bucket_entries_where(
        &self,
        buckets: &[u16],
        max: usize,
        keep: impl Fn(&SessionId) -> bool,
    ) -> Vec<(SessionId, u64)> {
        let mut want = [false; BUCKETS];
        for b in buckets {
            if let Some(w) = want.get_mut(*b as usize) {
                *w = true;
            }
        }
        self.entries
            .iter()
            .filter(|(id, _)| want[bucket_of(id)] && keep(id))
            .take(max)
            .map(|(id, e)| (id.clone(), entry_hash(id, e)))
            .collect()
    }

    pub fn entry_hash_of(&self, id: &SessionId) -> Option<u64> {
        self.entries.get(id).map(|e| entry_hash(id, e))
    }
}
