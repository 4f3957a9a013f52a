//! The core's periodic work as values: each is an interval and when it last
//! ran, asked with the current time. Nothing here reads a clock.

/// Something done at most once per interval.
#[derive(Debug, Clone, Copy)]
pub(super) struct Every {
    interval_ms: u64,
    last_ms: u64,
}

impl Every {
    /// First due one interval after `start_ms` (0: due at once).
    pub(super) fn new(interval_ms: u64, start_ms: u64) -> Self {
        Every {
            interval_ms,
            last_ms: start_ms,
        }
    }

    /// True (and counts as done) when an interval has passed since it last ran.
    pub(super) fn due(&mut self, now_ms: u64) -> bool {
        if now_ms.saturating_sub(self.last_ms) < self.interval_ms {
            return false;
        }
        self.last_ms = now_ms;
        true
    }
}

/// The core's timers.
#[derive(Debug)]
pub(super) struct Timers {
    pub(super) heartbeat: Every,
    /// Coalesced touches (reads that extend a session) go out this often.
    pub(super) touch_flush: Every,
    pub(super) sweep: Every,
    /// Warnings about a start that waits, at most this often.
    pub(super) stall_log: Every,
    pub(super) progress_log: Every,
    /// The next periodic anti-entropy round (jittered by the core).
    pub(super) next_ae_ms: u64,
}

const STALL_LOG_MS: u64 = 5_000;
const PROGRESS_LOG_MS: u64 = 1_000;

impl Timers {
    pub(super) fn new(cfg: &super::CoreConfig, now_ms: u64) -> Self {
        Timers {
            heartbeat: Every::new(cfg.heartbeat_interval_ms, 0),
            touch_flush: Every::new(cfg.touch_flush_ms, now_ms),
            sweep: Every::new(cfg.sweep_interval_ms, now_ms),
            stall_log: Every::new(STALL_LOG_MS, 0),
            progress_log: Every::new(PROGRESS_LOG_MS, 0),
            next_ae_ms: now_ms + cfg.anti_entropy_interval_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_once_per_interval_from_its_start() {
        let mut e = Every::new(100, 1_000);
        assert!(!e.due(1_099));
        assert!(e.due(1_100));
        assert!(!e.due(1_150), "counted as done at 1100");
        assert!(e.due(1_250));
        assert!(!e.due(1_000), "a clock going back is not due");
    }

    #[test]
    fn timers_start_from_the_config() {
        let cfg = super::super::CoreConfig::default();
        let mut t = Timers::new(&cfg, 10_000);
        assert!(t.heartbeat.due(10_000), "the first heartbeat goes at once");
        assert!(!t.sweep.due(10_000), "the first sweep waits an interval");
        assert!(t.sweep.due(10_000 + cfg.sweep_interval_ms));
        assert_eq!(t.next_ae_ms, 10_000 + cfg.anti_entropy_interval_ms);
    }
}
