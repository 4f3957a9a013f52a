//! The CRDT: `apply` (a delta) and `merge` (a full state) are commutative,
//! associative and idempotent, so replicas converge whatever the order in
//! which deltas, transfer chunks and anti-entropy repairs arrive.

use super::*;

impl Store {
    /// Applies a delta, local or remote.
    pub fn apply(&mut self, d: &Delta, now_ms: u64) -> Applied {
        let to = d.ops.iter().find_map(|op| match op {
            Op::Rename { to } if *to != d.id => Some(to),
            _ => None,
        });
        let before = (self.hash_now(&d.id), to.map(|t| self.hash_now(t)));
        let applied = self.apply_inner(d, now_ms);
        self.rehash(&d.id, before.0);
        if let (Some(t), Some(h)) = (to, before.1) {
            self.rehash(t, h);
        }
        applied
    }

    fn apply_inner(&mut self, d: &Delta, now_ms: u64) -> Applied {
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
        let Some(mut changed) = self.live_for(d, now_ms) else {
            return Applied::Ignored;
        };
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
        let (ops_changed, after_ops) = apply_ops(s, d, now_ms);
        changed |= ops_changed;
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

    /// Makes sure a live session exists for `d`: `Some(true)` if one was
    /// created, `Some(false)` if one was there, `None` if `d` must be ignored
    /// (a final tombstone, an older delete, or already expired).
    pub(super) fn live_for(&mut self, d: &Delta, now_ms: u64) -> Option<bool> {
        let cleared = match self.entries.get(&d.id) {
            Some(Entry::Tombstone {
                reusable: false, ..
            }) => return None,
            Some(Entry::Tombstone {
                hlc,
                reusable: true,
                ..
            }) if d.hlc <= *hlc => return None,
            Some(Entry::Tombstone { hlc, .. }) => *hlc,
            Some(Entry::Live(s)) if d.hlc <= s.cleared => return None,
            Some(Entry::Live(_)) => return Some(false),
            None => Hlc::default(),
        };
        let fresh = Session {
            created_ms: d.created_ms,
            last_accessed_ms: d.last_accessed_ms,
            max_inactive_ms: d.max_inactive_ms,
            meta_hlc: Hlc::default(),
            attrs: AttrMap::default(),
            cleared,
        };
        if expired(&fresh, now_ms, 0) {
            return None;
        }
        self.insert_live(d.id.clone(), fresh);
        Some(true)
    }

    pub(super) fn insert_live(&mut self, id: SessionId, s: Session) {
        self.payload += id.as_str().len() + s.payload_bytes();
        self.live += 1;
        self.entries.insert(id, Entry::Live(s));
    }

    pub(super) fn remove_live_accounting(&mut self, id: &SessionId, s: &Session) {
        self.payload -= id.as_str().len() + s.payload_bytes();
        self.live -= 1;
    }

    /// Makes `id` a tombstone. A final one (invalidation) wins over a reusable
    /// one (delete); otherwise the newer wins.
    pub(super) fn tombstone(&mut self, id: &SessionId, hlc: Hlc, now_ms: u64, reusable: bool) {
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

    pub(super) fn rename(&mut self, from: &SessionId, to: &SessionId, hlc: Hlc, now_ms: u64) {
        let moved = match self.entries.get(from) {
            Some(Entry::Live(s)) => Some(s.clone()),
            _ => None,
        };
        self.tombstone(from, hlc, now_ms, false);
        if let Some(s) = moved {
            self.merge_inner(
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
        let id = st.id.clone();
        let before = self.hash_now(&id);
        let applied = self.merge_inner(st, now_ms);
        self.rehash(&id, before);
        applied
    }

    fn merge_inner(&mut self, st: SessionState, now_ms: u64) -> Applied {
        let SessionState { id, entry } = st;
        match entry {
            Entry::Live(s) => self.merge_live_state(id, s, now_ms),
            Entry::Tombstone { hlc, reusable, .. } => {
                self.merge_tombstone_state(id, hlc, reusable, now_ms)
            }
        }
    }

    fn merge_live_state(&mut self, id: SessionId, mut theirs: Session, now_ms: u64) -> Applied {
        match self.entries.get_mut(&id) {
            Some(Entry::Tombstone {
                reusable: false, ..
            }) => Applied::Ignored,
            Some(Entry::Tombstone { hlc, .. }) => {
                theirs.cleared = theirs.cleared.max(*hlc);
                if !theirs.apply_cleared() || expired(&theirs, now_ms, 0) {
                    return Applied::Ignored;
                }
                self.entries.remove(&id);
                self.insert_live(id, theirs);
                Applied::Changed
            }
            None => {
                if expired(&theirs, now_ms, 0) || !theirs.apply_cleared() {
                    return Applied::Ignored;
                }
                self.insert_live(id, theirs);
                Applied::Changed
            }
            Some(Entry::Live(mine)) => {
                let before = mine.payload_bytes();
                let changed = merge_live(mine, theirs);
                let cleared = mine.cleared;
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

    fn merge_tombstone_state(
        &mut self,
        id: SessionId,
        hlc: Hlc,
        reusable: bool,
        now_ms: u64,
    ) -> Applied {
        match self.entries.get_mut(&id) {
            Some(Entry::Tombstone {
                hlc: mine,
                reusable: mine_reusable,
                ..
            }) => merge_tombstones(mine, mine_reusable, hlc, reusable),
            // A delete clears what is older than it; what is newer stays.
            Some(Entry::Live(mine)) if reusable => {
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
            _ => {
                self.tombstone(&id, hlc, now_ms, reusable);
                Applied::Changed
            }
        }
    }
}

/// Which attribute operations a later one in the same delta overrides;
/// `None` (no allocation) when no attribute is named twice.
fn superseded_ops(ops: &[Op]) -> Option<Vec<bool>> {
    fn name(op: &Op) -> Option<&str> {
        match op {
            Op::Set { name, .. } | Op::Remove { name } => Some(name.as_str()),
            _ => None,
        }
    }
    let named = ops.iter().filter(|o| name(o).is_some()).count();
    if named < 2 {
        return None;
    }
    let mut out = vec![false; ops.len()];
    if named <= 16 {
        for (i, op) in ops.iter().enumerate() {
            if let Some(n) = name(op) {
                out[i] = ops[i + 1..].iter().any(|o| name(o) == Some(n));
            }
        }
    } else {
        let mut seen = std::collections::HashSet::new();
        for (i, op) in ops.iter().enumerate().rev() {
            if let Some(n) = name(op) {
                out[i] = !seen.insert(n);
            }
        }
    }
    out.iter().any(|x| *x).then_some(out)
}

/// What a delta leaves to do once its operations are applied to the session.
enum After<'a> {
    Nothing,
    Tombstone,
    Rename(&'a SessionId),
}

/// Applies a delta's attribute operations to a live session, last writer wins
/// per attribute. Returns whether anything changed and what is left to do.
fn apply_ops<'d>(s: &mut Session, d: &'d Delta, now_ms: u64) -> (bool, After<'d>) {
    let mut changed = false;
    // All of a delta's operations carry its one timestamp: of several on the
    // same attribute, only the last counts (as `HSET k f a f b` leaves `b`).
    let superseded = superseded_ops(&d.ops);
    for (i, op) in d.ops.iter().enumerate() {
        if superseded.as_ref().is_some_and(|v| v[i]) {
            continue;
        }
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
                    return (true, After::Tombstone);
                }
            }
            Op::Invalidate => {}
            Op::Rename { to } => {
                return (changed, After::Rename(to));
            }
        }
    }
    (changed, After::Nothing)
}

/// Joins another replica's version of a live session into ours; returns
/// whether ours changed. The caller applies `cleared` afterwards.
fn merge_live(mine: &mut Session, theirs: Session) -> bool {
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
    changed
}

/// Joins two tombstones: a final one wins over a delete, else the newer.
fn merge_tombstones(
    hlc: &mut Hlc,
    reusable: &mut bool,
    other: Hlc,
    other_reusable: bool,
) -> Applied {
    let before = (*hlc, *reusable);
    if *reusable == other_reusable {
        *hlc = (*hlc).max(other);
    } else if *reusable {
        *hlc = other;
        *reusable = false;
    }
    if before != (*hlc, *reusable) {
        Applied::Changed
    } else {
        Applied::Ignored
    }
}
