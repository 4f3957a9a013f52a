//! Hybrid logical clock: orders writes across members so concurrent writes to
//! one attribute resolve the same way everywhere (last writer wins).
//!
//! Invariants: every `Hlc` a clock hands out is strictly greater than every one
//! it handed out or accepted before; ties between members break on `node`. A
//! remote timestamp is accepted only within `max_skew_ms` of the local wall
//! clock, so no member can drag the others into the future: a value stamped
//! further ahead would win every later merge and silently swallow the writes
//! that come after it.

use serde::{Deserialize, Serialize};

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
    pub node: u32,
}

/// A remote timestamp further ahead of the local wall clock than the bound.
/// Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timestamp {ahead_ms} ms ahead of this member's clock (bound {bound_ms} ms)")]
pub struct TooFarAhead {
    pub ahead_ms: u64,
    pub bound_ms: u64,
}

#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
    max_skew_ms: u64,
}

impl HlcClock {
    pub fn new(node: u32, max_skew_ms: u64) -> Self {
        HlcClock {
            last: Hlc {
                wall_ms: 0,
                logical: 0,
                node,
            },
            max_skew_ms,
        }
    }

    pub fn max_skew_ms(&self) -> u64 {
        self.max_skew_ms
    }

    /// A fresh timestamp, greater than everything seen so far.
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        if wall_ms > self.last.wall_ms {
            self.last.wall_ms = wall_ms;
            self.last.logical = 0;
        } else if self.last.logical == u32::MAX {
            // Carry into the physical part rather than saturate: a saturated
            // counter would hand out the same timestamp again and again.
            self.last.wall_ms += 1;
            self.last.logical = 0;
        } else {
            self.last.logical += 1;
        }
        self.last
    }

    /// Checks a remote timestamp against the bound without moving the clock.
    pub fn check(&self, remote: Hlc, wall_ms: u64) -> Result<(), TooFarAhead> {
        let limit = wall_ms.saturating_add(self.max_skew_ms);
        if remote.wall_ms > limit {
            return Err(TooFarAhead {
                ahead_ms: remote.wall_ms - wall_ms,
                bound_ms: self.max_skew_ms,
            });
        }
        Ok(())
    }

    /// Moves the clock past a timestamp seen from a peer, if it is within the bound.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Result<(), TooFarAhead> {
        self.check(remote, wall_ms)?;
        if (remote.wall_ms, remote.logical) > (self.last.wall_ms, self.last.logical) {
            self.last.wall_ms = remote.wall_ms;
            self.last.logical = remote.logical;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_even_when_wall_clock_stalls_or_goes_back() {
        let mut c = HlcClock::new(1, 1_000);
        let a = c.now(100);
        let b = c.now(100);
        let d = c.now(90);
        assert!(a < b && b < d);
        assert!(c
            .observe(
                Hlc {
                    wall_ms: 500,
                    logical: 3,
                    node: 2
                },
                100
            )
            .is_ok());
        let e = c.now(100);
        assert!(
            e > Hlc {
                wall_ms: 500,
                logical: 3,
                node: 2
            }
        );
    }

    #[test]
    fn a_timestamp_past_the_bound_is_refused_and_does_not_move_the_clock() {
        let mut c = HlcClock::new(1, 1_000);
        let far = Hlc {
            wall_ms: 100 + 600_000,
            logical: 0,
            node: 2,
        };
        assert_eq!(
            c.observe(far, 100),
            Err(TooFarAhead {
                ahead_ms: 600_000,
                bound_ms: 1_000
            })
        );
        assert_eq!(c.now(100).wall_ms, 100);
        // At the bound exactly it is accepted.
        assert!(c
            .observe(
                Hlc {
                    wall_ms: 1_100,
                    logical: 0,
                    node: 2
                },
                100
            )
            .is_ok());
        assert!(
            c.now(100)
                > Hlc {
                    wall_ms: 1_100,
                    logical: 0,
                    node: 2
                }
        );
    }

    #[test]
    fn the_logical_counter_carries_instead_of_saturating() {
        let mut c = HlcClock::new(1, 1_000);
        // A forged maximal counter from a peer, within the time bound.
        assert!(c
            .observe(
                Hlc {
                    wall_ms: 100,
                    logical: u32::MAX,
                    node: 2
                },
                100
            )
            .is_ok());
        let a = c.now(100);
        let b = c.now(100);
        let d = c.now(100);
        assert!(
            a > Hlc {
                wall_ms: 100,
                logical: u32::MAX,
                node: 2
            },
            "{a:?}"
        );
        assert!(a < b && b < d, "{a:?} {b:?} {d:?}");
        assert_eq!(a.wall_ms, 101);
    }
}

/// Whether this member's clock is the odd one out. `offsets_ms` are the live
/// peers' clocks minus ours. The member is skewed when the peers more than
/// `bound_ms` away from it outnumber those within the bound (itself counted as
/// within); on a tie it is skewed only if it is ahead of a disagreeing peer,
/// because a clock ahead is the harmful one (its timestamps win merges).
/// Returns the median offset to the disagreeing peers when skewed.
pub fn judge_skew(offsets_ms: &[i64], bound_ms: u64) -> Option<i64> {
    let bound = i64::try_from(bound_ms).unwrap_or(i64::MAX);
    let mut off: Vec<i64> = offsets_ms
        .iter()
        .copied()
        .filter(|o| o.abs() > bound)
        .collect();
    let agree = 1 + offsets_ms.len() - off.len();
    let we_are_ahead = off.iter().any(|o| *o < 0);
    if off.len() > agree || (off.len() == agree && we_are_ahead) {
        off.sort_unstable();
        // Offsets are theirs minus ours: ours minus theirs is what we report.
        return Some(-off[(off.len() - 1) / 2]);
    }
    None
}

#[cfg(test)]
mod skew_tests {
    use super::judge_skew;

    #[test]
    fn the_member_far_from_most_of_its_peers_is_skewed_and_the_others_are_not() {
        // F is 10 minutes ahead of A and B.
        assert_eq!(judge_skew(&[-600_000, -600_000], 1_000), Some(600_000), "F");
        assert_eq!(judge_skew(&[600_000, 3], 1_000), None, "A");
        // A member an hour behind its two peers.
        assert_eq!(judge_skew(&[3_600_000, 3_600_010], 1_000), Some(-3_600_000));
        // Within the bound is agreement.
        assert_eq!(judge_skew(&[900, -900], 1_000), None);
        // Alone, nobody to disagree with.
        assert_eq!(judge_skew(&[], 1_000), None);
    }

    #[test]
    fn with_two_members_only_the_one_ahead_is_skewed() {
        assert_eq!(judge_skew(&[-5_000], 1_000), Some(5_000), "ahead");
        assert_eq!(judge_skew(&[5_000], 1_000), None, "behind");
    }
}
