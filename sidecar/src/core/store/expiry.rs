//! Dropping what must go: expired sessions, old tombstones, and entries
//! stamped beyond the clock bound.

use super::{expired, Entry, Store};
use crate::core::identity::SessionId;

impl Store {
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
}
