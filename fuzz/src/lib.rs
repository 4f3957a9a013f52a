//! What the fuzz targets share: a ready member's core, structure-aware
//! inputs (`arbitrary`), and a small model of the Redis subset for the
//! differential target.

use arbitrary::Arbitrary;
use bytes::Bytes;
use sessionmesh_sidecar::core::hlc::Hlc;
use sessionmesh_sidecar::core::identity::{Generation, NodeId, SessionId};
use sessionmesh_sidecar::core::message::PeerMsg;
use sessionmesh_sidecar::core::store::{Delta, Op};
use sessionmesh_sidecar::core::{Core, CoreConfig};
use std::collections::BTreeMap;
use std::sync::Arc;

pub mod model;

/// The time every target starts at (ms); far from 0 so expiries are real.
pub const T0: u64 = 1_700_000_000_000;

pub fn node(name: &str) -> NodeId {
    NodeId::new(name.into(), Generation(1))
}

/// A ready member `a` that knows peer `b` (connected and admitted).
pub fn ready_core() -> Core {
    let mut c = Core::new(node("a"), CoreConfig::default(), &["b".into()], T0);
    c.on_outbound_up(&node("b"), false, T0);
    c.tick(T0 + 2_000);
    c.drain(T0 + 2_000);
    c
}

/// A single ready member with no peers.
pub fn lone_core() -> Core {
    let mut c = Core::new(node("a"), CoreConfig::default(), &[], T0);
    c.tick(T0 + 1);
    c
}

/// A session id from a small alphabet, so inputs collide on the same keys.
#[derive(Debug, Clone, Arbitrary)]
pub struct Key(pub u8);

impl Key {
    pub fn text(&self) -> String {
        format!("k{}", self.0 % 8)
    }
    pub fn id(&self) -> SessionId {
        SessionId::key(self.text().as_bytes()).unwrap_or_else(|_| SessionId::random())
    }
}

#[derive(Debug, Clone, Arbitrary)]
pub enum FuzzOp {
    Create,
    Set {
        name: u8,
        value: Vec<u8>,
    },
    Remove {
        name: u8,
    },
    Touch,
    MaxInactive,
    Invalidate,
    Rename {
        to: Key,
    },
    Delete,
    /// A name no local client could write (empty, huge, odd bytes).
    SetRaw {
        name: String,
        value: Vec<u8>,
    },
}

impl FuzzOp {
    fn op(&self) -> Op {
        match self {
            FuzzOp::Create => Op::Create,
            FuzzOp::Set { name, value } => Op::Set {
                name: format!("attr{}", name % 4),
                value: Bytes::copy_from_slice(value),
            },
            FuzzOp::Remove { name } => Op::Remove {
                name: format!("attr{}", name % 4),
            },
            FuzzOp::Touch => Op::Touch,
            FuzzOp::MaxInactive => Op::MaxInactive,
            FuzzOp::Invalidate => Op::Invalidate,
            FuzzOp::Rename { to } => Op::Rename { to: to.id() },
            FuzzOp::Delete => Op::Delete,
            FuzzOp::SetRaw { name, value } => Op::Set {
                name: name.clone(),
                value: Bytes::copy_from_slice(value),
            },
        }
    }
}

#[derive(Debug, Clone, Arbitrary)]
pub struct FuzzDelta {
    pub key: Key,
    /// Offset of the timestamp from `T0`, both ways.
    pub wall_offset: i32,
    pub logical: u32,
    pub created_offset: i32,
    pub accessed_offset: i32,
    pub max_inactive_ms: u32,
    pub ops: Vec<FuzzOp>,
}

fn at(offset: i32) -> u64 {
    T0.saturating_add_signed(i64::from(offset))
}

impl FuzzDelta {
    pub fn delta(&self) -> Arc<Delta> {
        Arc::new(Delta {
            id: self.key.id(),
            hlc: Hlc {
                wall_ms: at(self.wall_offset),
                logical: self.logical,
                node: 2,
            },
            created_ms: at(self.created_offset),
            last_accessed_ms: at(self.accessed_offset),
            max_inactive_ms: u64::from(self.max_inactive_ms),
            ops: self.ops.iter().map(FuzzOp::op).collect(),
        })
    }
}

/// Messages a peer can send after authentication, built so that most of
/// them get past decoding and reach the core's checks.
#[derive(Debug, Clone, Arbitrary)]
pub enum FuzzMsg {
    Heartbeat {
        ready: bool,
    },
    Deltas {
        epoch: u8,
        first_seq: u16,
        deltas: Vec<FuzzDelta>,
    },
    Ack {
        epoch: u8,
        upto: u16,
    },
    PingReq {
        target: u8,
    },
    PingResp {
        target: u8,
        alive: bool,
    },
    TransferPull {
        transfer: u8,
        cursor: Option<Key>,
        max_bytes: u32,
    },
    TransferChunk {
        transfer: u8,
        deltas: Vec<FuzzDelta>,
        next: Option<Key>,
        total: u64,
    },
    AeDigest {
        round: u8,
        buckets: Vec<u64>,
    },
    AeDetail {
        round: u8,
        buckets: Vec<u16>,
        entries: Vec<(Key, u64)>,
    },
    AePull {
        ids: Vec<Key>,
    },
    AeStates {
        deltas: Vec<FuzzDelta>,
    },
    Leave,
    LeaveAck,
    Clock {
        wall_offset: i32,
    },
    /// Time passes on the member.
    Tick {
        ms: u16,
    },
}

/// Whole states for transfer and anti-entropy: a delta applied to an empty
/// store, taken back out.
fn states(deltas: &[FuzzDelta]) -> Vec<sessionmesh_sidecar::core::store::SessionState> {
    let mut scratch = sessionmesh_sidecar::core::store::Store::new(Default::default());
    let mut out = Vec::new();
    for d in deltas {
        let d = d.delta();
        scratch.apply(&d, T0);
        if let Some(st) = scratch.state(&d.id) {
            out.push(st);
        }
    }
    out
}

impl FuzzMsg {
    /// The message, or `None` for a tick.
    pub fn msg(&self) -> Option<PeerMsg> {
        let target = |t: &u8| if t % 2 == 0 { "a" } else { "b" }.to_owned();
        Some(match self {
            FuzzMsg::Heartbeat { ready } => PeerMsg::Heartbeat { ready: *ready },
            FuzzMsg::Deltas {
                epoch,
                first_seq,
                deltas,
            } => PeerMsg::Deltas {
                epoch: u64::from(*epoch % 3),
                first_seq: u64::from(*first_seq),
                deltas: deltas.iter().map(FuzzDelta::delta).collect(),
            },
            FuzzMsg::Ack { epoch, upto } => PeerMsg::Ack {
                epoch: u64::from(*epoch),
                upto: u64::from(*upto),
            },
            FuzzMsg::PingReq { target: t } => PeerMsg::PingReq { target: target(t) },
            FuzzMsg::PingResp { target: t, alive } => PeerMsg::PingResp {
                target: target(t),
                alive: *alive,
            },
            FuzzMsg::TransferPull {
                transfer,
                cursor,
                max_bytes,
            } => PeerMsg::TransferPull {
                transfer: u64::from(*transfer),
                cursor: cursor.as_ref().map(Key::id),
                max_bytes: *max_bytes,
            },
            FuzzMsg::TransferChunk {
                transfer,
                deltas,
                next,
                total,
            } => PeerMsg::TransferChunk {
                transfer: u64::from(*transfer),
                states: states(deltas),
                next: next.as_ref().map(Key::id),
                total: *total,
            },
            FuzzMsg::AeDigest { round, buckets } => PeerMsg::AeDigest {
                round: u64::from(*round),
                buckets: buckets.clone(),
            },
            FuzzMsg::AeDetail {
                round,
                buckets,
                entries,
            } => PeerMsg::AeDetail {
                round: u64::from(*round),
                buckets: buckets.clone(),
                entries: entries.iter().map(|(k, h)| (k.id(), *h)).collect(),
            },
            FuzzMsg::AePull { ids } => PeerMsg::AePull {
                ids: ids.iter().map(Key::id).collect(),
            },
            FuzzMsg::AeStates { deltas } => PeerMsg::AeStates {
                states: states(deltas),
            },
            FuzzMsg::Leave => PeerMsg::Leave,
            FuzzMsg::LeaveAck => PeerMsg::LeaveAck,
            FuzzMsg::Clock { wall_offset } => PeerMsg::Clock {
                hlc: Hlc {
                    wall_ms: at(*wall_offset),
                    logical: 0,
                    node: 2,
                },
            },
            FuzzMsg::Tick { .. } => return None,
        })
    }
}

/// Feeds messages from peer `b` to a ready core, with time passing, and
/// checks what must always hold.
pub fn run_peer_msgs(msgs: impl IntoIterator<Item = Option<PeerMsg>>, ticks: &[u16]) {
    let mut core = ready_core();
    let mut now = T0 + 2_000;
    let b = node("b");
    for (i, m) in msgs.into_iter().enumerate() {
        match m {
            Some(m) => core.on_peer_msg(&b, m, now),
            None => {
                now += u64::from(ticks.get(i).copied().unwrap_or(10));
                core.tick(now);
            }
        }
        let _ = core.drain(now);
        check_store(&core, now);
    }
}

/// What holds after anything: the store's counters agree with its contents,
/// and nothing in it breaks the limits.
pub fn check_store(core: &Core, now: u64) {
    let store = &core.store;
    let ids = core.list(None, usize::MAX, now);
    assert!(ids.len() <= store.live_count(), "list beyond live sessions");
    assert!(
        store.live_count() <= store.limits.max_sessions,
        "more sessions than the limit"
    );
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        *names.entry(id.as_str().to_owned()).or_default() += 1;
    }
    assert!(names.values().all(|n| *n == 1), "an id listed twice");
}
