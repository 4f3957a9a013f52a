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
use crate::core::identity::{fnv1a, SessionId};
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
        self.attrs.len() > 0 || self.meta_hlc > c
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

#[derive(Debug, Default)]
pub struct Store {
    entries: BTreeMap<SessionId, Entry>,
    live: usize,
    payload: usize,
    pub limits: Limits,
}

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
        if let Some(Entry::Live(s)) = self.entries.get(id) {
            if expired(s, now_ms, grace_ms) {
                if let Some(Entry::Live(s)) = self.entries.remove(id) {
                    self.remove_live_accounting(id, &s);
                }
            }
        }
    }

    /// Checks a local delta against the limits and the current state before it
    /// is stamped and applied. Nothing is changed.
    pub fn check_local(&self, d: &Delta, now_ms: u64, grace_ms: u64) -> Result<(), StoreError> {
        let creating = d.ops.iter().any(|o| matches!(o, Op::Create));
        let current = match self.entries.get(&d.id) {
            Some(Entry::Tombstone {
                reusable: false, ..
            }) => return Err(StoreError::Invalidated),
            Some(Entry::Live(s)) if !expired(s, now_ms, grace_ms) => {
                if creating {
                    return Err(StoreError::Exists);
                }
                Some(s)
            }
            _ if creating => {
                if self.live >= self.limits.max_sessions {
                    return Err(StoreError::Full {
                        max: self.limits.max_sessions,
                    });
                }
                None
            }
            _ => return Err(StoreError::NotFound),
        };
        let mut size: i64 = current.map_or(0, |s| s.payload_bytes()) as i64;
        for op in &d.ops {
            match op {
                Op::Set { name, value } => {
                    if name.is_empty() || name.len() > self.limits.max_attr_name {
                        return Err(StoreError::BadName {
                            max: self.limits.max_attr_name,
                        });
                    }
                    if value.len() > self.limits.max_attr_bytes {
                        return Err(StoreError::AttrTooLarge {
                            size: value.len(),
                            max: self.limits.max_attr_bytes,
                        });
                    }
                    // A removed attribute's marker already counts its name.
                    size += match current.and_then(|s| s.attrs.get(name)) {
                        None => (name.len() + value.len()) as i64,
                        Some(a) => {
                            value.len() as i64 - a.value.as_ref().map_or(0, |v| v.len()) as i64
                        }
                    };
                }
                Op::Remove { name } => {
                    if name.is_empty() || name.len() > self.limits.max_attr_name {
                        return Err(StoreError::BadName {
                            max: self.limits.max_attr_name,
                        });
                    }
                    // A removal leaves a marker holding the name until the
                    // tombstone TTL: markers count toward the session's size, or
                    // removals of many names would grow it past the limit.
                    size += match current.and_then(|s| s.attrs.get(name)) {
                        None => name.len() as i64,
                        Some(a) => -(a.value.as_ref().map_or(0, |v| v.len()) as i64),
                    };
                }
                Op::Rename { to } => {
                    if matches!(self.entries.get(to), Some(Entry::Live(s)) if !expired(s, now_ms, grace_ms))
                        || matches!(
                            self.entries.get(to),
                            Some(Entry::Tombstone {
                                reusable: false,
                                ..
                            })
                        )
                    {
                        return Err(StoreError::Exists);
                    }
                }
                _ => {}
            }
        }
        if size > self.limits.max_session_bytes as i64 {
            return Err(StoreError::SessionTooLarge {
                size: size as usize,
                max: self.limits.max_session_bytes,
            });
        }
        Ok(())
    }

    /// Checks a peer's delta against the limits before it is applied: the same
    /// attribute name and size bounds as a local write, the whole delta within
    /// a session's bound, and the session cap for a delta that would create a
    /// session. Nothing is changed. (The session's size after a merge of
    /// concurrent writes can exceed the bound; the next local write reports it.)
    pub fn check_remote_delta(&self, d: &Delta) -> Result<(), StoreError> {
        let mut size = 0usize;
        for op in &d.ops {
            match op {
                Op::Set { name, value } => {
                    self.check_attr(name, value.len())?;
                    size = size.saturating_add(name.len() + value.len());
                }
                Op::Remove { name }
                    if name.is_empty() || name.len() > self.limits.max_attr_name =>
                {
                    return Err(StoreError::BadName {
                        max: self.limits.max_attr_name,
                    });
                }
                _ => {}
            }
        }
        if size > self.limits.max_session_bytes {
            return Err(StoreError::SessionTooLarge {
                size,
                max: self.limits.max_session_bytes,
            });
        }
        let creates = !d.ops.contains(&Op::Invalidate)
            && !d.ops.contains(&Op::Delete)
            && !self.entries.contains_key(&d.id);
        if creates && self.live >= self.limits.max_sessions {
            return Err(StoreError::Full {
                max: self.limits.max_sessions,
            });
        }
        Ok(())
    }

    /// Checks a peer's whole entry (transfer chunk, anti-entropy repair)
    /// against the limits, as `check_remote_delta` does. Nothing is changed.
    pub fn check_remote_state(&self, st: &SessionState) -> Result<(), StoreError> {
        let Entry::Live(s) = &st.entry else {
            return Ok(());
        };
        for (name, a) in s.attrs.iter() {
            self.check_attr(name, a.value.as_ref().map_or(0, |v| v.len()))?;
        }
        let size = s.payload_bytes();
        if size > self.limits.max_session_bytes {
            return Err(StoreError::SessionTooLarge {
                size,
                max: self.limits.max_session_bytes,
            });
        }
        if self.live >= self.limits.max_sessions
            && !matches!(self.entries.get(&st.id), Some(Entry::Live(_)))
        {
            return Err(StoreError::Full {
                max: self.limits.max_sessions,
            });
        }
        Ok(())
    }

    fn check_attr(&self, name: &str, len: usize) -> Result<(), StoreError> {
        if name.is_empty() || name.len() > self.limits.max_attr_name {
            return Err(StoreError::BadName {
                max: self.limits.max_attr_name,
            });
        }
        if len > self.limits.max_attr_bytes {
            return Err(StoreError::AttrTooLarge {
                size: len,
                max: self.limits.max_attr_bytes,
            });
        }
        Ok(())
    }

    /// Applies a delta, local or remote.
    pub fn apply(&mut self, d: &Delta, now_ms: u64) -> Applied {
        // An invalidation ends the id whatever else happened, in any order.
        if d.ops.contains(&Op::Invalidate) {
            let before = self.entries.get(&d.id).cloned();
            self.tombstone(&d.id, d.hlc, now_ms, false);
            return if before.as_ref() == self.entries.get(&d.id) {
                Applied::Ignored
            } else {
                Applied::Changed
            };
        }
        let mut changed = false;
        let cleared = match self.entries.get(&d.id) {
            Some(Entry::Tombstone {
                reusable: false, ..
            }) => return Applied::Ignored,
            Some(Entry::Tombstone {
                hlc,
                reusable: true,
                ..
            }) if d.hlc <= *hlc => return Applied::Ignored,
            Some(Entry::Tombstone { hlc, .. }) => Some(*hlc),
            Some(Entry::Live(s)) if d.hlc <= s.cleared => return Applied::Ignored,
            Some(Entry::Live(_)) => None,
            None => Some(Hlc::default()),
        };
        if let Some(cleared) = cleared {
            let fresh = Session {
                created_ms: d.created_ms,
                last_accessed_ms: d.last_accessed_ms,
                max_inactive_ms: d.max_inactive_ms,
                meta_hlc: Hlc::default(),
                attrs: AttrMap::default(),
                cleared,
            };
            if expired(&fresh, now_ms, 0) {
                return Applied::Ignored;
            }
            self.insert_live(d.id.clone(), fresh);
            changed = true;
        }
        enum After<'a> {
            Nothing,
            Tombstone,
            Rename(&'a SessionId),
        }
        let mut after_ops = After::Nothing;
        let Some(Entry::Live(s)) = self.entries.get_mut(&d.id) else {
            return Applied::Ignored;
        };
        let before = s.payload_bytes();
        // Every delta states the session's max-inactive interval as of its write:
        // a last-writer-wins register, so replicas agree whatever the order.
        if d.hlc > s.meta_hlc {
            s.meta_hlc = d.hlc;
            if s.max_inactive_ms != d.max_inactive_ms {
                s.max_inactive_ms = d.max_inactive_ms;
                changed = true;
            }
        }
        for op in &d.ops {
            match op {
                Op::Create | Op::Touch => {}
                // Applied with the header above; kept so a delta says what it meant.
                Op::MaxInactive => {}
                Op::Set { name, value } => {
                    if s.attrs.get(name).is_none_or(|a| a.hlc < d.hlc) {
                        s.attrs.insert(
                            name.clone(),
                            Attr {
                                value: Some(value.clone()),
                                hlc: d.hlc,
                                removed_at_ms: 0,
                            },
                        );
                        changed = true;
                    }
                }
                Op::Remove { name } => {
                    if s.attrs.get(name).is_none_or(|a| a.hlc < d.hlc) {
                        s.attrs.insert(
                            name.clone(),
                            Attr {
                                value: None,
                                hlc: d.hlc,
                                removed_at_ms: now_ms,
                            },
                        );
                        changed = true;
                    }
                }
                Op::Delete => {
                    s.cleared = s.cleared.max(d.hlc);
                    changed = true;
                    if !s.apply_cleared() {
                        after_ops = After::Tombstone;
                        break;
                    }
                }
                Op::Invalidate => {}
                Op::Rename { to } => {
                    after_ops = After::Rename(to);
                    break;
                }
            }
        }
        if d.last_accessed_ms > s.last_accessed_ms {
            s.last_accessed_ms = d.last_accessed_ms;
            changed = true;
        }
        s.created_ms = s.created_ms.min(d.created_ms);
        let after = s.payload_bytes();
        self.payload = self.payload + after - before;
        match after_ops {
            After::Nothing => {}
            After::Tombstone => {
                self.tombstone(&d.id, d.hlc, now_ms, true);
                return Applied::Changed;
            }
            After::Rename(to) => {
                self.rename(&d.id, to, d.hlc, now_ms);
                return Applied::Changed;
            }
        }
        if changed {
            Applied::Changed
        } else {
            Applied::Ignored
        }
    }

    fn insert_live(&mut self, id: SessionId, s: Session) {
        self.payload += id.as_str().len() + s.payload_bytes();
        self.live += 1;
        self.entries.insert(id, Entry::Live(s));
    }

    fn remove_live_accounting(&mut self, id: &SessionId, s: &Session) {
        self.payload -= id.as_str().len() + s.payload_bytes();
        self.live -= 1;
    }

    /// Makes `id` a tombstone. A final one (invalidation) wins over a reusable
    /// one (delete); otherwise the newer wins.
    fn tombstone(&mut self, id: &SessionId, hlc: Hlc, now_ms: u64, reusable: bool) {
        let new = Entry::Tombstone {
            hlc,
            at_ms: now_ms,
            reusable,
        };
        match self.entries.insert(id.clone(), new) {
            Some(Entry::Live(s)) => self.remove_live_accounting(id, &s),
            Some(Entry::Tombstone {
                hlc: old,
                at_ms,
                reusable: old_reusable,
            }) => {
                let keep_old = match (old_reusable, reusable) {
                    (false, true) => true,
                    (true, false) => false,
                    _ => old > hlc,
                };
                if keep_old {
                    self.entries.insert(
                        id.clone(),
                        Entry::Tombstone {
                            hlc: old,
                            at_ms,
                            reusable: old_reusable,
                        },
                    );
                } else if !reusable && !old_reusable {
                    self.entries.insert(
                        id.clone(),
                        Entry::Tombstone {
                            hlc: hlc.max(old),
                            at_ms,
                            reusable: false,
                        },
                    );
                }
            }
            None => {}
        }
    }

    fn rename(&mut self, from: &SessionId, to: &SessionId, hlc: Hlc, now_ms: u64) {
        let moved = match self.entries.get(from) {
            Some(Entry::Live(s)) => Some(s.clone()),
            _ => None,
        };
        self.tombstone(from, hlc, now_ms, false);
        if let Some(s) = moved {
            self.merge(
                SessionState {
                    id: to.clone(),
                    entry: Entry::Live(s),
                },
                now_ms,
            );
        }
    }

    /// Joins a full state into the store (transfer, anti-entropy).
    pub fn merge(&mut self, st: SessionState, now_ms: u64) -> Applied {
        let SessionState { id, entry } = st;
        match (self.entries.get_mut(&id), entry) {
            (
                Some(Entry::Tombstone { hlc, reusable, .. }),
                Entry::Tombstone {
                    hlc: other,
                    reusable: other_reusable,
                    ..
                },
            ) => {
                let before = (*hlc, *reusable);
                if *reusable == other_reusable {
                    *hlc = (*hlc).max(other);
                } else if *reusable {
                    // A final tombstone wins over a delete.
                    *hlc = other;
                    *reusable = false;
                }
                if before != (*hlc, *reusable) {
                    Applied::Changed
                } else {
                    Applied::Ignored
                }
            }
            (
                Some(Entry::Tombstone {
                    reusable: false, ..
                }),
                Entry::Live(_),
            ) => Applied::Ignored,
            (
                Some(Entry::Tombstone {
                    hlc,
                    reusable: true,
                    ..
                }),
                Entry::Live(mut s),
            ) => {
                s.cleared = s.cleared.max(*hlc);
                if !s.apply_cleared() || expired(&s, now_ms, 0) {
                    return Applied::Ignored;
                }
                self.entries.remove(&id);
                self.insert_live(id, s);
                Applied::Changed
            }
            (
                Some(Entry::Live(mine)),
                Entry::Tombstone {
                    hlc,
                    reusable: true,
                    ..
                },
            ) => {
                if hlc <= mine.cleared {
                    return Applied::Ignored;
                }
                let before = mine.payload_bytes();
                mine.cleared = hlc;
                if !mine.apply_cleared() {
                    self.tombstone(&id, hlc, now_ms, true);
                    return Applied::Changed;
                }
                let after = mine.payload_bytes();
                self.payload = self.payload + after - before;
                Applied::Changed
            }
            (_, Entry::Tombstone { hlc, reusable, .. }) => {
                self.tombstone(&id, hlc, now_ms, reusable);
                Applied::Changed
            }
            (None, Entry::Live(mut s)) => {
                if expired(&s, now_ms, 0) || !s.apply_cleared() {
                    return Applied::Ignored;
                }
                self.insert_live(id, s);
                Applied::Changed
            }
            (Some(Entry::Live(mine)), Entry::Live(theirs)) => {
                let before = mine.payload_bytes();
                let mut changed = false;
                if theirs.cleared > mine.cleared {
                    mine.cleared = theirs.cleared;
                    changed = true;
                }
                let cleared = mine.cleared;
                for (name, a) in theirs.attrs {
                    if a.hlc <= cleared {
                        continue;
                    }
                    match mine.attrs.get(&name) {
                        Some(cur) if cur.hlc >= a.hlc => {}
                        _ => {
                            mine.attrs.insert(name, a);
                            changed = true;
                        }
                    }
                }
                if theirs.meta_hlc > mine.meta_hlc {
                    mine.meta_hlc = theirs.meta_hlc;
                    mine.max_inactive_ms = theirs.max_inactive_ms;
                    changed = true;
                }
                if theirs.last_accessed_ms > mine.last_accessed_ms {
                    mine.last_accessed_ms = theirs.last_accessed_ms;
                    changed = true;
                }
                mine.created_ms = mine.created_ms.min(theirs.created_ms);
                if !mine.apply_cleared() {
                    self.tombstone(&id, cleared, now_ms, true);
                    return Applied::Changed;
                }
                let after = mine.payload_bytes();
                self.payload = self.payload + after - before;
                if changed {
                    Applied::Changed
                } else {
                    Applied::Ignored
                }
            }
        }
    }

    /// Removes every entry carrying a timestamp past `limit_wall_ms`. Such an
    /// entry can only come from a clock that was wrong when it was written, and
    /// would win every merge against the writes made since. Returns how many.
    pub fn drop_beyond(&mut self, limit_wall_ms: u64) -> usize {
        let beyond: Vec<SessionId> = self
            .entries
            .iter()
            .filter(|(_, e)| match e {
                Entry::Live(s) => {
                    s.version().wall_ms > limit_wall_ms || s.cleared.wall_ms > limit_wall_ms
                }
                Entry::Tombstone { hlc, .. } => hlc.wall_ms > limit_wall_ms,
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &beyond {
            if let Some(Entry::Live(s)) = self.entries.remove(id) {
                self.remove_live_accounting(id, &s);
            }
        }
        beyond.len()
    }

    /// Removes expired sessions, and tombstones and removed-attribute markers
    /// older than `tombstone_ttl_ms`. Returns how many sessions expired.
    pub fn sweep(&mut self, now_ms: u64, grace_ms: u64, tombstone_ttl_ms: u64) -> usize {
        let mut expired_ids = Vec::new();
        let mut dead_tombs = Vec::new();
        for (id, e) in self.entries.iter_mut() {
            match e {
                Entry::Live(s) => {
                    if expired(s, now_ms, grace_ms) {
                        expired_ids.push(id.clone());
                    } else {
                        s.attrs.retain(|_, a| {
                            a.value.is_some()
                                || a.removed_at_ms.saturating_add(tombstone_ttl_ms) > now_ms
                        });
                    }
                }
                Entry::Tombstone { at_ms, .. } => {
                    if at_ms.saturating_add(tombstone_ttl_ms) <= now_ms {
                        dead_tombs.push(id.clone());
                    }
                }
            }
        }
        for id in &expired_ids {
            if let Some(Entry::Live(s)) = self.entries.remove(id) {
                self.remove_live_accounting(id, &s);
            }
        }
        for id in dead_tombs {
            self.entries.remove(&id);
        }
        expired_ids.len()
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

    pub fn state(&self, id: &SessionId) -> Option<SessionState> {
        self.entries.get(id).map(|e| SessionState {
            id: id.clone(),
            entry: e.clone(),
        })
    }

    /// Digest of every bucket: a wrapping sum of entry hashes (order-free).
    pub fn bucket_digest(&self) -> Vec<u64> {
        let mut b = vec![0u64; BUCKETS];
        for (id, e) in &self.entries {
            b[bucket_of(id)] = b[bucket_of(id)].wrapping_add(entry_hash(id, e));
        }
        b
    }

    /// (id, hash) of every entry in the given buckets.
    pub fn bucket_entries(&self, buckets: &[u16], max: usize) -> Vec<(SessionId, u64)> {
        let mut want = [false; BUCKETS];
        for b in buckets {
            if let Some(w) = want.get_mut(*b as usize) {
                *w = true;
            }
        }
        self.entries
            .iter()
            .filter(|(id, _)| want[bucket_of(id)])
            .take(max)
            .map(|(id, e)| (id.clone(), entry_hash(id, e)))
            .collect()
    }

    pub fn entry_hash_of(&self, id: &SessionId) -> Option<u64> {
        self.entries.get(id).map(|e| entry_hash(id, e))
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
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(id.as_str().as_bytes());
    match e {
        Entry::Tombstone { hlc, reusable, .. } => {
            buf.push(if *reusable { 0xfe } else { 0xff });
            push_hlc(&mut buf, hlc);
        }
        Entry::Live(s) => {
            buf.push(1);
            buf.extend_from_slice(&s.max_inactive_ms.to_le_bytes());
            push_hlc(&mut buf, &s.meta_hlc);
            push_hlc(&mut buf, &s.cleared);
            for (k, a) in s.attrs.iter() {
                buf.extend_from_slice(k.as_bytes());
                buf.push(a.value.is_some() as u8);
                push_hlc(&mut buf, &a.hlc);
            }
        }
    }
    fnv1a(&buf)
}

fn push_hlc(buf: &mut Vec<u8>, h: &Hlc) {
    buf.extend_from_slice(&h.wall_ms.to_le_bytes());
    buf.extend_from_slice(&h.logical.to_le_bytes());
    buf.extend_from_slice(&h.node.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }
    fn h(w: u64, n: u32) -> Hlc {
        Hlc {
            wall_ms: w,
            logical: 0,
            node: n,
        }
    }
    fn delta(i: &str, hlc: Hlc, ops: Vec<Op>) -> Delta {
        Delta {
            id: id(i),
            hlc,
            created_ms: 1000,
            last_accessed_ms: hlc.wall_ms,
            max_inactive_ms: 60_000,
            ops,
        }
    }
    fn set(n: &str, v: &str) -> Op {
        Op::Set {
            name: n.into(),
            value: Bytes::from(v.to_owned()),
        }
    }
    fn val(st: &Store, i: &str, n: &str) -> Option<Bytes> {
        st.get(&id(i), 2000, 0)
            .ok()
            .and_then(|s| s.attrs.get(n))
            .and_then(|a| a.value.clone())
    }

    #[test]
    fn removal_markers_count_toward_the_session_size() {
        let limits = Limits {
            max_attr_bytes: 1024,
            max_session_bytes: 4096,
            max_sessions: 10,
            max_attr_name: 128,
        };
        let mut st = Store::new(limits);
        st.apply(
            &delta("s", h(1_000, 0), vec![Op::Create, set("keep", "v")]),
            1_000,
        );
        let removes: Vec<Op> = (0..100)
            .map(|i| Op::Remove {
                name: format!("{i:0>100}"),
            })
            .collect();
        let d = delta("s", h(1_001, 0), removes);
        assert!(matches!(
            st.check_local(&d, 1_000, 0),
            Err(StoreError::SessionTooLarge { .. })
        ));
        // Removing what is there is fine, and writing it again costs only the value.
        let d = delta(
            "s",
            h(1_002, 0),
            vec![Op::Remove {
                name: "keep".into(),
            }],
        );
        assert_eq!(st.check_local(&d, 1_000, 0), Ok(()));
        st.apply(&d, 1_000);
        let big = Op::Set {
            name: "keep".into(),
            value: Bytes::from(vec![b'x'; 1024]),
        };
        assert_eq!(
            st.check_local(&delta("s", h(1_003, 0), vec![big]), 1_000, 0),
            Ok(())
        );
    }

    #[test]
    fn a_peers_data_is_held_to_the_local_limits() {
        let limits = Limits {
            max_attr_bytes: 1024,
            max_session_bytes: 4096,
            max_sessions: 2,
            max_attr_name: 16,
        };
        let mut st = Store::new(limits);
        let big = Op::Set {
            name: "a".into(),
            value: Bytes::from(vec![b'x'; 2048]),
        };
        assert_eq!(
            st.check_remote_delta(&delta("s1", h(1, 0), vec![big])),
            Err(StoreError::AttrTooLarge {
                size: 2048,
                max: 1024
            })
        );
        let long = Op::Set {
            name: "n".repeat(17),
            value: Bytes::from_static(b"v"),
        };
        assert_eq!(
            st.check_remote_delta(&delta("s1", h(1, 0), vec![long])),
            Err(StoreError::BadName { max: 16 })
        );
        let many: Vec<Op> = (0..5)
            .map(|i| Op::Set {
                name: format!("a{i}"),
                value: Bytes::from(vec![b'x'; 1000]),
            })
            .collect();
        assert!(matches!(
            st.check_remote_delta(&delta("s1", h(1, 0), many)),
            Err(StoreError::SessionTooLarge { .. })
        ));
        for i in ["s1", "s2"] {
            let d = delta(i, h(1, 0), vec![Op::Create, set("a", "1")]);
            assert_eq!(st.check_remote_delta(&d), Ok(()));
            st.apply(&d, 1_000);
        }
        // Full: no new session from a peer, but existing ones take changes.
        assert_eq!(
            st.check_remote_delta(&delta("s3", h(2, 0), vec![set("a", "1")])),
            Err(StoreError::Full { max: 2 })
        );
        assert_eq!(
            st.check_remote_delta(&delta("s1", h(2, 0), vec![set("a", "2")])),
            Ok(())
        );
        let state = SessionState {
            id: id("s3"),
            entry: st
                .state(&id("s1"))
                .map(|s| s.entry)
                .unwrap_or(Entry::Tombstone {
                    hlc: h(0, 0),
                    at_ms: 0,
                    reusable: true,
                }),
        };
        assert_eq!(
            st.check_remote_state(&state),
            Err(StoreError::Full { max: 2 })
        );
    }

    #[test]
    fn an_id_no_local_client_could_write_does_not_decode() {
        for bad in ["", "a\nb", "\u{7f}"] {
            let json = serde_json::to_string(bad).unwrap_or_default();
            assert!(serde_json::from_str::<SessionId>(&json).is_err(), "{bad:?}");
        }
        let enc = postcard::to_allocvec(&"").unwrap_or_default();
        assert!(postcard::from_bytes::<SessionId>(&enc).is_err());
        assert!(serde_json::from_str::<SessionId>("\"ok/key:1\"").is_ok());
    }

    #[test]
    fn entries_stamped_past_the_bound_are_dropped_and_nothing_else() {
        let mut st = Store::new(Limits::default());
        st.apply(
            &delta("now", h(1_000, 0), vec![Op::Create, set("a", "1")]),
            1_000,
        );
        st.apply(
            &delta("future", h(600_000, 0), vec![Op::Create, set("a", "1")]),
            1_000,
        );
        st.apply(
            &delta("gone", h(700_000, 0), vec![Op::Create, Op::Invalidate]),
            1_000,
        );
        assert_eq!(st.drop_beyond(2_000), 2);
        assert_eq!(val(&st, "now", "a").as_deref(), Some(&b"1"[..]));
        assert!(st.state(&id("future")).is_none() && st.state(&id("gone")).is_none());
        assert_eq!((st.live_count(), st.tombstone_count()), (1, 0));
    }

    #[test]
    fn delta_for_unknown_session_creates_it() {
        let mut st = Store::default();
        assert_eq!(
            st.apply(&delta("A", h(1500, 1), vec![set("x", "1")]), 1500),
            Applied::Changed
        );
        assert_eq!(val(&st, "A", "x").as_deref(), Some(&b"1"[..]));
        assert_eq!(st.live_count(), 1);
    }

    #[test]
    fn last_writer_wins_per_attribute_in_any_order() {
        let d1 = delta("A", h(1500, 1), vec![set("x", "old"), set("y", "y1")]);
        let d2 = delta("A", h(1600, 2), vec![set("x", "new")]);
        for order in [[&d1, &d2], [&d2, &d1]] {
            let mut st = Store::default();
            for d in order {
                st.apply(d, 1700);
            }
            assert_eq!(val(&st, "A", "x").as_deref(), Some(&b"new"[..]));
            assert_eq!(val(&st, "A", "y").as_deref(), Some(&b"y1"[..]));
        }
    }

    #[test]
    fn removal_is_not_undone_by_an_older_set() {
        let mut st = Store::default();
        st.apply(
            &delta("A", h(1600, 1), vec![Op::Remove { name: "x".into() }]),
            1600,
        );
        st.apply(&delta("A", h(1500, 2), vec![set("x", "stale")]), 1600);
        assert_eq!(val(&st, "A", "x"), None);
    }

    #[test]
    fn invalidation_is_final_and_gc_removes_it() {
        let mut st = Store::default();
        st.apply(&delta("A", h(1500, 1), vec![set("x", "1")]), 1500);
        st.apply(&delta("A", h(1600, 1), vec![Op::Invalidate]), 1600);
        assert_eq!(
            st.get(&id("A"), 1600, 0).unwrap_err(),
            StoreError::Invalidated
        );
        assert_eq!(
            st.apply(&delta("A", h(1700, 2), vec![set("x", "2")]), 1700),
            Applied::Ignored
        );
        assert_eq!(st.live_count(), 0);
        assert_eq!(st.payload_bytes(), 0);
        st.sweep(1600 + 10_000, 0, 10_000);
        assert_eq!(st.tombstone_count(), 0);
    }

    #[test]
    fn expired_state_is_never_resurrected() {
        let mut st = Store::default();
        let d = delta("A", h(1500, 1), vec![set("x", "1")]);
        assert_eq!(st.apply(&d, 1500 + 60_000), Applied::Ignored);
        assert_eq!(st.live_count(), 0);
        st.apply(&d, 1500);
        assert_eq!(st.sweep(1500 + 60_000, 0, 1), 1);
        let state = SessionState {
            id: id("A"),
            entry: Entry::Live(Session {
                created_ms: 1000,
                last_accessed_ms: 1500,
                max_inactive_ms: 60_000,
                meta_hlc: Hlc::default(),
                attrs: AttrMap::default(),
                cleared: Hlc::default(),
            }),
        };
        assert_eq!(st.merge(state, 1500 + 60_000), Applied::Ignored);
    }

    #[test]
    fn a_deleted_key_can_be_written_again_but_not_revived_by_older_state() {
        let mut st = Store::default();
        st.apply(
            &delta("K", h(1500, 1), vec![set("a", "old"), set("b", "old")]),
            1500,
        );
        let stale = st.state(&id("K")).unwrap();
        st.apply(&delta("K", h(1600, 2), vec![Op::Delete]), 1600);
        assert_eq!(
            st.get(&id("K"), 1600, 0).unwrap_err(),
            StoreError::NotFound,
            "a delete is not an invalidation"
        );
        assert_eq!(st.live_count(), 0);
        // An older write or a stale replica's state cannot bring it back.
        assert_eq!(
            st.apply(&delta("K", h(1550, 3), vec![set("a", "late")]), 1600),
            Applied::Ignored
        );
        assert_eq!(st.merge(stale.clone(), 1600), Applied::Ignored);
        // A newer write creates the key afresh.
        st.apply(
            &delta("K", h(1700, 1), vec![Op::Create, set("a", "new")]),
            1700,
        );
        assert_eq!(val(&st, "K", "a").as_deref(), Some(&b"new"[..]));
        assert_eq!(st.merge(stale, 1700), Applied::Ignored);
        assert_eq!(
            val(&st, "K", "b"),
            None,
            "an attribute from before the delete came back"
        );
        // On a replica that saw the writes in another order, the result is the same.
        let mut other = Store::default();
        other.apply(
            &delta("K", h(1700, 1), vec![Op::Create, set("a", "new")]),
            1700,
        );
        other.apply(
            &delta("K", h(1500, 1), vec![set("a", "old"), set("b", "old")]),
            1700,
        );
        other.apply(&delta("K", h(1600, 2), vec![Op::Delete]), 1700);
        assert_eq!(other.fingerprint(), st.fingerprint());
    }

    mod convergence {
        use super::*;
        use proptest::prelude::*;

        fn arb_op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => ("[ab]", "[xyz]").prop_map(|(n, v)| Op::Set { name: n, value: Bytes::from(v) }),
                2 => "[ab]".prop_map(|n| Op::Remove { name: n }),
                1 => Just(Op::Delete),
                1 => Just(Op::MaxInactive),
                1 => Just(Op::Invalidate),
            ]
        }

        proptest! {
            /// Any order of the same deltas, and any split merged back by full
            /// states, ends in the same store.
            #[test]
            fn deltas_in_any_order_and_merges_converge(
                ops in prop::collection::vec((arb_op(), 0u32..3), 1..12),
                perm_seed in any::<u64>(),
                split in any::<u64>(),
            ) {
                let deltas: Vec<Delta> = ops.iter().enumerate().map(|(i, (op, node))| Delta {
                    id: id("K"),
                    hlc: Hlc { wall_ms: 1000 + i as u64, logical: 0, node: *node },
                    created_ms: 1000,
                    last_accessed_ms: 1000,
                    max_inactive_ms: 60_000 + i as u64,
                    ops: vec![op.clone()],
                }).collect();
                let mut reference = Store::default();
                for d in &deltas { reference.apply(d, 1000); }
                let mut shuffled = deltas.clone();
                let mut x = perm_seed | 1;
                for i in (1..shuffled.len()).rev() {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                    shuffled.swap(i, (x % (i as u64 + 1)) as usize);
                }
                let mut other = Store::default();
                for d in &shuffled { other.apply(d, 1000); }
                prop_assert_eq!(other.fingerprint(), reference.fingerprint());
                let (mut a, mut b) = (Store::default(), Store::default());
                for (i, d) in shuffled.iter().enumerate() {
                    if split >> (i % 64) & 1 == 1 { a.apply(d, 1000); } else { b.apply(d, 1000); }
                }
                if let Some(st) = a.state(&id("K")) { b.merge(st, 1000); }
                if let Some(st) = b.state(&id("K")) { a.merge(st, 1000); }
                prop_assert_eq!(a.fingerprint(), b.fingerprint());
                prop_assert_eq!(a.fingerprint(), reference.fingerprint());
            }
        }
    }

    #[test]
    fn invalidation_wins_over_delete() {
        let mut a = Store::default();
        a.apply(&delta("K", h(1500, 1), vec![set("a", "1")]), 1500);
        let mut b = Store::default();
        b.apply(&delta("K", h(1500, 1), vec![set("a", "1")]), 1500);
        a.apply(&delta("K", h(1600, 1), vec![Op::Delete]), 1600);
        b.apply(&delta("K", h(1550, 2), vec![Op::Invalidate]), 1600);
        a.merge(b.state(&id("K")).unwrap(), 1600);
        b.merge(a.state(&id("K")).unwrap(), 1600);
        assert_eq!(
            a.get(&id("K"), 1600, 0).unwrap_err(),
            StoreError::Invalidated
        );
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn rename_moves_attributes_and_tombstones_old_id() {
        let mut st = Store::default();
        st.apply(&delta("A", h(1500, 1), vec![set("x", "1")]), 1500);
        st.apply(
            &delta("A", h(1600, 1), vec![Op::Rename { to: id("B") }]),
            1600,
        );
        assert_eq!(val(&st, "B", "x").as_deref(), Some(&b"1"[..]));
        assert_eq!(
            st.get(&id("A"), 1600, 0).unwrap_err(),
            StoreError::Invalidated
        );
        assert_eq!(st.live_count(), 1);
    }

    #[test]
    fn limits_are_checked_before_anything_changes() {
        let mut st = Store::new(Limits {
            max_attr_bytes: 4,
            max_session_bytes: 10,
            max_sessions: 1,
            max_attr_name: 8,
        });
        let big = delta("A", h(1500, 1), vec![Op::Create, set("x", "12345")]);
        assert!(matches!(
            st.check_local(&big, 1500, 0),
            Err(StoreError::AttrTooLarge { size: 5, max: 4 })
        ));
        let ok = delta("A", h(1500, 1), vec![Op::Create, set("x", "1234")]);
        st.check_local(&ok, 1500, 0).unwrap();
        st.apply(&ok, 1500);
        let grow = delta("A", h(1600, 1), vec![set("y", "1234"), set("z", "1234")]);
        assert!(matches!(
            st.check_local(&grow, 1600, 0),
            Err(StoreError::SessionTooLarge { .. })
        ));
        let other = delta("B", h(1600, 1), vec![Op::Create]);
        assert_eq!(
            st.check_local(&other, 1600, 0),
            Err(StoreError::Full { max: 1 })
        );
        assert_eq!(
            st.check_local(&delta("C", h(1, 1), vec![set("a", "b")]), 1600, 0),
            Err(StoreError::NotFound)
        );
    }

    #[test]
    fn attr_map_from_the_wire_is_sorted_and_unique() {
        let a = |w| Attr {
            value: Some(Bytes::from_static(b"v")),
            hlc: h(w, 1),
            removed_at_ms: 0,
        };
        let m = AttrMap::from(vec![
            ("b".into(), a(1)),
            ("a".into(), a(1)),
            ("b".into(), a(5)),
        ]);
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("b").unwrap().hlc.wall_ms, 5);
        assert!(m.get("a").is_some() && m.get("c").is_none());
    }

    #[test]
    fn chunks_cover_everything_once() {
        let mut st = Store::default();
        for i in 0..100 {
            st.apply(
                &delta(
                    &format!("S{i:03}"),
                    h(1500, 1),
                    vec![set("x", "0123456789")],
                ),
                1500,
            );
        }
        let mut cursor = None;
        let mut seen = 0;
        loop {
            let (chunk, next) = st.chunk_after(cursor.as_ref(), 300);
            seen += chunk.len();
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, 100);
    }

    #[test]
    fn digests_agree_after_merge() {
        let mut a = Store::default();
        let mut b = Store::default();
        a.apply(&delta("A", h(1500, 1), vec![set("x", "1")]), 1500);
        b.apply(&delta("B", h(1500, 2), vec![set("y", "1")]), 1500);
        assert_ne!(a.bucket_digest(), b.bucket_digest());
        for st in [a.state(&id("A")).unwrap()] {
            b.merge(st, 1500);
        }
        for st in [b.state(&id("B")).unwrap()] {
            a.merge(st, 1500);
        }
        assert_eq!(a.bucket_digest(), b.bucket_digest());
        assert_eq!(a.fingerprint(), b.fingerprint());
    }
}
