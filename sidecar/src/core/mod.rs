//! The member's brain, free of I/O: store, replication streams, failure
//! detection, state transfer and anti-entropy in one synchronous struct.
//!
//! Callers feed it events with the current time (`now_ms`) and carry out the
//! `Output`s it queues (`drain`). The tokio node and the simulated cluster
//! drive the same code. Invariants:
//! - each peer gets a numbered delta stream per (our generation, its
//!   generation); deltas stay in the stream's log until acknowledged, so a broken
//!   connection loses nothing that the log still holds;
//! - a sync write completes only when every member that was live when it was
//!   written has acknowledged it, has died, left, or restarted;
//! - the member is ready only after a complete state transfer (or when no ready
//!   peer exists at start-up: a cold cluster);
//! - nothing here logs session contents or whole session ids.

mod anti_entropy;
mod backup;
pub use backup::BackupStats;
mod changes;
pub use changes::Change;
pub mod detector;
pub mod hlc;
pub mod identity;
mod leave;
pub mod message;
mod peers;
pub mod placement;
mod replication;
pub mod store;
mod timers;
mod transfer;
mod writes;

use peers::Peer;
use timers::Timers;
use transfer::Transfer;
use writes::PendingWrites;

use crate::core::detector::{Detector, DetectorConfig, MemberState};
use crate::core::hlc::HlcClock;
use crate::core::identity::{fnv1a, NodeId, SessionId};
use crate::core::message::PeerMsg;
use crate::core::store::{Delta, Limits, Op, SessionState, Store, StoreError};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use tracing::{debug, warn};

/// When a write returns (shared with the CRD).
pub use sessionmesh_api::SendMode;

#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub cluster: String,
    pub send: SendMode,
    pub heartbeat_interval_ms: u64,
    pub detector: DetectorConfig,
    /// How long a write may wait for acknowledgements or queue space.
    pub write_timeout_ms: u64,
    /// Unacknowledged bytes per peer above which writes wait (backpressure).
    pub max_queue_bytes: usize,
    pub transfer_chunk_bytes: usize,
    /// A transfer with no progress for this long moves to another member.
    pub transfer_stall_ms: u64,
    /// After this long, a starting member that is still waiting for peers
    /// (unreachable ones settle at once; ones that refuse it are waited for)
    /// logs which peers it is waiting for.
    pub startup_wait_ms: u64,
    pub anti_entropy_interval_ms: u64,
    pub touch_flush_ms: u64,
    pub sweep_interval_ms: u64,
    pub tombstone_ttl_ms: u64,
    pub default_max_inactive_ms: u64,
    pub limits: Limits,
    /// Largest message we send; also the transfer chunk cap.
    pub max_frame_bytes: usize,
    /// How far ahead of this member's clock a peer's timestamp may be. Further
    /// ahead, it is refused (it would win every later merge); a member whose
    /// clock disagrees with most of its peers by more than this turns not ready.
    pub max_clock_skew_ms: u64,
    /// How long a starting member waits for peers that accept connections but
    /// never answer (hung) before it serves with an empty store, loudly.
    pub silent_peer_wait_ms: u64,
    /// Backup mode with this many copies besides the owner; `None`: every
    /// member holds every session (`all` mode).
    pub backups: Option<usize>,
    /// How long a member that holds no copy waits for a session's holders.
    pub fetch_timeout_ms: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            cluster: "default".into(),
            send: SendMode::Async,
            heartbeat_interval_ms: 100,
            detector: DetectorConfig::default(),
            write_timeout_ms: 2_000,
            max_queue_bytes: 64 << 20,
            transfer_chunk_bytes: 4 << 20,
            transfer_stall_ms: 3_000,
            startup_wait_ms: 1_500,
            anti_entropy_interval_ms: 5_000,
            touch_flush_ms: 1_000,
            sweep_interval_ms: 1_000,
            tombstone_ttl_ms: 600_000,
            default_max_inactive_ms: 1_800_000,
            limits: Limits::default(),
            max_frame_bytes: 64 << 20,
            max_clock_skew_ms: 1_000,
            silent_peer_wait_ms: 30_000,
            backups: None,
            fetch_timeout_ms: 500,
        }
    }
}

/// Why a write did not complete. `Store` and `NotReady`/`Leaving` changed
/// nothing; `Timeout` means the write is applied locally and still queued for
/// the members that did not acknowledge it in time.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this member is not ready (state transfer not complete)")]
    NotReady,
    #[error("this member is leaving the cluster")]
    Leaving,
    #[error("replication not acknowledged within {0} ms (applied locally, still replicating)")]
    Timeout(u64),
    /// Nothing was changed: this member's clock disagrees with most of its
    /// peers by more than the bound, so its timestamps cannot be trusted.
    #[error("this member's clock is {offset_ms} ms off its peers' (bound {bound_ms} ms); fix its time source")]
    ClockSkew { offset_ms: i64, bound_ms: u64 },
}

/// How a connection to a peer failed, as far as a starting member cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// Nothing answers there, or an established connection broke.
    Lost,
    /// The peer answered and turned our handshake down (it may not know us yet).
    Refused,
    /// The peer accepted the connection and never answered: alive but hung.
    Silent,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Send {
        to: String,
        msg: PeerMsg,
    },
    /// Probe `target` directly; `for_peer` asked us to (indirect probe).
    Probe {
        target: String,
        for_peer: Option<String>,
    },
    WriteDone {
        write: u64,
        result: Result<(), WriteError>,
    },
    /// Backup mode: the sessions a transaction waits for arrived (or the
    /// fetch gave up); the transaction may run (see `fetch_for`).
    FetchDone {
        fetch: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    Starting,
    Transferring {
        source: String,
        received: u64,
        total: u64,
    },
    Ready,
    Leaving,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub deltas_applied: u64,
    pub deltas_sent: u64,
    pub detections: u64,
    pub transfer_sessions: u64,
    pub transfer_total: u64,
    pub transfer_ms: u64,
    pub transfer_retries: u64,
    pub ae_rounds: u64,
    pub ae_repairs: u64,
    pub write_timeouts: u64,
    pub queue_overflows: u64,
    pub expired: u64,
    pub seq_gaps: u64,
    /// Deltas and states refused because their timestamp was too far ahead.
    pub clock_refused: u64,
    /// 1 when this member went ready with an empty store after waiting
    /// `silent_peer_wait_ms` for peers that accepted connections but never answered.
    pub started_empty_with_silent_peers: u64,
    /// Deltas and states from peers refused for breaking the store's limits.
    pub peer_refused: u64,
    /// Entries dropped because their timestamp was beyond the bound of our own
    /// clock (written while a clock was wrong); anti-entropy repairs them.
    pub clock_quarantined: u64,
}

/// Per-member view for `/v1/cluster`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberView {
    pub name: String,
    pub generation: Option<u64>,
    pub state: &'static str,
    pub since_ms: u64,
    pub connected: bool,
    pub ready: bool,
    pub queue_deltas: usize,
    pub queue_bytes: usize,
    /// The member's clock minus ours (ms), from its last clock message.
    pub clock_offset_ms: Option<i64>,
    /// Its timestamps we refused as too far ahead of our clock.
    pub clock_refused: u64,
}

pub struct Core {
    pub me: NodeId,
    pub cfg: CoreConfig,
    pub store: Store,
    pub stats: Stats,
    clock: HlcClock,
    detector: Detector,
    peers: BTreeMap<String, Peer>,
    outbox: Vec<Output>,
    /// Between `begin_group` and `end_group`: writes form one atomic group.
    group_open: bool,
    pending: PendingWrites,
    phase: Phase,
    started_ms: u64,
    transfer: Option<Transfer>,
    next_id: u64,
    rng: u64,
    /// Sessions read with a touch since the last touch flush.
    dirty_touch: HashSet<SessionId>,
    /// Peers to run an anti-entropy round with as soon as possible.
    ae_wanted: BTreeSet<String>,
    timers: Timers,
    /// Sessions changed since the runtime last took them (`changes.rs`).
    changes: Option<changes::Changes>,
    /// Backup mode's state; `None` in `all` mode.
    backup: Option<backup::Backup>,
    /// Where the next sweep starts (`None`: from the beginning).
    sweep_cursor: Option<SessionId>,
}

impl Core {
    pub fn new(me: NodeId, cfg: CoreConfig, peers: &[String], now_ms: u64) -> Self {
        let node_tag = fnv1a(format!("{}#{}", me.name, me.generation.0).as_bytes());
        let mut core = Core {
            clock: HlcClock::new(node_tag as u32, cfg.max_clock_skew_ms),
            detector: Detector::new(cfg.detector.clone()),
            store: Store::new(cfg.limits.clone()).journaled(cfg.backups.is_some()),
            stats: Stats::default(),
            peers: BTreeMap::new(),
            outbox: Vec::new(),
            group_open: false,
            pending: PendingWrites::default(),
            phase: Phase::Starting,
            started_ms: now_ms,
            transfer: None,
            next_id: 1,
            rng: node_tag | 1,
            dirty_touch: HashSet::new(),
            ae_wanted: BTreeSet::new(),
            timers: Timers::new(&cfg, now_ms),
            changes: None,
            backup: None,
            sweep_cursor: None,
            me,
            cfg,
        };
        core.set_members(peers, now_ms);
        if let Some(k) = core.cfg.backups {
            core.backup = Some(backup::Backup::new(k, core.live_members(), now_ms));
        }
        core
    }

    // ---- queries -------------------------------------------------------

    pub fn phase(&self) -> &Phase {
        &self.phase
    }
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready && self.clock_skew().is_none()
    }

    /// Our clock minus our peers' when it disagrees with most of them by more
    /// than the bound (see `hlc::judge_skew`); `None` when it is fine.
    pub fn clock_skew(&self) -> Option<i64> {
        let offsets: Vec<i64> = self
            .peers
            .iter()
            .filter(|(n, _)| self.detector.state(n).is_some_and(|s| s.is_live()))
            .filter_map(|(_, p)| p.clock_offset_ms)
            .collect();
        crate::core::hlc::judge_skew(&offsets, self.cfg.max_clock_skew_ms)
    }

    /// Whether a peer's timestamp may be stored: within the bound of our clock,
    /// or anything when our own clock is the odd one out (then the peers' time
    /// is the better one, and we refuse local writes instead). Counts and logs
    /// (once per peer) what it refuses.
    /// Counts and logs (once per peer) a delta or state refused for its limits.
    fn refuse_over_limits(&mut self, from: &str, e: &crate::core::store::StoreError) {
        self.stats.peer_refused += 1;
        if let Some(p) = self.peers.get_mut(from) {
            if p.limits_refused == 0 {
                warn!(peer = %from, error = %e, "refusing a peer's data that breaks this member's limits; check that every member runs with the same limits");
            }
            p.limits_refused += 1;
        }
    }

    fn accept_remote(
        &mut self,
        from: &str,
        hlc: crate::core::hlc::Hlc,
        skewed: bool,
        now_ms: u64,
    ) -> bool {
        match self.clock.observe(hlc, now_ms) {
            Ok(()) => true,
            Err(_) if skewed => true,
            Err(e) => {
                self.stats.clock_refused += 1;
                if let Some(p) = self.peers.get_mut(from) {
                    if p.clock_refused == 0 {
                        warn!(peer = %from, error = %e, "refusing a peer's timestamp: its clock is ahead of ours by more than --max-clock-skew-ms");
                    }
                    p.clock_refused += 1;
                }
                false
            }
        }
    }
    pub fn member_state(&self, peer: &str) -> Option<MemberState> {
        self.detector.state(peer)
    }
    pub fn queue_totals(&self) -> (usize, usize) {
        self.peers
            .values()
            .fold((0, 0), |(n, b), p| (n + p.out.len(), b + p.out.bytes))
    }
    pub fn members(&self) -> Vec<MemberView> {
        self.peers
            .iter()
            .map(|(name, p)| {
                let h = self.detector.get(name);
                MemberView {
                    name: name.clone(),
                    generation: p.gen.map(|g| g.0),
                    state: h.map_or("unknown", |h| h.state.as_str()),
                    since_ms: h.map_or(0, |h| h.since_ms),
                    connected: p.connected,
                    ready: p.ready,
                    queue_deltas: p.out.len(),
                    queue_bytes: p.out.bytes,
                    clock_offset_ms: p.clock_offset_ms,
                    clock_refused: p.clock_refused,
                }
            })
            .collect()
    }
    pub fn state_counts(&self) -> [(MemberState, usize); 4] {
        let mut c = [
            (MemberState::Alive, 0),
            (MemberState::Suspect, 0),
            (MemberState::Dead, 0),
            (MemberState::Left, 0),
        ];
        for (_, h) in self.detector.iter() {
            for e in c.iter_mut() {
                if e.0 == h.state {
                    e.1 += 1;
                }
            }
        }
        c
    }

    // ---- membership ------------------------------------------------------

    fn rng_next(&mut self) -> u64 {
        // xorshift64*: deterministic per member, good enough for peer choice.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn rng_peek(&self) -> u64 {
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 7
    }

    // ---- the peer protocol --------------------------------------------------

    pub fn on_peer_msg(&mut self, from: &NodeId, msg: PeerMsg, now_ms: u64) {
        if !self.admit(from, now_ms, false) {
            debug!(peer = %from, kind = msg.kind(), "message from a stale or unknown member ignored");
            return;
        }
        let name = from.name.clone();
        match msg {
            PeerMsg::Heartbeat { ready } => {
                if let Some(p) = self.peers.get_mut(&name) {
                    p.ready = ready;
                }
            }
            PeerMsg::Clock { hlc } => {
                if let Some(p) = self.peers.get_mut(&name) {
                    p.clock_offset_ms = Some(hlc.wall_ms as i64 - now_ms as i64);
                }
                // A clock message stores nothing: a refusal here is only noted.
                let _ = self.clock.observe(hlc, now_ms);
            }
            PeerMsg::Deltas {
                epoch,
                first_seq,
                deltas,
            } => self.on_deltas(&name, epoch, first_seq, deltas, now_ms),
            PeerMsg::Ack { epoch, upto } => self.on_ack(&name, epoch, upto, now_ms),
            PeerMsg::PingReq { target } => {
                self.outbox.push(Output::Probe {
                    target,
                    for_peer: Some(name),
                });
            }
            PeerMsg::PingResp { target, alive } => {
                let acts = self.detector.indirect_result(&target, alive, now_ms);
                self.run_actions(acts, now_ms);
            }
            PeerMsg::Leave => {
                let acts = self.detector.left(&name, now_ms);
                self.run_actions(acts, now_ms);
                self.send(&name, PeerMsg::LeaveAck);
            }
            PeerMsg::LeaveAck => {
                if let Some(p) = self.peers.get_mut(&name) {
                    p.left_ack = true;
                }
            }
            PeerMsg::TransferPull {
                transfer,
                cursor,
                max_bytes,
            } => self.serve_pull(&name, transfer, cursor, max_bytes),
            PeerMsg::TransferChunk {
                transfer,
                states,
                next,
                total,
            } => self.on_chunk(&name, transfer, states, next, total, now_ms),
            PeerMsg::AeDigest { round, buckets } => self.on_ae_digest(&name, round, buckets),
            PeerMsg::AeDetail {
                round: _,
                buckets,
                entries,
            } => self.on_ae_detail(&name, buckets, entries),
            PeerMsg::AePull { ids } => self.on_ae_pull(&name, ids),
            PeerMsg::AeStates { states } => self.on_ae_states(&name, states, now_ms),
            PeerMsg::Fetch { fetch, ids } => self.on_fetch(&name, fetch, ids),
            PeerMsg::Fetched { fetch, states } => self.on_fetched(&name, fetch, states, now_ms),
            PeerMsg::Copies {
                round,
                states,
                done,
            } => self.on_copies(&name, round, states, done, now_ms),
            PeerMsg::CopiesAck { round } => self.on_copies_ack(&name, round),
        }
    }

    // ---- state transfer ---------------------------------------------------------

    // ---- local API ------------------------------------------------------

    // ---- time -----------------------------------------------------------

    /// Periodic work: the detector, heartbeats and clocks, the start-up and
    /// transfer decisions, resends, touch flushes, sweeps and anti-entropy.
    pub fn tick(&mut self, now_ms: u64) {
        let helpers_all: Vec<String> = self
            .peers
            .iter()
            .filter(|(n, p)| p.connected && self.detector.state(n) == Some(MemberState::Alive))
            .map(|(n, _)| n.clone())
            .collect();
        let acts = self.detector.tick(now_ms, &helpers_all);
        self.run_actions(acts, now_ms);
        if self.timers.heartbeat.due(now_ms) {
            self.heartbeat(now_ms);
        }
        self.tick_startup(now_ms);
        self.resend_stalled(now_ms);
        if self.timers.touch_flush.due(now_ms) {
            self.flush_touches(now_ms);
        }
        if self.timers.sweep.due(now_ms) {
            self.sweep(now_ms);
        }
        self.tick_anti_entropy(now_ms);
        self.tick_backup(now_ms);
        self.check_pending(now_ms);
    }

    /// Our readiness and clock to every connected peer.
    fn heartbeat(&mut self, now_ms: u64) {
        let ready = self.is_ready();
        let hlc = self.clock.now(now_ms);
        for (n, p) in &self.peers {
            if !p.connected {
                continue;
            }
            self.outbox.push(Output::Send {
                to: n.clone(),
                msg: PeerMsg::Heartbeat { ready },
            });
            self.outbox.push(Output::Send {
                to: n.clone(),
                msg: PeerMsg::Clock { hlc },
            });
        }
    }

    /// Reads that touched sessions since the last flush, replicated as one
    /// touch per session.
    fn flush_touches(&mut self, now_ms: u64) {
        let dirty: Vec<SessionId> = self.dirty_touch.drain().collect();
        for id in dirty {
            if let Ok(s) = self.store.get(&id, now_ms, self.cfg.touch_flush_ms) {
                let d = Delta {
                    id,
                    hlc: self.clock.now(now_ms),
                    created_ms: s.created_ms,
                    last_accessed_ms: s.last_accessed_ms,
                    max_inactive_ms: s.max_inactive_ms,
                    ops: vec![Op::Touch],
                };
                self.replicate(d, now_ms);
            }
        }
    }

    /// Drops expired sessions and old tombstones, and what was stamped beyond
    /// the clock bound: a slice of the store each time (`SWEEP_BUDGET`
    /// entries), so a store of a million sessions is swept over a minute, at
    /// a small steady cost, and one of a few thousand every second.
    fn sweep(&mut self, now_ms: u64) {
        // What was stamped while a clock was wrong (ours, before it was
        // corrected) would win every later merge: drop it and let
        // anti-entropy bring the cluster's version back. Not while our own
        // clock is the odd one out.
        let beyond = self
            .clock_skew()
            .is_none()
            .then(|| now_ms.saturating_add(self.cfg.max_clock_skew_ms));
        let swept = self.store.sweep_part(
            self.sweep_cursor.as_ref(),
            SWEEP_BUDGET,
            now_ms,
            (self.cfg.touch_flush_ms, self.cfg.tombstone_ttl_ms),
            beyond,
        );
        self.sweep_cursor = swept.next;
        self.stats.expired += swept.expired as u64;
        if swept.beyond > 0 {
            warn!(entries = swept.beyond, "dropped entries stamped beyond this member's clock bound; anti-entropy repairs them");
            self.stats.clock_quarantined += swept.beyond as u64;
            let peers: Vec<String> = self.peers.keys().cloned().collect();
            self.ae_wanted.extend(peers);
        }
    }
}

/// Entries one sweep looks at.
const SWEEP_BUDGET: usize = 20_000;

fn max_hlc(st: &SessionState) -> Option<crate::core::hlc::Hlc> {
    match &st.entry {
        crate::core::store::Entry::Live(s) => s
            .attrs
            .values()
            .map(|a| a.hlc)
            .max()
            .map(|h| h.max(s.meta_hlc)),
        crate::core::store::Entry::Tombstone { hlc, .. } => Some(*hlc),
    }
}
