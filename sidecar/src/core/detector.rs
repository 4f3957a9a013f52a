//! Failure detector: heartbeats -> suspicion -> confirmation by a direct probe
//! and indirect probes through other members -> dead.
//!
//! Plain state machine: callers pass `now_ms` and carry out the returned
//! actions. Invariants: a member is declared `Dead` only after its direct probe
//! failed and no indirect probe succeeded; `Left` is final for a generation; a
//! new generation always starts `Alive`.

use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Suspect,
    Dead,
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
        }
    }
    /// Members that receive replication traffic and count for sync acks.
    pub fn is_live(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

#[derive(Debug, Clone)]
pub struct DetectorConfig {
    /// Silence after which a member is suspected.
    pub suspect_after_ms: u64,
    /// How long probes may take before a suspect is declared dead.
    pub probe_timeout_ms: u64,
    /// Members asked to probe a suspect on our behalf.
    pub indirect_probes: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            suspect_after_ms: 500,
            probe_timeout_ms: 300,
            indirect_probes: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    DirectProbe {
        target: String,
    },
    IndirectProbe {
        helper: String,
        target: String,
    },
    Changed {
        peer: String,
        from: MemberState,
        to: MemberState,
        reason: &'static str,
    },
}

#[derive(Debug, Clone)]
struct Probe {
    started_ms: u64,
    direct_failed: bool,
    indirect_pending: usize,
}

#[derive(Debug, Clone)]
pub struct PeerHealth {
    pub state: MemberState,
    /// Whether anything came from the member since this one started: until
    /// then `Alive` is only the benefit of the doubt.
    pub heard: bool,
    pub last_heard_ms: u64,
    pub since_ms: u64,
    probe: Option<Probe>,
}

#[derive(Debug, Default)]
pub struct Detector {
    pub cfg: DetectorConfig,
    peers: BTreeMap<String, PeerHealth>,
}

impl Detector {
    pub fn new(cfg: DetectorConfig) -> Self {
        Detector {
            cfg,
            peers: BTreeMap::new(),
        }
    }

    /// Starts watching a member, alive as of `now_ms` (it gets a full
    /// `suspect_after` to show up).
    pub fn add(&mut self, peer: &str, now_ms: u64) {
        self.peers.entry(peer.to_owned()).or_insert(PeerHealth {
            state: MemberState::Alive,
            heard: false,
            last_heard_ms: now_ms,
            since_ms: now_ms,
            probe: None,
        });
    }

    /// How many members count as live without ever having been heard from.
    pub fn unheard_live(&self) -> usize {
        self.peers
            .values()
            .filter(|p| !p.heard && p.state.is_live())
            .count()
    }

    pub fn remove(&mut self, peer: &str) {
        self.peers.remove(peer);
    }

    pub fn get(&self, peer: &str) -> Option<&PeerHealth> {
        self.peers.get(peer)
    }

    pub fn state(&self, peer: &str) -> Option<MemberState> {
        self.peers.get(peer).map(|p| p.state)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &PeerHealth)> {
        self.peers.iter()
    }

    fn set(
        &mut self,
        peer: &str,
        to: MemberState,
        now_ms: u64,
        reason: &'static str,
        out: &mut Vec<Action>,
    ) {
        if let Some(p) = self.peers.get_mut(peer) {
            if p.state != to {
                out.push(Action::Changed {
                    peer: peer.to_owned(),
                    from: p.state,
                    to,
                    reason,
                });
                p.state = to;
                p.since_ms = now_ms;
            }
            if to != MemberState::Suspect {
                p.probe = None;
            }
        }
    }

    /// Any frame from the member. A suspect that speaks is alive again; a dead
    /// member of the same generation that speaks again (a healed partition) too.
    pub fn heard(&mut self, peer: &str, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(p) = self.peers.get_mut(peer) else {
            return out;
        };
        p.last_heard_ms = now_ms;
        p.heard = true;
        if matches!(p.state, MemberState::Suspect | MemberState::Dead) {
            self.set(peer, MemberState::Alive, now_ms, "heard from", &mut out);
        }
        out
    }

    /// A new life of the member (restart): alive, whatever the old one was.
    pub fn new_generation(&mut self, peer: &str, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(p) = self.peers.get_mut(peer) {
            p.last_heard_ms = now_ms;
            p.heard = true;
        }
        self.set(peer, MemberState::Alive, now_ms, "new generation", &mut out);
        out
    }

    /// The member announced it is leaving.
    pub fn left(&mut self, peer: &str, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.set(peer, MemberState::Left, now_ms, "announced leave", &mut out);
        out
    }

    /// The connection that carried the member's frames closed: suspect at once
    /// rather than waiting for heartbeats to go missing.
    pub fn connection_lost(&mut self, peer: &str, now_ms: u64, helpers: &[String]) -> Vec<Action> {
        match self.state(peer) {
            Some(MemberState::Alive) => self.suspect(peer, now_ms, helpers, "connection lost"),
            _ => Vec::new(),
        }
    }

    fn suspect(
        &mut self,
        peer: &str,
        now_ms: u64,
        helpers: &[String],
        reason: &'static str,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.set(peer, MemberState::Suspect, now_ms, reason, &mut out);
        let chosen: Vec<String> = helpers
            .iter()
            .filter(|h| h.as_str() != peer)
            .take(self.cfg.indirect_probes)
            .cloned()
            .collect();
        if let Some(p) = self.peers.get_mut(peer) {
            p.probe = Some(Probe {
                started_ms: now_ms,
                direct_failed: false,
                indirect_pending: chosen.len(),
            });
        }
        out.push(Action::DirectProbe {
            target: peer.to_owned(),
        });
        out.extend(chosen.into_iter().map(|helper| Action::IndirectProbe {
            helper,
            target: peer.to_owned(),
        }));
        out
    }

    /// Result of our own probe.
    pub fn direct_result(&mut self, peer: &str, ok: bool, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(p) = self.peers.get_mut(peer) else {
            return out;
        };
        let Some(probe) = p.probe.as_mut() else {
            return out;
        };
        if ok {
            p.last_heard_ms = now_ms;
            self.set(
                peer,
                MemberState::Alive,
                now_ms,
                "direct probe answered",
                &mut out,
            );
        } else {
            probe.direct_failed = true;
            if probe.indirect_pending == 0 {
                self.set(
                    peer,
                    MemberState::Dead,
                    now_ms,
                    "direct probe failed",
                    &mut out,
                );
            }
        }
        out
    }

    /// Result of a probe another member made for us.
    pub fn indirect_result(&mut self, peer: &str, ok: bool, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(p) = self.peers.get_mut(peer) else {
            return out;
        };
        let Some(probe) = p.probe.as_mut() else {
            return out;
        };
        if ok {
            p.last_heard_ms = now_ms;
            self.set(
                peer,
                MemberState::Alive,
                now_ms,
                "indirect probe answered",
                &mut out,
            );
        } else {
            probe.indirect_pending = probe.indirect_pending.saturating_sub(1);
            if probe.indirect_pending == 0 && probe.direct_failed {
                self.set(
                    peer,
                    MemberState::Dead,
                    now_ms,
                    "direct and indirect probes failed",
                    &mut out,
                );
            }
        }
        out
    }

    /// Time-driven transitions. `helpers` are live members that may probe for us.
    pub fn tick(&mut self, now_ms: u64, helpers: &[String]) -> Vec<Action> {
        let mut out = Vec::new();
        let cfg = self.cfg.clone();
        let mut to_suspect = Vec::new();
        let mut to_dead = Vec::new();
        for (name, p) in &self.peers {
            match p.state {
                MemberState::Alive
                    if now_ms.saturating_sub(p.last_heard_ms) > cfg.suspect_after_ms =>
                {
                    to_suspect.push(name.clone())
                }
                MemberState::Suspect => match &p.probe {
                    Some(pr) if now_ms.saturating_sub(pr.started_ms) > cfg.probe_timeout_ms => {
                        to_dead.push(name.clone())
                    }
                    None => to_dead.push(name.clone()),
                    _ => {}
                },
                _ => {}
            }
        }
        for name in to_suspect {
            out.extend(self.suspect(&name, now_ms, helpers, "heartbeats missed"));
        }
        for name in to_dead {
            self.set(
                &name,
                MemberState::Dead,
                now_ms,
                "probes timed out",
                &mut out,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed_to(actions: &[Action]) -> Option<MemberState> {
        actions.iter().find_map(|a| match a {
            Action::Changed { to, .. } => Some(*to),
            _ => None,
        })
    }

    #[test]
    fn silence_leads_to_suspicion_then_probes_then_death() {
        let mut d = Detector::new(DetectorConfig::default());
        d.add("b", 0);
        assert!(d.tick(400, &[]).is_empty());
        let a = d.tick(501, &["c".into()]);
        assert_eq!(changed_to(&a), Some(MemberState::Suspect));
        assert!(a.contains(&Action::DirectProbe { target: "b".into() }));
        assert!(a.contains(&Action::IndirectProbe {
            helper: "c".into(),
            target: "b".into()
        }));
        assert!(
            d.direct_result("b", false, 510).is_empty(),
            "must wait for the indirect probe"
        );
        let a = d.indirect_result("b", false, 520);
        assert_eq!(changed_to(&a), Some(MemberState::Dead));
    }

    #[test]
    fn any_successful_probe_refutes_suspicion() {
        let mut d = Detector::new(DetectorConfig::default());
        d.add("b", 0);
        d.connection_lost("b", 10, &["c".into()]);
        assert_eq!(d.state("b"), Some(MemberState::Suspect));
        d.direct_result("b", false, 11);
        let a = d.indirect_result("b", true, 12);
        assert_eq!(changed_to(&a), Some(MemberState::Alive));
        // and the refuted member gets a fresh silence budget
        assert!(d.tick(400, &[]).is_empty());
    }

    #[test]
    fn without_helpers_a_failed_direct_probe_is_enough() {
        let mut d = Detector::new(DetectorConfig::default());
        d.add("b", 0);
        d.connection_lost("b", 10, &[]);
        assert_eq!(
            changed_to(&d.direct_result("b", false, 11)),
            Some(MemberState::Dead)
        );
    }

    #[test]
    fn unanswered_probes_time_out_to_dead() {
        let mut d = Detector::new(DetectorConfig::default());
        d.add("b", 0);
        d.connection_lost("b", 10, &["c".into()]);
        assert!(d.tick(300, &[]).is_empty());
        assert_eq!(changed_to(&d.tick(311, &[])), Some(MemberState::Dead));
    }

    #[test]
    fn leave_is_immediate_and_not_probed() {
        let mut d = Detector::new(DetectorConfig::default());
        d.add("b", 0);
        assert_eq!(changed_to(&d.left("b", 5)), Some(MemberState::Left));
        assert!(d.tick(10_000, &[]).is_empty());
        assert!(d.connection_lost("b", 10_001, &[]).is_empty());
        assert_eq!(
            changed_to(&d.new_generation("b", 20_000)),
            Some(MemberState::Alive)
        );
    }
}
