//! Dropping what must go: expired sessions, old tombstones, and entries
//! stamped beyond the clock bound.

use super::{expired, session_hash, Attr, Entry, Store};
use crate::core::identity::SessionId;
use std::ops::Bound;

/// What one part of a sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Sessions that expired and were removed.
    pub expired: usize,
    /// Entries removed for a timestamp past the clock bound.
    pub beyond: usize,
    /// The last entry swept, when entries remain after it: the next part
    /// starts after it. `None`: this part reached the end.
    pub next: Option<SessionId>,
}

impl Store {
    /// Sweeps at most `budget` entries after `cursor`: removes expired
    /// sessions, tombstones and removed-attribute markers older than
    /// `tombstone_ttl_ms`, and (with `beyond`) entries stamped past that
    /// wall time. A member with a million sessions so sweeps a slice each
    /// second instead of walking everything; reads judge expiry themselves,
    /// so a late sweep only holds memory a little longer.
    pub fn sweep_part(
        &mut self,
        cursor: Option<&SessionId>,
        budget: usize,
        now_ms: u64,
        (grace_ms, tombstone_ttl_ms): (u64, u64),
        beyond: Option<u64>,
    ) -> Swept {
        let start = match cursor {
            Some(c) => Bound::Excluded(c.clone()),
            None => Bound::Unbounded,
        };
        let mut out = Swept::default();
        let (mut expired_ids, mut dead, mut seen) = (Vec::new(), Vec::new(), 0);
        // Sessions that lost old removal markers, with their hash before.
        let mut trimmed = Vec::new();
        let mut last: Option<&SessionId> = None;
        for (id, e) in self.entries.range_mut((start, Bound::Unbounded)) {
            if seen == budget {
                // The next part starts after the last entry this one swept.
                out.next = last.cloned();
                break;
            }
            seen += 1;
            last = Some(id);
            let past = |w: u64| beyond.is_some_and(|b| w > b);
            match e {
                Entry::Live(s) if past(s.version().wall_ms) || past(s.cleared.wall_ms) => {
                    out.beyond += 1;
                    dead.push(id.clone());
                }
                Entry::Live(s) if expired(s, now_ms, grace_ms) => expired_ids.push(id.clone()),
                Entry::Live(s) => {
                    let keep = |a: &Attr| {
                        a.value.is_some()
                            || a.removed_at_ms.saturating_add(tombstone_ttl_ms) > now_ms
                    };
                    if !s.attrs.values().all(keep) {
                        trimmed.push((id.clone(), session_hash(id, s)));
                        s.attrs.retain(|_, a| keep(a));
                    }
                }
                Entry::Tombstone { hlc, .. } if past(hlc.wall_ms) => {
                    out.beyond += 1;
                    dead.push(id.clone());
                }
                Entry::Tombstone { at_ms, .. } => {
                    if at_ms.saturating_add(tombstone_ttl_ms) <= now_ms {
                        dead.push(id.clone());
                    }
                }
            }
        }
        out.expired = expired_ids.len();
        for (id, before) in trimmed {
            self.rehash(&id, before);
        }
        for id in expired_ids.iter().chain(&dead) {
            self.forget(id);
        }
        out
    }

    /// Removes every entry carrying a timestamp past `limit_wall_ms`. Such an
    /// entry can only come from a clock that was wrong when it was written, and
    /// would win every merge against the writes made since. Returns how many.
    pub fn drop_beyond(&mut self, limit_wall_ms: u64) -> usize {
        // At time 0 nothing has expired: only the bound removes anything.
        self.sweep_part(None, usize::MAX, 0, (0, u64::MAX), Some(limit_wall_ms))
            .beyond
    }

    /// The whole store at once (`sweep_part` with no budget). Returns how
    /// many sessions expired.
    pub fn sweep(&mut self, now_ms: u64, grace_ms: u64, tombstone_ttl_ms: u64) -> usize {
        self.sweep_part(None, usize::MAX, now_ms, (grace_ms, tombstone_ttl_ms), None)
            .expired
    }
}
