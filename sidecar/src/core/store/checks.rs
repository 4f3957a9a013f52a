//! Limits on what enters the store: local writes, and peers' deltas and
//! states, are held to the same bounds before anything is applied.

use super::*;

impl Store {
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
                Op::Rename { to }
                    if (matches!(self.entries.get(to), Some(Entry::Live(s)) if !expired(s, now_ms, grace_ms))
                        || matches!(
                            self.entries.get(to),
                            Some(Entry::Tombstone {
                                reusable: false,
                                ..
                            })
                        )) =>
                {
                    return Err(StoreError::Exists);
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

    pub(super) fn check_attr(&self, name: &str, len: usize) -> Result<(), StoreError> {
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
}
