//! The session store: sessions keyed by `SessionId`, per-attribute
//! last-writer-wins by HLC, invalidation tombstones, absolute-time expiry.
//!
//! It is a state-based CRDT: `apply` (a delta) and `merge` (a full state) are
//! commutative, associative and idempotent, so replicas converge whatever the
//! order in which deltas, transfer chunks and anti-entropy repairs arrive.
//! Invariants:
//! - an invalidated id stays a tombstone until garbage-collected; nothing
//!   written under it afterwards is accepted;
//! - a delta or state whose absolute expiry has passed never creates a session
//!   (a late replica cannot resurrect an expired session);
//! - `payload_bytes` is the sum of id, attribute name and value lengths of live sessions.

use crate::core::hlc::Hlc;
use crate::core::identity::{fnv1a, Fnv1a, SessionId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;

/// Store limits: checked on local writes, and on what peers send
/// (`check_remote_*`), so a peer's data obeys the same bounds as local data.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_attr_bytes: usize,
    pub max_session_bytes: usize,
    pub max_sessions: usize,
    pub max_attr_name: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_attr_bytes: 1 << 20,
            max_session_bytes: 1 << 20,
            max_sessions: 10_000_000,
            max_attr_name: 1024,
        }
    }
}

/// Why a local write was refused. In every case the store was not changed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// No live session with that id (never existed, expired, or was invalidated).
    #[error("session not found")]
    NotFound,
    /// The id was invalidated; it can never be used again.
    #[error("session was invalidated")]
    Invalidated,
    /// Create of an id that already exists.
    #[error("session already exists")]
    Exists,
    /// An attribute value is larger than `max_attr_bytes`.
    #[error("attribute of {size} bytes exceeds the limit of {max} bytes")]
    AttrTooLarge { size: usize, max: usize },
    /// The session would be larger than `max_session_bytes`.
    #[error("session of {size} bytes would exceed the limit of {max} bytes")]
    SessionTooLarge { size: usize, max: usize },
    /// The store already holds `max_sessions` sessions.
    #[error("the store is full ({max} sessions)")]
    Full { max: usize },
    /// An attribute name is empty or too long.
    #[error("attribute name must be 1..={max} bytes")]
    BadName { max: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    /// `None` marks a removed attribute (kept so an older set cannot revive it).
    pub value: Option<Bytes>,
    pub hlc: Hlc,
    /// Wall-clock ms when a removal was recorded, for garbage collection.
    pub removed_at_ms: u64,
}

/// A session's attributes: a sorted vector, not a tree. Sessions hold few
/// attributes, and a B-tree node reserves room for eleven, which would cost
/// more than a typical value. Deserialization sorts and de-duplicates (keeping
/// the newest), so a peer cannot break the ordering invariant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(String, Attr)>", into = "Vec<(String, Attr)>")]
pub struct AttrMap(Vec<(String, Attr)>);

impl From<Vec<(String, Attr)>> for AttrMap {
    fn from(mut v: Vec<(String, Attr)>) -> Self {
        v.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.hlc.cmp(&a.1.hlc)));
        v.dedup_by(|later, first| later.0 == first.0);
        v.shrink_to_fit();
        AttrMap(v)
    }
}

impl From<AttrMap> for Vec<(String, Attr)> {
    fn from(m: AttrMap) -> Self {
        m.0
    }
}

impl AttrMap {
    pub fn get(&self, name: &str) -> Option<&Attr> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .ok()
            .map(|i| &self.0[i].1)
    }
    pub fn insert(&mut self, name: String, a: Attr) {
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(&name)) {
            Ok(i) => self.0[i].1 = a,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (name, a));
            }
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Attr)> {
        self.0.iter().map(|(k, a)| (k, a))
    }
    pub fn values(&self) -> impl Iterator<Item = &Attr> {
        self.0.iter().map(|(_, a)| a)
    }
    pub fn retain(&mut self, mut f: impl FnMut(&String, &Attr) -> bool) {
        self.0.retain(|(k, a)| f(k, a));
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl IntoIterator for AttrMap {
    type Item = (String, Attr);
    type IntoIter = std::vec::IntoIter<(String, Attr)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub created_ms: u64,
    pub last_accessed_ms: u64,
    /// 0 means the session never expires.
    pub max_inactive_ms: u64,
    pub meta_hlc: Hlc,
    pub attrs: AttrMap,
    /// The newest delete this key has seen: nothing written at or before it counts.
    pub cleared: Hlc,
}

impl Session {
    /// What a reader of the session sees, as a fingerprint (the HTTP API's
    /// `ETag`): the live attributes by their write stamps, the timeout and the
    /// last clear. Not the access time, so a touch keeps it; any write of an
    /// attribute, here or replicated from a peer, changes it.
    pub fn etag(&self) -> u64 {
        let mut h = Fnv1a::new();
        h.write(&self.max_inactive_ms.to_le_bytes());
        write_hlc(&mut h, &self.cleared);
        for (k, a) in self.attrs.iter().filter(|(_, a)| a.value.is_some()) {
            h.write(&(k.len() as u64).to_le_bytes());
            h.write(k.as_bytes());
            write_hlc(&mut h, &a.hlc);
        }
        h.finish()
    }

    pub fn expires_at_ms(&self) -> Option<u64> {
        (self.max_inactive_ms > 0)
            .then(|| self.last_accessed_ms.saturating_add(self.max_inactive_ms))
    }
    pub fn payload_bytes(&self) -> usize {
        self.attrs
            .iter()
            .map(|(k, a)| k.len() + a.value.as_ref().map_or(0, |v| v.len()))
            .sum()
    }
    pub fn live_attrs(&self) -> impl Iterator<Item = (&String, &Bytes)> {
        self.attrs
            .iter()
            .filter_map(|(k, a)| a.value.as_ref().map(|v| (k, v)))
    }
    fn version(&self) -> Hlc {
        self.attrs
            .values()
            .map(|a| a.hlc)
            .max()
            .unwrap_or_default()
            .max(self.meta_hlc)
    }
    /// Drops what a delete at `self.cleared` removed; false when nothing is left.
    fn apply_cleared(&mut self) -> bool {
        let c = self.cleared;
        self.attrs.retain(|_, a| a.hlc > c);
        !self.attrs.is_empty() || self.meta_hlc > c
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    Live(Session),
    /// `reusable: false` is an invalidation (final); `true` is a delete (Redis
    /// `DEL`): a later write re-creates the key, an older one cannot revive it.
    Tombstone {
        hlc: Hlc,
        at_ms: u64,
        reusable: bool,
    },
}

/// A whole entry as it travels in transfer chunks and anti-entropy repairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub id: SessionId,
    pub entry: Entry,
}

/// One change to one session. The header makes every delta self-sufficient:
/// a delta for an unknown session creates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub id: SessionId,
    pub hlc: Hlc,
    pub created_ms: u64,
    pub last_accessed_ms: u64,
    pub max_inactive_ms: u64,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Create,
    Set {
        name: String,
        value: Bytes,
    },
    Remove {
        name: String,
    },
    /// The header's `last_accessed_ms` is the new access time.
    Touch,
    /// Marks a change of the interval. Every delta's header carries the
    /// interval as of its write, applied last-writer-wins by HLC.
    MaxInactive,
    Invalidate,
    Rename {
        to: SessionId,
    },
    /// Delete the key; unlike `Invalidate`, a later write may create it again.
    Delete,
}

impl Delta {
    /// Approximate encoded size, for queue accounting.
    pub fn size_hint(&self) -> usize {
        64 + self.id.as_str().len()
            + self
                .ops
                .iter()
                .map(|op| match op {
                    Op::Set { name, value } => 8 + name.len() + value.len(),
                    Op::Remove { name } => 4 + name.len(),
                    Op::Rename { to } => 4 + to.as_str().len(),
                    _ => 2,
                })
                .sum::<usize>()
    }
}

/// What applying a delta did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Changed,
    /// Ignored: tombstoned id, already expired, or older than what is stored.
    Ignored,
}

#[derive(Debug)]
pub struct Store {
    entries: BTreeMap<SessionId, Entry>,
    live: usize,
    payload: usize,
    pub limits: Limits,
    /// Per bucket, the wrapping sum of its entries' hashes, kept up to date on
    /// every change, so a digest costs `BUCKETS` additions, not a store walk.
    sums: Vec<u64>,
    /// When on (backup mode), every change of an entry's hash, for the
    /// caller's own digests: `(id, hash before, hash after)`, 0 for absent.
    journal: Option<Vec<Change>>,
    journal_lost: bool,
}

/// One change of an entry's hash (0 for absent): see `Store::take_journal`.
pub type Change = (SessionId, u64, u64);

impl Default for Store {
    fn default() -> Self {
        Store {
            entries: BTreeMap::new(),
            live: 0,
            payload: 0,
            limits: Limits::default(),
            sums: vec![0; BUCKETS],
            journal: None,
            journal_lost: false,
        }
    }
}

mod apply;
mod checks;
mod digest;
mod expiry;
pub use expiry::Swept;

pub const BUCKETS: usize = 256;

impl Store {
    pub fn new(limits: Limits) -> Self {
        Store {
            limits,
            ..Default::default()
        }
    }

    pub fn live_count(&self) -> usize {
        self.live
    }
    /// Per Redis database: live keys, and those with an expiry (for INFO's
    /// keyspace section). A walk of the whole store, for occasional use only.
    pub fn keyspace(&self, now_ms: u64) -> BTreeMap<u8, (u64, u64)> {
        let mut out = BTreeMap::new();
        for (id, e) in &self.entries {
            if let Entry::Live(s) = e {
                if !expired(s, now_ms, 0) {
                    let c = out.entry(id.db_key().0).or_insert((0, 0));
                    c.0 += 1;
                    c.1 += u64::from(s.max_inactive_ms > 0);
                }
            }
        }
        out
    }

    /// Live keys of Redis database `db` (DBSIZE). Database 0 is every
    /// session but those of the other databases, which are contiguous.
    pub fn count_db(&self, db: u8, now_ms: u64) -> usize {
        if db > 0 {
            return self
                .range_after(Some(&SessionId::db_start(db)))
                .take_while(|(id, _)| id.db_key().0 == db)
                .filter(|(_, e)| matches!(e, Entry::Live(s) if !expired(s, now_ms, 0)))
                .count();
        }
        let others = self
            .entries
            .range::<SessionId, _>(..SessionId::db_start(0))
            .filter(|(_, e)| matches!(e, Entry::Live(_)))
            .count();
        self.live.saturating_sub(others)
    }
    pub fn tombstone_count(&self) -> usize {
        self.entries.len() - self.live
    }
    pub fn payload_bytes(&self) -> usize {
        self.payload
    }

    /// A live, unexpired session. Expiry is judged with `grace_ms` of slack,
    /// because replicas see coalesced touches late.
    pub fn get(&self, id: &SessionId, now_ms: u64, grace_ms: u64) -> Result<&Session, StoreError> {
        match self.entries.get(id) {
            Some(Entry::Live(s)) if !expired(s, now_ms, grace_ms) => Ok(s),
            Some(Entry::Tombstone {
                reusable: false, ..
            }) => Err(StoreError::Invalidated),
            _ => Err(StoreError::NotFound),
        }
    }

    /// Drops an expired session so its id can be created afresh.
    pub fn remove_if_expired(&mut self, id: &SessionId, now_ms: u64, grace_ms: u64) {
        if matches!(self.entries.get(id), Some(Entry::Live(s)) if expired(s, now_ms, grace_ms)) {
            self.forget(id);
        }
    }

    /// Live session ids after `cursor`, in order.
    pub fn list(
        &self,
        cursor: Option<&SessionId>,
        limit: usize,
        now_ms: u64,
        grace_ms: u64,
    ) -> Vec<SessionId> {
        self.range_after(cursor)
            .filter(|(_, e)| matches!(e, Entry::Live(s) if !expired(s, now_ms, grace_ms)))
            .take(limit)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn range_after(
        &self,
        cursor: Option<&SessionId>,
    ) -> std::collections::btree_map::Range<'_, SessionId, Entry> {
        match cursor {
            Some(c) => self
                .entries
                .range((Bound::Excluded(c.clone()), Bound::Unbounded)),
            None => self.entries.range::<SessionId, _>(..),
        }
    }

    /// Up to `max_bytes` of entries after `cursor`, and the cursor to continue
    /// from (`None` when this chunk reaches the end).
    pub fn chunk_after(
        &self,
        cursor: Option<&SessionId>,
        max_bytes: usize,
    ) -> (Vec<SessionState>, Option<SessionId>) {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut iter = self.range_after(cursor).peekable();
        while let Some((id, e)) = iter.next() {
            bytes += 64
                + id.as_str().len()
                + match e {
                    Entry::Live(s) => s.payload_bytes() + s.attrs.len() * 24,
                    Entry::Tombstone { .. } => 0,
                };
            out.push(SessionState {
                id: id.clone(),
                entry: e.clone(),
            });
            if bytes >= max_bytes {
                return (out, iter.peek().map(|_| id.clone()));
            }
        }
        (out, None)
    }

    /// Whether any entry (live, expired or a tombstone) exists for `id`.
    pub fn has(&self, id: &SessionId) -> bool {
        self.entries.contains_key(id)
    }

    /// Every id with an entry, in order.
    pub fn ids(&self) -> Vec<SessionId> {
        self.entries.keys().cloned().collect()
    }

    /// Removes an entry without leaving a tombstone: this member no longer
    /// holds a copy (backup mode). Returns whether there was one.
    pub fn forget(&mut self, id: &SessionId) -> bool {
        let before = self.hash_now(id);
        let found = match self.entries.remove(id) {
            Some(Entry::Live(s)) => {
                self.remove_live_accounting(id, &s);
                true
            }
            Some(Entry::Tombstone { .. }) => true,
            None => false,
        };
        self.rehash(id, before);
        found
    }

    pub fn state(&self, id: &SessionId) -> Option<SessionState> {
        self.entries.get(id).map(|e| SessionState {
            id: id.clone(),
            entry: e.clone(),
        })
    }

    /// Hash of the whole store's replicated content (tests use it to check convergence).
    pub fn fingerprint(&self) -> u64 {
        self.entries
            .iter()
            .fold(0u64, |acc, (id, e)| acc.wrapping_add(entry_hash(id, e)))
    }

    pub fn version_of(&self, id: &SessionId) -> Option<Hlc> {
        match self.entries.get(id) {
            Some(Entry::Live(s)) => Some(s.version()),
            Some(Entry::Tombstone { hlc, .. }) => Some(*hlc),
            None => None,
        }
    }
}

pub fn expired(s: &Session, now_ms: u64, grace_ms: u64) -> bool {
    s.expires_at_ms()
        .is_some_and(|t| t.saturating_add(grace_ms) <= now_ms)
}

pub fn bucket_of(id: &SessionId) -> usize {
    (fnv1a(id.as_str().as_bytes()) % BUCKETS as u64) as usize
}

/// Stable hash of an entry's replicated content. Access time is left out: touches
/// are coalesced and may legitimately differ for a moment.
fn entry_hash(id: &SessionId, e: &Entry) -> u64 {
    match e {
        Entry::Tombstone { hlc, reusable, .. } => {
            let mut h = Fnv1a::new();
            h.write(id.as_str().as_bytes());
            h.write(&[if *reusable { 0xfe } else { 0xff }]);
            write_hlc(&mut h, hlc);
            h.finish()
        }
        Entry::Live(s) => session_hash(id, s),
    }
}

/// `entry_hash` of a live session.
fn session_hash(id: &SessionId, s: &Session) -> u64 {
    let mut h = Fnv1a::new();
    h.write(id.as_str().as_bytes());
    h.write(&[1]);
    h.write(&s.max_inactive_ms.to_le_bytes());
    write_hlc(&mut h, &s.meta_hlc);
    write_hlc(&mut h, &s.cleared);
    for (k, a) in s.attrs.iter() {
        h.write(k.as_bytes());
        h.write(&[a.value.is_some() as u8]);
        write_hlc(&mut h, &a.hlc);
    }
    h.finish()
}

fn write_hlc(h: &mut Fnv1a, t: &Hlc) {
    h.write(&t.wall_ms.to_le_bytes());
    h.write(&t.logical.to_le_bytes());
    h.write(&t.node.to_le_bytes());
}

#[cfg(test)]
mod digest_tests;
#[cfg(test)]
mod tests;
