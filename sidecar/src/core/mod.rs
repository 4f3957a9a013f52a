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

pub mod detector;
pub mod hlc;
pub mod identity;
pub mod message;
pub mod store;

use crate::core::detector::{Action, Detector, DetectorConfig, MemberState};
use crate::core::hlc::HlcClock;
use crate::core::identity::{fnv1a, Generation, NodeId, SessionId};
use crate::core::message::PeerMsg;
use crate::core::store::{
    Applied, Delta, Limits, Op, Session, SessionState, Store, StoreError, BUCKETS,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tracing::{debug, error, info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendMode {
    /// The write returns after the local apply.
    Async,
    /// The write returns after every live member acknowledged it.
    Sync,
}

impl std::str::FromStr for SendMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "async" => Ok(SendMode::Async),
            "sync" => Ok(SendMode::Sync),
            _ => Err(format!("send mode must be async or sync, not {s:?}")),
        }
    }
}

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

const HELD_MAX: usize = 16;
/// How long deltas to a peer whose writer is full are held back.
const WRITER_FULL_PAUSE_MS: u64 = 100;
/// Outstanding deltas with no acknowledgement for this long are resent.
const RESEND_AFTER_MS: u64 = 1_000;

#[derive(Debug, Default)]
struct OutLog {
    /// Random per log: a receiver that still counts an older stream of ours
    /// starts this one afresh instead of taking its deltas for duplicates.
    epoch: u64,
    next_seq: u64,
    acked: u64,
    sent_upto: u64,
    unacked: VecDeque<(u64, Arc<Delta>, usize)>,
    bytes: usize,
    /// When `acked` last moved (or a resend was last tried).
    progress_ms: u64,
}

impl OutLog {
    fn fresh() -> Self {
        let mut b = [0u8; 8];
        crate::core::identity::fill_random(&mut b);
        OutLog {
            epoch: u64::from_le_bytes(b),
            next_seq: 1,
            ..Default::default()
        }
    }
    fn clear(&mut self) {
        // Keep numbering so the receiver sees the gap and repairs by anti-entropy.
        self.unacked.clear();
        self.bytes = 0;
        self.acked = self.next_seq - 1;
        self.sent_upto = self.acked;
    }
}

#[derive(Debug)]
struct Peer {
    gen: Option<Generation>,
    connected: bool,
    ready: bool,
    settled: bool,
    /// The peer answered but refused our handshake (it may not know us yet).
    refused: bool,
    /// The peer accepted our connection but never answered the handshake.
    silent: bool,
    left_ack: bool,
    /// Replies held until our connection to the peer is up (a joiner's
    /// transfer request can arrive before we have dialed it).
    held: Vec<PeerMsg>,
    out: OutLog,
    /// The peer's stream to us: its epoch and the last sequence number applied.
    in_epoch: u64,
    in_seq: u64,
    ack_due: bool,
    /// The peer's clock minus ours, from its last `Clock` message.
    clock_offset_ms: Option<i64>,
    /// Timestamps from this peer refused as too far ahead.
    clock_refused: u64,
    /// Deltas and states from this peer refused for breaking the limits.
    limits_refused: u64,
    /// No deltas are handed out for this peer before then (its writer was full).
    hold_until_ms: u64,
}

impl Peer {
    fn new() -> Self {
        Peer {
            gen: None,
            connected: false,
            ready: false,
            settled: false,
            refused: false,
            silent: false,
            left_ack: false,
            held: Vec::new(),
            out: OutLog::fresh(),
            in_epoch: 0,
            in_seq: 0,
            ack_due: false,
            clock_offset_ms: None,
            clock_refused: 0,
            limits_refused: 0,
            hold_until_ms: 0,
        }
    }
}

#[derive(Debug)]
struct PendingWrite {
    write: u64,
    waits: Vec<(String, Option<Generation>, u64)>,
    backpressure: bool,
    deadline_ms: u64,
}

#[derive(Debug)]
struct Transfer {
    id: u64,
    source: String,
    cursor: Option<SessionId>,
    last_progress_ms: u64,
    started_ms: u64,
    tried: BTreeSet<String>,
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
    pending: Vec<PendingWrite>,
    phase: Phase,
    started_ms: u64,
    transfer: Option<Transfer>,
    last_progress_log_ms: u64,
    next_id: u64,
    rng: u64,
    dirty_touch: HashSet<SessionId>,
    ae_wanted: BTreeSet<String>,
    last_heartbeat_ms: u64,
    last_touch_flush_ms: u64,
    last_sweep_ms: u64,
    next_ae_ms: u64,
    last_stall_log_ms: u64,
}

impl Core {
    pub fn new(me: NodeId, cfg: CoreConfig, peers: &[String], now_ms: u64) -> Self {
        let node_tag = fnv1a(format!("{}#{}", me.name, me.generation.0).as_bytes());
        let mut core = Core {
            clock: HlcClock::new(node_tag as u32, cfg.max_clock_skew_ms),
            detector: Detector::new(cfg.detector.clone()),
            store: Store::new(cfg.limits.clone()),
            stats: Stats::default(),
            peers: BTreeMap::new(),
            outbox: Vec::new(),
            pending: Vec::new(),
            phase: Phase::Starting,
            started_ms: now_ms,
            transfer: None,
            last_progress_log_ms: 0,
            next_id: 1,
            rng: node_tag | 1,
            dirty_touch: HashSet::new(),
            ae_wanted: BTreeSet::new(),
            last_heartbeat_ms: 0,
            last_touch_flush_ms: now_ms,
            last_sweep_ms: now_ms,
            next_ae_ms: now_ms + cfg.anti_entropy_interval_ms,
            last_stall_log_ms: 0,
            me,
            cfg,
        };
        core.set_members(peers, now_ms);
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
        self.peers.values().fold((0, 0), |(n, b), p| {
            (n + p.out.unacked.len(), b + p.out.bytes)
        })
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
                    queue_deltas: p.out.unacked.len(),
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

    /// Hands out everything queued since the last call; deltas and acks are
    /// batched per peer here.
    pub fn drain(&mut self, now_ms: u64) -> Vec<Output> {
        let max = self.cfg.max_frame_bytes / 2;
        for (name, p) in self.peers.iter_mut() {
            if p.connected {
                if p.gen.is_some() && now_ms >= p.hold_until_ms {
                    let mut batch = Vec::new();
                    let mut first = 0;
                    let mut bytes = 0;
                    // The log is contiguous by sequence number: start right after
                    // what was already handed out instead of scanning from the front.
                    let skip = match p.out.unacked.front() {
                        Some((front, _, _)) => {
                            (p.out.sent_upto + 1).saturating_sub(*front) as usize
                        }
                        None => 0,
                    };
                    for (seq, d, sz) in p.out.unacked.range(skip.min(p.out.unacked.len())..) {
                        if batch.is_empty() {
                            first = *seq;
                        }
                        batch.push(d.clone());
                        bytes += sz;
                        if bytes >= max {
                            self.stats.deltas_sent += batch.len() as u64;
                            self.outbox.push(Output::Send {
                                to: name.clone(),
                                msg: PeerMsg::Deltas {
                                    epoch: p.out.epoch,
                                    first_seq: first,
                                    deltas: std::mem::take(&mut batch),
                                },
                            });
                            bytes = 0;
                        }
                    }
                    if !batch.is_empty() {
                        self.stats.deltas_sent += batch.len() as u64;
                        self.outbox.push(Output::Send {
                            to: name.clone(),
                            msg: PeerMsg::Deltas {
                                epoch: p.out.epoch,
                                first_seq: first,
                                deltas: batch,
                            },
                        });
                    }
                    p.out.sent_upto = p.out.next_seq - 1;
                }
            }
            // Acks wait for our connection to the peer to exist.
            if p.ack_due && p.connected {
                p.ack_due = false;
                self.outbox.push(Output::Send {
                    to: name.clone(),
                    msg: PeerMsg::Ack {
                        epoch: p.in_epoch,
                        upto: p.in_seq,
                    },
                });
            }
        }
        std::mem::take(&mut self.outbox)
    }

    // ---- membership ------------------------------------------------------

    /// Replaces the member list (static file reload). Removed members are
    /// forgotten; their pending acknowledgements no longer hold writes back.
    pub fn set_members(&mut self, names: &[String], now_ms: u64) {
        let want: BTreeSet<&String> = names.iter().filter(|n| **n != self.me.name).collect();
        let gone: Vec<String> = self
            .peers
            .keys()
            .filter(|k| !want.contains(k))
            .cloned()
            .collect();
        for g in gone {
            info!(peer = %g, "member removed from membership");
            self.peers.remove(&g);
            self.detector.remove(&g);
        }
        for n in want {
            if !self.peers.contains_key(n) {
                self.peers.insert(n.clone(), Peer::new());
                self.detector.add(n, now_ms);
            }
        }
        self.check_pending(now_ms);
    }

    /// Members the operator marked as leaving (terminating pods) are `left` at
    /// once: no probing, no waiting for their acknowledgements.
    pub fn mark_leaving(&mut self, names: &std::collections::BTreeSet<String>, now_ms: u64) {
        for n in names {
            if n != &self.me.name
                && self
                    .detector
                    .state(n)
                    .is_some_and(|s| s != MemberState::Left)
            {
                let acts = self.detector.left(n, now_ms);
                self.run_actions(acts, now_ms);
            }
        }
    }

    /// A message from a peer: accepts it only from the peer's current
    /// generation. A different generation replaces the current one only when
    /// it comes with a fresh authenticated connection (`handshake`), never from
    /// a message alone: a late frame of an old life cannot switch back.
    fn admit(&mut self, from: &NodeId, now_ms: u64, handshake: bool) -> bool {
        let Some(p) = self.peers.get_mut(&from.name) else {
            return false;
        };
        match p.gen {
            Some(g) if g == from.generation => {}
            Some(_) if !handshake => return false,
            Some(_) => {
                info!(peer = %from, "member restarted with a new generation");
                p.gen = Some(from.generation);
                p.out = OutLog::fresh();
                p.held.clear();
                p.in_seq = 0;
                p.ready = false;
                p.connected = false;
                let acts = self.detector.new_generation(&from.name, now_ms);
                self.run_actions(acts, now_ms);
                self.check_pending(now_ms);
            }
            None => p.gen = Some(from.generation),
        }
        let acts = self.detector.heard(&from.name, now_ms);
        self.run_actions(acts, now_ms);
        true
    }

    /// The runtime's writer to `peer` is full (the peer does not read): stop
    /// handing it deltas for a moment; they stay in the log and go out again
    /// from the last acknowledgement.
    pub fn writer_full(&mut self, peer: &str, now_ms: u64) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.out.sent_upto = p.out.acked;
            p.hold_until_ms = now_ms + WRITER_FULL_PAUSE_MS;
        }
    }

    /// A peer dialed us and proved the secret: its generation is its current life.
    pub fn on_inbound_up(&mut self, peer: &NodeId, now_ms: u64) {
        self.admit(peer, now_ms, true);
    }

    pub fn on_outbound_up(&mut self, peer: &NodeId, ready: bool, now_ms: u64) {
        if !self.admit(peer, now_ms, true) {
            return;
        }
        if let Some(p) = self.peers.get_mut(&peer.name) {
            p.connected = true;
            p.settled = true;
            p.refused = false;
            p.silent = false;
            p.ready = ready;
            p.ack_due = p.in_seq > 0;
            // Resend everything not acknowledged; the receiver drops duplicates.
            p.out.sent_upto = p.out.acked;
            let held = std::mem::take(&mut p.held);
            self.outbox.extend(held.into_iter().map(|msg| Output::Send {
                to: peer.name.clone(),
                msg,
            }));
        }
        self.outbox.push(Output::Send {
            to: peer.name.clone(),
            msg: PeerMsg::Heartbeat {
                ready: self.is_ready(),
            },
        });
        // Our clock right away, so the peer can judge it before anything is stored.
        let hlc = self.clock.now(now_ms);
        self.outbox.push(Output::Send {
            to: peer.name.clone(),
            msg: PeerMsg::Clock { hlc },
        });
    }

    /// Our connection to `peer` failed or broke. `refused` means the peer
    /// answered but turned our handshake down: it is running (perhaps without
    /// us in its member list yet), so a starting member must wait for it.
    pub fn on_outbound_down(&mut self, peer: &str, down: Down, now_ms: u64) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.connected = false;
            p.refused = down == Down::Refused;
            p.silent = down == Down::Silent;
            // Nothing there (or the connection broke): the peer no longer
            // holds the start back. One that refused us or is silent may hold
            // sessions, so the start waits for it.
            if down == Down::Lost {
                p.settled = true;
            }
        }
        let helpers = self.helpers(peer);
        let acts = self.detector.connection_lost(peer, now_ms, &helpers);
        self.run_actions(acts, now_ms);
    }

    pub fn on_inbound_closed(&mut self, peer: &NodeId, now_ms: u64) {
        let current = self
            .peers
            .get(&peer.name)
            .is_some_and(|p| p.gen == Some(peer.generation));
        if current {
            let helpers = self.helpers(&peer.name);
            let acts = self.detector.connection_lost(&peer.name, now_ms, &helpers);
            self.run_actions(acts, now_ms);
        }
    }

    pub fn on_probe_result(
        &mut self,
        target: &str,
        for_peer: Option<String>,
        ok: bool,
        now_ms: u64,
    ) {
        match for_peer {
            Some(req) => self.send(
                &req,
                PeerMsg::PingResp {
                    target: target.to_owned(),
                    alive: ok,
                },
            ),
            None => {
                let acts = self.detector.direct_result(target, ok, now_ms);
                self.run_actions(acts, now_ms);
            }
        }
    }

    fn helpers(&self, except: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .peers
            .iter()
            .filter(|(n, p)| {
                n.as_str() != except
                    && p.connected
                    && self.detector.state(n) == Some(MemberState::Alive)
            })
            .map(|(n, _)| n.clone())
            .collect();
        // Spread indirect probes instead of always asking the first member.
        let len = v.len();
        if len > 1 {
            let r = (self.rng_peek() as usize) % len;
            v.rotate_left(r);
        }
        v
    }

    fn run_actions(&mut self, acts: Vec<Action>, now_ms: u64) {
        for a in acts {
            match a {
                Action::DirectProbe { target } => self.outbox.push(Output::Probe {
                    target,
                    for_peer: None,
                }),
                Action::IndirectProbe { helper, target } => {
                    self.send(&helper, PeerMsg::PingReq { target });
                }
                Action::Changed {
                    peer,
                    from,
                    to,
                    reason,
                } => {
                    match to {
                        MemberState::Dead
                            if self.peers.get(&peer).is_some_and(|p| p.gen.is_none()) =>
                        {
                            // Never seen in this life of ours: not a failure we detected.
                            info!(peer = %peer, reason, "member not reachable");
                        }
                        MemberState::Dead => {
                            self.stats.detections += 1;
                            warn!(peer = %peer, from = from.as_str(), reason, "member declared dead");
                        }
                        MemberState::Left => info!(peer = %peer, reason, "member left"),
                        MemberState::Suspect => info!(peer = %peer, reason, "member suspected"),
                        MemberState::Alive => {
                            info!(peer = %peer, from = from.as_str(), reason, "member alive");
                            if from == MemberState::Dead {
                                self.ae_wanted.insert(peer.clone());
                            }
                        }
                    }
                    if matches!(to, MemberState::Dead | MemberState::Left) {
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.out.clear();
                            p.held.clear();
                            p.ready = false;
                        }
                    }
                    self.check_pending(now_ms);
                }
            }
        }
    }

    fn send(&mut self, to: &str, msg: PeerMsg) {
        let live = self.detector.state(to).is_some_and(|s| s.is_live());
        let Some(p) = self.peers.get_mut(to) else {
            return;
        };
        if p.connected {
            self.outbox.push(Output::Send {
                to: to.to_owned(),
                msg,
            });
        } else if live {
            if p.held.len() >= HELD_MAX {
                p.held.remove(0);
            }
            p.held.push(msg);
        }
    }

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
            PeerMsg::Ack { epoch, upto } => {
                if let Some(p) = self.peers.get_mut(&name) {
                    // An acknowledgement of an older stream says nothing about this one.
                    if epoch == p.out.epoch && upto > p.out.acked && upto < p.out.next_seq {
                        p.out.acked = upto;
                        p.out.progress_ms = now_ms;
                        while p.out.unacked.front().is_some_and(|(s, _, _)| *s <= upto) {
                            if let Some((_, _, sz)) = p.out.unacked.pop_front() {
                                p.out.bytes -= sz;
                            }
                        }
                        p.out.sent_upto = p.out.sent_upto.max(upto);
                    }
                }
                self.check_pending(now_ms);
            }
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
            } => {
                let cap = (max_bytes as usize).clamp(1024, self.cfg.max_frame_bytes / 2);
                let (states, next) = self.store.chunk_after(cursor.as_ref(), cap);
                let total = (self.store.live_count() + self.store.tombstone_count()) as u64;
                self.send(
                    &name,
                    PeerMsg::TransferChunk {
                        transfer,
                        states,
                        next,
                        total,
                    },
                );
            }
            PeerMsg::TransferChunk {
                transfer,
                states,
                next,
                total,
            } => self.on_chunk(&name, transfer, states, next, total, now_ms),
            PeerMsg::AeDigest { round, buckets } => {
                let mine = self.store.bucket_digest();
                let diff: Vec<u16> = (0..BUCKETS)
                    .filter(|i| buckets.get(*i).copied() != Some(mine[*i]))
                    .map(|i| i as u16)
                    .collect();
                if !diff.is_empty() {
                    let entries = self.store.bucket_entries(&diff, 100_000);
                    self.send(
                        &name,
                        PeerMsg::AeDetail {
                            round,
                            buckets: diff,
                            entries,
                        },
                    );
                }
            }
            PeerMsg::AeDetail {
                round: _,
                buckets,
                entries,
            } => self.on_ae_detail(&name, buckets, entries),
            PeerMsg::AePull { ids } => {
                let states: Vec<SessionState> =
                    ids.iter().filter_map(|id| self.store.state(id)).collect();
                self.send_states(&name, states);
            }
            PeerMsg::AeStates { states } => {
                let skewed = self.clock_skew().is_some();
                for st in states {
                    if let Some(v) = max_hlc(&st) {
                        if !self.accept_remote(&name, v, skewed, now_ms) {
                            continue;
                        }
                    }
                    if let Err(e) = self.store.check_remote_state(&st) {
                        self.refuse_over_limits(&name, &e);
                        continue;
                    }
                    if self.store.merge(st, now_ms) == Applied::Changed {
                        self.stats.ae_repairs += 1;
                    }
                }
            }
        }
    }

    fn on_deltas(
        &mut self,
        name: &str,
        epoch: u64,
        first_seq: u64,
        deltas: Vec<Arc<Delta>>,
        now_ms: u64,
    ) {
        let Some(p) = self.peers.get_mut(name) else {
            return;
        };
        if epoch != p.in_epoch {
            // A new stream from this peer (it forgot us and met us again, or
            // restarted): count from its start, not from the old stream's end.
            if p.in_epoch != 0 {
                debug!(peer = %name, "new delta stream from peer");
            }
            p.in_epoch = epoch;
            p.in_seq = 0;
        }
        let Some(last) = first_seq
            .checked_add(deltas.len() as u64)
            .and_then(|e| e.checked_sub(1))
        else {
            return;
        };
        if deltas.is_empty() || last <= p.in_seq {
            p.ack_due = true;
            return;
        }
        if first_seq > p.in_seq + 1 {
            self.stats.seq_gaps += 1;
            debug!(peer = %name, expected = p.in_seq + 1, got = first_seq, "gap in delta stream; scheduling anti-entropy");
            self.ae_wanted.insert(name.to_owned());
        }
        let skip = (p.in_seq + 1).saturating_sub(first_seq) as usize;
        p.in_seq = last;
        p.ack_due = true;
        let skewed = self.clock_skew().is_some();
        for d in deltas.into_iter().skip(skip) {
            // Refused deltas still count as received: the stream moves on, and
            // the peer, whose clock is wrong, is not ready and takes no writes.
            if !self.accept_remote(name, d.hlc, skewed, now_ms) {
                continue;
            }
            if let Err(e) = self.store.check_remote_delta(&d) {
                self.refuse_over_limits(name, &e);
                continue;
            }
            self.store.apply(&d, now_ms);
            self.stats.deltas_applied += 1;
        }
    }

    fn send_states(&mut self, to: &str, states: Vec<SessionState>) {
        let max = self.cfg.transfer_chunk_bytes.max(1024);
        let mut batch = Vec::new();
        let mut bytes = 0;
        for st in states {
            bytes += 64
                + match &st.entry {
                    crate::core::store::Entry::Live(s) => s.payload_bytes(),
                    _ => 0,
                };
            batch.push(st);
            if bytes >= max {
                self.send(
                    to,
                    PeerMsg::AeStates {
                        states: std::mem::take(&mut batch),
                    },
                );
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.send(to, PeerMsg::AeStates { states: batch });
        }
    }

    fn on_ae_detail(&mut self, name: &str, buckets: Vec<u16>, theirs: Vec<(SessionId, u64)>) {
        let mine: HashMap<SessionId, u64> = self
            .store
            .bucket_entries(&buckets, 100_000)
            .into_iter()
            .collect();
        let theirs_map: HashMap<&SessionId, u64> = theirs.iter().map(|(i, h)| (i, *h)).collect();
        let push: Vec<SessionState> = mine
            .iter()
            .filter(|(id, h)| theirs_map.get(id) != Some(h))
            .filter_map(|(id, _)| self.store.state(id))
            .collect();
        let pull: Vec<SessionId> = theirs
            .iter()
            .filter(|(id, h)| mine.get(id) != Some(h))
            .map(|(id, _)| id.clone())
            .collect();
        if !push.is_empty() || !pull.is_empty() {
            debug!(peer = %name, push = push.len(), pull = pull.len(), "anti-entropy found differences");
        }
        self.send_states(name, push);
        if !pull.is_empty() {
            self.send(name, PeerMsg::AePull { ids: pull });
        }
    }

    // ---- state transfer ---------------------------------------------------------

    fn transfer_candidates(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(n, p)| {
                p.connected && p.ready && self.detector.state(n).is_some_and(|s| s.is_live())
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn start_transfer(
        &mut self,
        source: String,
        cursor: Option<SessionId>,
        now_ms: u64,
        tried: BTreeSet<String>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        info!(source = %source, resume = cursor.is_some(), "state transfer started");
        let started_ms = self.transfer.as_ref().map_or(now_ms, |t| t.started_ms);
        let mut tried = tried;
        tried.insert(source.clone());
        self.phase = Phase::Transferring {
            source: source.clone(),
            received: self.stats.transfer_sessions,
            total: self.stats.transfer_total,
        };
        self.send(
            &source,
            PeerMsg::TransferPull {
                transfer: id,
                cursor: cursor.clone(),
                max_bytes: self.cfg.transfer_chunk_bytes as u32,
            },
        );
        self.transfer = Some(Transfer {
            id,
            source,
            cursor,
            last_progress_ms: now_ms,
            started_ms,
            tried,
        });
    }

    fn on_chunk(
        &mut self,
        name: &str,
        transfer: u64,
        states: Vec<SessionState>,
        next: Option<SessionId>,
        total: u64,
        now_ms: u64,
    ) {
        match self.transfer.as_ref() {
            Some(t) if t.id == transfer && t.source == name => {}
            _ => return,
        }
        let n = states.len() as u64;
        let skewed = self.clock_skew().is_some();
        for st in states {
            if let Some(v) = max_hlc(&st) {
                if !self.accept_remote(name, v, skewed, now_ms) {
                    continue;
                }
            }
            if let Err(e) = self.store.check_remote_state(&st) {
                self.refuse_over_limits(name, &e);
                continue;
            }
            self.store.merge(st, now_ms);
        }
        self.stats.transfer_sessions += n;
        self.stats.transfer_total = total;
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        t.last_progress_ms = now_ms;
        match next {
            Some(cursor) => {
                t.cursor = Some(cursor.clone());
                let id = t.id;
                self.phase = Phase::Transferring {
                    source: name.to_owned(),
                    received: self.stats.transfer_sessions,
                    total,
                };
                if now_ms.saturating_sub(self.last_progress_log_ms) >= 1_000 {
                    self.last_progress_log_ms = now_ms;
                    info!(received = self.stats.transfer_sessions, total, source = %name, "state transfer progress");
                }
                let max_bytes = self.cfg.transfer_chunk_bytes as u32;
                self.send(
                    name,
                    PeerMsg::TransferPull {
                        transfer: id,
                        cursor: Some(cursor),
                        max_bytes,
                    },
                );
            }
            None => {
                self.stats.transfer_ms = now_ms.saturating_sub(t.started_ms);
                self.transfer = None;
                self.phase = Phase::Ready;
                info!(
                    source = %name,
                    entries = self.stats.transfer_sessions,
                    ms = self.stats.transfer_ms,
                    "state transfer complete; member is ready"
                );
            }
        }
    }

    fn tick_startup(&mut self, now_ms: u64) {
        match self.phase {
            Phase::Starting => {
                let candidates = self.transfer_candidates();
                if let Some(src) = candidates.first().cloned() {
                    self.start_transfer(src, None, now_ms, BTreeSet::new());
                    return;
                }
                // Go ready empty only when every peer was reached (and none is
                // ready) or is unreachable: a cold cluster. A peer that refused us
                // is running and may hold sessions, so wait for it.
                let all_settled = self.peers.iter().all(|(n, p)| {
                    !p.refused
                        && !p.silent
                        && (p.settled || matches!(self.detector.state(n), Some(MemberState::Left)))
                });
                let waited_ms = now_ms.saturating_sub(self.started_ms);
                let waited = waited_ms >= self.cfg.startup_wait_ms;
                let silent: Vec<String> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.silent)
                    .map(|(n, _)| n.clone())
                    .collect();
                if all_settled && (waited || self.peers.values().all(|p| p.settled)) {
                    info!(
                        peers = self.peers.len(),
                        "no ready peer to transfer from; starting with an empty store"
                    );
                    self.phase = Phase::Ready;
                } else if !silent.is_empty()
                    && waited_ms >= self.cfg.silent_peer_wait_ms
                    && self.peers.values().all(|p| !p.refused)
                {
                    // Every peer that may hold sessions is alive but hung. Serving
                    // nothing forever helps no one either: after the bound, serve
                    // what comes (an empty store) and say so loudly.
                    error!(
                        ?silent,
                        waited_ms,
                        "peers accept connections but do not answer (hung?); starting with an EMPTY store: sessions they hold are not served until they recover and anti-entropy repairs"
                    );
                    self.stats.started_empty_with_silent_peers = 1;
                    self.phase = Phase::Ready;
                } else if waited && now_ms.saturating_sub(self.last_stall_log_ms) > 5_000 {
                    self.last_stall_log_ms = now_ms;
                    let refused: Vec<&String> = self
                        .peers
                        .iter()
                        .filter(|(_, p)| p.refused)
                        .map(|(n, _)| n)
                        .collect();
                    warn!(?refused, ?silent, "still waiting for peers before deciding on state transfer (not ready meanwhile)");
                }
            }
            Phase::Transferring { .. } => {
                let Some(t) = self.transfer.as_ref() else {
                    return;
                };
                let src_ok = self.peers.get(&t.source).is_some_and(|p| p.connected)
                    && self.detector.state(&t.source).is_some_and(|s| s.is_live());
                let stalled =
                    now_ms.saturating_sub(t.last_progress_ms) > self.cfg.transfer_stall_ms;
                if src_ok && !stalled {
                    return;
                }
                let candidates = self.transfer_candidates();
                let untried: Vec<&String> = candidates
                    .iter()
                    .filter(|c| !t.tried.contains(*c))
                    .collect();
                let pick = untried.first().map(|s| (*s).clone()).or_else(|| {
                    // Everyone was tried: go round again, preferring someone other than the failed source.
                    candidates
                        .iter()
                        .find(|c| **c != t.source)
                        .or(candidates.first())
                        .cloned()
                });
                match pick {
                    Some(next) => {
                        warn!(
                            from = %t.source,
                            to = %next,
                            reason = if stalled { "stalled" } else { "source lost" },
                            "state transfer retrying with another member"
                        );
                        let (cursor, tried) = (t.cursor.clone(), t.tried.clone());
                        self.stats.transfer_retries += 1;
                        self.start_transfer(next, cursor, now_ms, tried);
                    }
                    None => {
                        if now_ms.saturating_sub(self.last_stall_log_ms) > 5_000 {
                            self.last_stall_log_ms = now_ms;
                            warn!(source = %t.source, "state transfer has no live ready source; staying not ready");
                        }
                    }
                }
            }
            _ => {}
        }
    }

    // ---- local API ------------------------------------------------------

    /// Reads a session; `touch` records an access (replicated coalesced).
    pub fn read(
        &mut self,
        id: &SessionId,
        touch: bool,
        now_ms: u64,
    ) -> Result<Session, WriteError> {
        self.check_serving()?;
        let grace = self.cfg.touch_flush_ms;
        let s = self.store.get(id, now_ms, grace)?.clone();
        if touch && now_ms > s.last_accessed_ms {
            let d = Delta {
                id: id.clone(),
                hlc: self.clock.now(now_ms),
                created_ms: s.created_ms,
                last_accessed_ms: now_ms,
                max_inactive_ms: s.max_inactive_ms,
                ops: vec![Op::Touch],
            };
            self.store.apply(&d, now_ms);
            self.dirty_touch.insert(id.clone());
        }
        Ok(s)
    }

    pub fn list(&self, cursor: Option<&SessionId>, limit: usize, now_ms: u64) -> Vec<SessionId> {
        self.store
            .list(cursor, limit, now_ms, self.cfg.touch_flush_ms)
    }

    pub fn check_serving(&self) -> Result<(), WriteError> {
        if self.phase != Phase::Leaving {
            // Whatever the phase, a wrong clock is the reason that matters.
            if let Some(offset_ms) = self.clock_skew() {
                return Err(WriteError::ClockSkew {
                    offset_ms,
                    bound_ms: self.cfg.max_clock_skew_ms,
                });
            }
        }
        match self.phase {
            Phase::Ready => Ok(()),
            Phase::Leaving => Err(WriteError::Leaving),
            _ => Err(WriteError::NotReady),
        }
    }

    /// A local write. `Ok(true)` means it completed; `Ok(false)` means an
    /// `Output::WriteDone` for `write` will follow.
    pub fn write(
        &mut self,
        write: u64,
        id: SessionId,
        ops: Vec<Op>,
        max_inactive_ms: Option<u64>,
        mode: Option<SendMode>,
        now_ms: u64,
    ) -> Result<bool, WriteError> {
        let grace = self.cfg.touch_flush_ms;
        self.write_with(write, id, ops, max_inactive_ms, mode, now_ms, grace)
    }

    /// `write` with an explicit expiry grace: the Redis endpoint uses 0, since
    /// its keys expire at exact absolute times.
    #[allow(clippy::too_many_arguments)]
    pub fn write_with(
        &mut self,
        write: u64,
        id: SessionId,
        mut ops: Vec<Op>,
        max_inactive_ms: Option<u64>,
        mode: Option<SendMode>,
        now_ms: u64,
        grace: u64,
    ) -> Result<bool, WriteError> {
        self.check_serving()?;
        let existing = self.store.get(&id, now_ms, grace).ok();
        let created_ms = existing.map_or(now_ms, |s| s.created_ms);
        let current_mi = existing.map_or(self.cfg.default_max_inactive_ms, |s| s.max_inactive_ms);
        let creating = ops.contains(&Op::Create);
        if (max_inactive_ms.is_some() || creating) && !ops.contains(&Op::MaxInactive) {
            ops.push(Op::MaxInactive);
        }
        let d = Delta {
            id,
            hlc: self.clock.now(now_ms),
            created_ms,
            last_accessed_ms: now_ms,
            max_inactive_ms: max_inactive_ms.unwrap_or(current_mi),
            ops,
        };
        self.store.check_local(&d, now_ms, grace)?;
        // An expired session under the same id is replaced, not merged into.
        if creating {
            self.store.remove_if_expired(&d.id, now_ms, grace);
        }
        self.store.apply(&d, now_ms);
        self.dirty_touch.remove(&d.id);
        let waits = self.replicate(d, now_ms);
        let mode = mode.unwrap_or(self.cfg.send);
        let backpressure = self
            .peers
            .values()
            .any(|p| p.out.bytes > self.cfg.max_queue_bytes);
        if (mode == SendMode::Async || waits.is_empty()) && !backpressure {
            return Ok(true);
        }
        self.pending.push(PendingWrite {
            write,
            waits: if mode == SendMode::Sync {
                waits
            } else {
                Vec::new()
            },
            backpressure,
            deadline_ms: now_ms + self.cfg.write_timeout_ms,
        });
        Ok(false)
    }

    /// Queues a delta for every live member; returns what a sync write waits for.
    fn replicate(&mut self, d: Delta, now_ms: u64) -> Vec<(String, Option<Generation>, u64)> {
        let size = d.size_hint();
        // One copy, shared by every peer's log and message.
        let d = Arc::new(d);
        let mut waits = Vec::new();
        let hard_cap = self.cfg.max_queue_bytes.saturating_mul(2);
        for (name, p) in self.peers.iter_mut() {
            if !self.detector.state(name).is_some_and(|s| s.is_live()) {
                continue;
            }
            if p.out.bytes + size > hard_cap {
                // Far past the bound: stop buffering for this member and let
                // anti-entropy repair it once it keeps up again.
                warn!(peer = %name, bytes = p.out.bytes, "replication queue overflow; dropping backlog, anti-entropy will repair");
                self.stats.queue_overflows += 1;
                p.out.clear();
                self.ae_wanted.insert(name.clone());
            }
            let seq = p.out.next_seq;
            p.out.next_seq += 1;
            if p.out.unacked.is_empty() {
                p.out.progress_ms = now_ms;
            }
            p.out.unacked.push_back((seq, d.clone(), size));
            p.out.bytes += size;
            waits.push((name.clone(), p.gen, seq));
        }
        waits
    }

    fn check_pending(&mut self, now_ms: u64) {
        if self.pending.is_empty() {
            return;
        }
        let bound = self.cfg.max_queue_bytes;
        let backlog = self.peers.iter().any(|(n, p)| {
            p.out.bytes > bound && self.detector.state(n).is_some_and(|s| s.is_live())
        });
        let peers = &self.peers;
        let det = &self.detector;
        let mut done = Vec::new();
        self.pending.retain(|w| {
            let acked = w
                .waits
                .iter()
                .all(|(name, gen, seq)| match peers.get(name) {
                    None => true,
                    Some(p) => {
                        p.gen != *gen && gen.is_some()
                            || !det.state(name).is_some_and(|s| s.is_live())
                            || p.out.acked >= *seq
                    }
                });
            let clear = !w.backpressure || !backlog;
            if acked && clear {
                done.push(Output::WriteDone {
                    write: w.write,
                    result: Ok(()),
                });
                false
            } else if now_ms >= w.deadline_ms {
                done.push(Output::WriteDone {
                    write: w.write,
                    result: Err(WriteError::Timeout(0)),
                });
                false
            } else {
                true
            }
        });
        for o in done {
            if let Output::WriteDone {
                write,
                result: Err(_),
            } = o
            {
                self.stats.write_timeouts += 1;
                self.outbox.push(Output::WriteDone {
                    write,
                    result: Err(WriteError::Timeout(self.cfg.write_timeout_ms)),
                });
            } else {
                self.outbox.push(o);
            }
        }
    }

    // ---- time -----------------------------------------------------------

    pub fn tick(&mut self, now_ms: u64) {
        let helpers_all: Vec<String> = self
            .peers
            .iter()
            .filter(|(n, p)| p.connected && self.detector.state(n) == Some(MemberState::Alive))
            .map(|(n, _)| n.clone())
            .collect();
        let acts = self.detector.tick(now_ms, &helpers_all);
        self.run_actions(acts, now_ms);

        if now_ms.saturating_sub(self.last_heartbeat_ms) >= self.cfg.heartbeat_interval_ms {
            self.last_heartbeat_ms = now_ms;
            let ready = self.is_ready();
            let hlc = self.clock.now(now_ms);
            let names: Vec<String> = self
                .peers
                .iter()
                .filter(|(_, p)| p.connected)
                .map(|(n, _)| n.clone())
                .collect();
            for n in names {
                self.outbox.push(Output::Send {
                    to: n.clone(),
                    msg: PeerMsg::Heartbeat { ready },
                });
                self.outbox.push(Output::Send {
                    to: n,
                    msg: PeerMsg::Clock { hlc },
                });
            }
        }

        self.tick_startup(now_ms);

        // Nothing acknowledged for a while although deltas are outstanding:
        // resend them (the receiver drops duplicates).
        for p in self.peers.values_mut() {
            if p.connected
                && !p.out.unacked.is_empty()
                && now_ms.saturating_sub(p.out.progress_ms) >= RESEND_AFTER_MS
            {
                if p.out.sent_upto > p.out.acked {
                    debug!("resending unacknowledged deltas");
                }
                p.out.sent_upto = p.out.acked;
                p.out.progress_ms = now_ms;
            }
        }

        if now_ms.saturating_sub(self.last_touch_flush_ms) >= self.cfg.touch_flush_ms {
            self.last_touch_flush_ms = now_ms;
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

        if now_ms.saturating_sub(self.last_sweep_ms) >= self.cfg.sweep_interval_ms {
            self.last_sweep_ms = now_ms;
            let n = self
                .store
                .sweep(now_ms, self.cfg.touch_flush_ms, self.cfg.tombstone_ttl_ms);
            self.stats.expired += n as u64;
            // What was stamped while a clock was wrong (ours, before it was
            // corrected) would win every later merge: drop it and let
            // anti-entropy bring the cluster's version back.
            if self.clock_skew().is_none() {
                let dropped = self
                    .store
                    .drop_beyond(now_ms.saturating_add(self.cfg.max_clock_skew_ms));
                if dropped > 0 {
                    warn!(entries = dropped, "dropped entries stamped beyond this member's clock bound; anti-entropy repairs them");
                    self.stats.clock_quarantined += dropped as u64;
                    let peers: Vec<String> = self.peers.keys().cloned().collect();
                    self.ae_wanted.extend(peers);
                }
            }
        }

        if self.is_ready() && (now_ms >= self.next_ae_ms || !self.ae_wanted.is_empty()) {
            let targets: Vec<String> = if now_ms >= self.next_ae_ms {
                let jitter = self.rng_next() % (self.cfg.anti_entropy_interval_ms / 5 + 1);
                self.next_ae_ms = now_ms + self.cfg.anti_entropy_interval_ms
                    - self.cfg.anti_entropy_interval_ms / 10
                    + jitter;
                let mut c = self.transfer_candidates();
                c.retain(|n| !self.ae_wanted.contains(n));
                let pick = if c.is_empty() {
                    None
                } else {
                    Some(c[(self.rng_next() as usize) % c.len()].clone())
                };
                pick.into_iter()
                    .chain(std::mem::take(&mut self.ae_wanted))
                    .collect()
            } else {
                std::mem::take(&mut self.ae_wanted).into_iter().collect()
            };
            let buckets = self.store.bucket_digest();
            for t in targets {
                if self.peers.get(&t).is_some_and(|p| p.connected) {
                    self.stats.ae_rounds += 1;
                    let round = self.next_id;
                    self.next_id += 1;
                    self.send(
                        &t,
                        PeerMsg::AeDigest {
                            round,
                            buckets: buckets.clone(),
                        },
                    );
                } else if self.detector.state(&t).is_some_and(|s| s.is_live()) {
                    // Not connected yet: try again on a later tick.
                    self.ae_wanted.insert(t);
                }
            }
        }

        self.check_pending(now_ms);
    }

    // ---- leaving -----------------------------------------------------------

    /// Stops serving the app; replication keeps draining.
    pub fn begin_leave(&mut self) {
        self.phase = Phase::Leaving;
    }

    /// True once every live, connected member has acknowledged everything.
    pub fn flushed(&self) -> bool {
        self.peers.iter().all(|(n, p)| {
            p.out.unacked.is_empty()
                || !p.connected
                || !self.detector.state(n).is_some_and(|s| s.is_live())
        })
    }

    /// True once every connected, live member confirmed our `Leave`.
    pub fn leave_acknowledged(&self) -> bool {
        self.peers.iter().all(|(n, p)| {
            p.left_ack || !p.connected || !self.detector.state(n).is_some_and(|s| s.is_live())
        })
    }

    pub fn announce_leave(&mut self) {
        let names: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            self.outbox.push(Output::Send {
                to: n,
                msg: PeerMsg::Leave,
            });
        }
    }
}

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
