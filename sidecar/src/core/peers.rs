//! The peers: who they are (generation), whether we are connected, what the
//! failure detector says, and what the runtime reports about connections and
//! probes. Detector actions turn into probes, indirect probe requests and
//! state changes here.

use super::replication::{InStream, OutLog};
use super::{Core, Down, Output};
use crate::core::detector::{Action, MemberState};
use crate::core::identity::{Generation, NodeId};
use crate::core::message::PeerMsg;
use std::collections::BTreeSet;
use tracing::{info, warn};

/// Messages held for a live peer we are not connected to yet, at most.
const HELD_MAX: usize = 16;

#[derive(Debug)]
pub(super) struct Peer {
    pub(super) gen: Option<Generation>,
    pub(super) connected: bool,
    pub(super) ready: bool,
    pub(super) settled: bool,
    /// The peer answered but refused our handshake (it may not know us yet).
    pub(super) refused: bool,
    /// The peer accepted our connection but never answered the handshake.
    pub(super) silent: bool,
    pub(super) left_ack: bool,
    /// Replies held until our connection to the peer is up (a joiner's
    /// transfer request can arrive before we have dialed it).
    pub(super) held: Vec<PeerMsg>,
    pub(super) out: OutLog,
    /// The peer's stream to us: its epoch and the last sequence number applied.
    pub(super) inbound: InStream,
    /// The peer's clock minus ours, from its last `Clock` message.
    pub(super) clock_offset_ms: Option<i64>,
    /// Timestamps from this peer refused as too far ahead.
    pub(super) clock_refused: u64,
    /// Deltas and states from this peer refused for breaking the limits.
    pub(super) limits_refused: u64,
    /// No deltas are handed out for this peer before then (its writer was full).
    pub(super) hold_until_ms: u64,
}

impl Peer {
    pub(super) fn new() -> Self {
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
            inbound: InStream::default(),
            clock_offset_ms: None,
            clock_refused: 0,
            limits_refused: 0,
            hold_until_ms: 0,
        }
    }
}

impl Core {
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
    pub(super) fn admit(&mut self, from: &NodeId, now_ms: u64, handshake: bool) -> bool {
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
                p.inbound.reset();
                p.ready = false;
                p.connected = false;
                let acts = self.detector.new_generation(&from.name, now_ms);
                self.run_actions(acts, now_ms);
                self.check_pending(now_ms);
                self.backup_peer_restarted(&from.name);
            }
            None => {
                p.gen = Some(from.generation);
                self.backup_peer_restarted(&from.name);
            }
        }
        let acts = self.detector.heard(&from.name, now_ms);
        self.run_actions(acts, now_ms);
        true
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
            p.inbound.reconnected();
            // Resend everything not acknowledged; the receiver drops duplicates.
            p.out.rewind();
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

    pub(super) fn run_actions(&mut self, acts: Vec<Action>, now_ms: u64) {
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

    pub(super) fn send(&mut self, to: &str, msg: PeerMsg) {
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
}
