//! The messages members exchange once a connection is authenticated. The core
//! produces and consumes them; `net::frame` puts them on the wire.

use crate::core::hlc::Hlc;
use crate::core::identity::SessionId;
use crate::core::store::{Delta, SessionState};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    Heartbeat {
        ready: bool,
    },
    /// Deltas numbered `first_seq..` in the sender's stream `epoch` to this
    /// receiver. A stream is the sender's log for one receiver; a new epoch
    /// (the sender forgot the receiver and met it again) numbers from 1 anew.
    Deltas {
        epoch: u64,
        first_seq: u64,
        deltas: Vec<std::sync::Arc<Delta>>,
    },
    /// Cumulative: every delta of stream `epoch` up to `upto` is applied.
    Ack {
        epoch: u64,
        upto: u64,
    },
    /// Asks the receiver to probe `target` on the sender's behalf.
    PingReq {
        target: String,
    },
    PingResp {
        target: String,
        alive: bool,
    },
    TransferPull {
        transfer: u64,
        cursor: Option<SessionId>,
        max_bytes: u32,
    },
    /// `next == None` ends the transfer.
    TransferChunk {
        transfer: u64,
        states: Vec<SessionState>,
        next: Option<SessionId>,
        total: u64,
    },
    AeDigest {
        round: u64,
        buckets: Vec<u64>,
    },
    AeDetail {
        round: u64,
        buckets: Vec<u16>,
        entries: Vec<(SessionId, u64)>,
    },
    AePull {
        ids: Vec<SessionId>,
    },
    AeStates {
        states: Vec<SessionState>,
    },
    /// The sender is leaving on purpose; mark it `left` at once.
    Leave,
    /// The receiver of a `Leave` has marked the sender `left`.
    LeaveAck,
    /// The sender's clock, so receivers keep their HLC ahead of it.
    Clock {
        hlc: Hlc,
    },
    /// Backup mode: the receiver's copies of these sessions, please.
    Fetch {
        fetch: u64,
        ids: Vec<SessionId>,
    },
    /// The answer to `Fetch`: the sessions the sender has (tombstones too).
    Fetched {
        fetch: u64,
        states: Vec<SessionState>,
    },
    /// Backup mode: sessions the receiver now holds. `round` 0 asks for no
    /// acknowledgement; `done` ends what the sender had to hand over.
    Copies {
        round: u64,
        states: Vec<SessionState>,
        done: bool,
    },
    /// Every session of round `round` is merged.
    CopiesAck {
        round: u64,
    },
}

impl PeerMsg {
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMsg::Heartbeat { .. } => "heartbeat",
            PeerMsg::Deltas { .. } => "deltas",
            PeerMsg::Ack { .. } => "ack",
            PeerMsg::PingReq { .. } => "ping_req",
            PeerMsg::PingResp { .. } => "ping_resp",
            PeerMsg::TransferPull { .. } => "transfer_pull",
            PeerMsg::TransferChunk { .. } => "transfer_chunk",
            PeerMsg::AeDigest { .. } => "ae_digest",
            PeerMsg::AeDetail { .. } => "ae_detail",
            PeerMsg::AePull { .. } => "ae_pull",
            PeerMsg::AeStates { .. } => "ae_states",
            PeerMsg::Leave => "leave",
            PeerMsg::LeaveAck => "leave_ack",
            PeerMsg::Clock { .. } => "clock",
            PeerMsg::Fetch { .. } => "fetch",
            PeerMsg::Fetched { .. } => "fetched",
            PeerMsg::Copies { .. } => "copies",
            PeerMsg::CopiesAck { .. } => "copies_ack",
        }
    }
}
