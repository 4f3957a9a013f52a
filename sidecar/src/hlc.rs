//! Hybrid logical clock: orders writes across members so concurrent writes to
//! one attribute resolve the same way everywhere (last writer wins).
//!
//! Invariant: every `Hlc` a clock hands out is strictly greater than every one it
//! handed out or observed before; ties between members break on `node`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
    pub node: u32,
}

#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
}

/// Remote clocks further ahead than this are not followed (a broken clock must
/// not drag the cluster into the future).
pub const MAX_DRIFT_MS: u64 = 60_000;

impl HlcClock {
    pub fn new(node: u32) -> Self {
        HlcClock { last: Hlc { wall_ms: 0, logical: 0, node } }
    }

    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        if wall_ms > self.last.wall_ms {
            self.last.wall_ms = wall_ms;
            self.last.logical = 0;
        } else {
            self.last.logical = self.last.logical.saturating_add(1);
        }
        self.last
    }

    /// Moves the clock past a timestamp seen from a peer.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) {
        if remote.wall_ms > wall_ms.saturating_add(MAX_DRIFT_MS) {
            return;
        }
        let cur = (self.last.wall_ms, self.last.logical);
        let rem = (remote.wall_ms, remote.logical);
        if rem > cur {
            self.last.wall_ms = remote.wall_ms;
            self.last.logical = remote.logical;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_even_when_wall_clock_stalls_or_goes_back() {
        let mut c = HlcClock::new(1);
        let a = c.now(100);
        let b = c.now(100);
        let d = c.now(90);
        assert!(a < b && b < d);
        c.observe(Hlc { wall_ms: 500, logical: 3, node: 2 }, 100);
        let e = c.now(100);
        assert!(e > Hlc { wall_ms: 500, logical: 3, node: 2 });
    }

    #[test]
    fn far_future_is_ignored() {
        let mut c = HlcClock::new(1);
        c.observe(Hlc { wall_ms: 10_000_000, logical: 0, node: 2 }, 100);
        assert_eq!(c.now(100).wall_ms, 100);
    }
}
