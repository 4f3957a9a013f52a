//! In-process simulated cluster: the real `Core` of every member, wired by an
//! in-memory network on virtual time with a seeded RNG. Links can drop, delay
//! and partition; members can be killed and restarted with a new generation.
//!
//! Every run prints its seed; rerun a failure with `SIM_SEED=<seed>`.

use crate::core::detector::MemberState;
use crate::core::identity::{Generation, NodeId, SessionId};
use crate::core::message::PeerMsg;
use crate::core::store::Op;
use crate::core::{Core, CoreConfig, Output, SendMode, WriteError};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// SplitMix64: tiny, seedable, good enough for a simulation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }
}

enum Event {
    Deliver {
        from: NodeId,
        to: String,
        msg: PeerMsg,
    },
    Probe {
        at: String,
        at_gen: Generation,
        target: String,
        for_peer: Option<String>,
    },
}

pub struct SimNode {
    pub core: Core,
    pub up: bool,
}

pub struct Sim {
    pub seed: u64,
    pub now: u64,
    pub rng: Rng,
    pub nodes: BTreeMap<String, SimNode>,
    pub cfg: CoreConfig,
    names: Vec<String>,
    events: BTreeMap<(u64, u64), Event>,
    seq: u64,
    link_last: HashMap<(String, String), u64>,
    links: BTreeSet<(String, String)>,
    cut: BTreeSet<(String, String)>,
    pub drop_rate: f64,
    pub delay_ms: (u64, u64),
    pub write_results: HashMap<(String, u64), Result<(), WriteError>>,
    /// Backup mode: fetches that finished, per member.
    pub fetches_done: BTreeSet<(String, u64)>,
    next_write: u64,
    tick_ms: u64,
    next_tick: u64,
    gen_counter: u64,
}

impl Sim {
    /// A cluster whose members all start at time 0. The seed comes from
    /// `SIM_SEED` when set.
    pub fn new(seed: u64, names: &[&str], cfg: CoreConfig) -> Self {
        let seed = std::env::var("SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(seed);
        eprintln!("sim seed={seed} (rerun with SIM_SEED={seed})");
        let mut sim = Sim {
            seed,
            now: 0,
            rng: Rng::new(seed),
            nodes: BTreeMap::new(),
            cfg,
            names: names.iter().map(|s| s.to_string()).collect(),
            events: BTreeMap::new(),
            seq: 0,
            link_last: HashMap::new(),
            links: BTreeSet::new(),
            cut: BTreeSet::new(),
            drop_rate: 0.0,
            delay_ms: (1, 3),
            write_results: HashMap::new(),
            fetches_done: BTreeSet::new(),
            next_write: 1,
            tick_ms: 10,
            next_tick: 0,
            gen_counter: 0,
        };
        for n in names {
            sim.start(n);
        }
        sim
    }

    /// Starts (or restarts, with a new generation) a member; adds it to every
    /// member list if it is new.
    pub fn start(&mut self, name: &str) {
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_owned());
            let names = self.names.clone();
            let now = self.now;
            for n in self.nodes.values_mut() {
                n.core.set_members(&names, now);
            }
        }
        self.gen_counter += 1;
        let me = NodeId {
            name: name.to_owned(),
            generation: Generation(self.now * 1000 + self.gen_counter),
        };
        let core = Core::new(me, self.cfg.clone(), &self.names, self.now);
        self.nodes
            .insert(name.to_owned(), SimNode { core, up: true });
        self.refresh_links();
    }

    /// SIGKILL: the member stops at once; its connections break.
    pub fn kill(&mut self, name: &str) {
        if let Some(n) = self.nodes.get_mut(name) {
            n.up = false;
        }
        self.refresh_links();
    }

    /// Graceful leave: stop serving, wait for acknowledgements (bounded), announce.
    pub fn leave(&mut self, name: &str, max_wait_ms: u64) {
        let now = self.now;
        if let Some(n) = self.nodes.get_mut(name) {
            n.core.begin_leave(now);
        }
        let deadline = self.now + max_wait_ms;
        while self.now < deadline && !self.nodes.get(name).is_some_and(|n| n.core.flushed()) {
            self.step();
        }
        if let Some(n) = self.nodes.get_mut(name) {
            n.core.announce_leave();
        }
        self.dispatch(name);
        self.run_for(20);
        self.kill(name);
    }

    pub fn partition(&mut self, a: &[&str], b: &[&str]) {
        for x in a {
            for y in b {
                self.cut.insert((x.to_string(), y.to_string()));
                self.cut.insert((y.to_string(), x.to_string()));
            }
        }
        self.refresh_links();
    }

    pub fn heal(&mut self) {
        self.cut.clear();
        self.refresh_links();
    }

    fn is_up(&self, n: &str) -> bool {
        self.nodes.get(n).is_some_and(|n| n.up)
    }
    fn reachable(&self, a: &str, b: &str) -> bool {
        self.is_up(a) && self.is_up(b) && !self.cut.contains(&(a.to_owned(), b.to_owned()))
    }
    fn id_of(&self, n: &str) -> Option<NodeId> {
        self.nodes.get(n).map(|n| n.core.me.clone())
    }

    /// Brings each directed "connection" in line with reachability, telling
    /// both ends as the real transport would.
    fn refresh_links(&mut self) {
        let names = self.names.clone();
        let now = self.now;
        for a in &names {
            for b in &names {
                if a == b {
                    continue;
                }
                let key = (a.clone(), b.clone());
                let want = self.reachable(a, b);
                let have = self.links.contains(&key);
                if want && !have {
                    self.links.insert(key);
                    let (Some(bid), ready) = (
                        self.id_of(b),
                        self.nodes.get(b).is_some_and(|n| n.core.is_ready()),
                    ) else {
                        continue;
                    };
                    if let Some(n) = self.nodes.get_mut(a) {
                        n.core.on_outbound_up(&bid, ready, now);
                    }
                    self.dispatch(a);
                    // The listener learns the dialer's life from the handshake too.
                    if let (Some(aid), Some(n)) = (self.id_of(a), self.nodes.get_mut(b)) {
                        n.core.on_inbound_up(&aid, now);
                    }
                    self.dispatch(b);
                } else if !want && have {
                    self.links.remove(&key);
                    if self.is_up(a) {
                        if let Some(n) = self.nodes.get_mut(a) {
                            n.core.on_outbound_down(b, crate::core::Down::Lost, now);
                        }
                        self.dispatch(a);
                    }
                    if self.is_up(b) {
                        if let Some(aid) = self.id_of(a) {
                            if let Some(n) = self.nodes.get_mut(b) {
                                n.core.on_inbound_closed(&aid, now);
                            }
                            self.dispatch(b);
                        }
                    }
                }
            }
        }
    }

    fn push(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.events.insert((at, self.seq), ev);
    }

    fn dispatch(&mut self, name: &str) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(name) else {
            return;
        };
        if !node.up {
            node.core.drain(now);
            return;
        }
        let outs = node.core.drain(now);
        let me = node.core.me.clone();
        for o in outs {
            match o {
                Output::Send { to, msg } => {
                    let key = (name.to_owned(), to.clone());
                    if !self.links.contains(&key) {
                        continue;
                    }
                    if self.drop_rate > 0.0 && self.rng.chance(self.drop_rate) {
                        continue;
                    }
                    let delay =
                        self.delay_ms.0 + self.rng.below(self.delay_ms.1 - self.delay_ms.0 + 1);
                    let last = self.link_last.get(&key).copied().unwrap_or(0);
                    let at = (self.now + delay).max(last);
                    self.link_last.insert(key, at);
                    self.push(
                        at,
                        Event::Deliver {
                            from: me.clone(),
                            to,
                            msg,
                        },
                    );
                }
                Output::Probe { target, for_peer } => {
                    let at = self.now + 1;
                    self.push(
                        at,
                        Event::Probe {
                            at: name.to_owned(),
                            at_gen: me.generation,
                            target,
                            for_peer,
                        },
                    );
                }
                Output::WriteDone { write, result } => {
                    self.write_results.insert((name.to_owned(), write), result);
                }
                Output::FetchDone { fetch } => {
                    self.fetches_done.insert((name.to_owned(), fetch));
                }
            }
        }
    }

    /// Processes the next event or tick.
    pub fn step(&mut self) {
        let next_ev = self.events.keys().next().copied();
        match next_ev {
            Some((at, seq)) if at <= self.next_tick => {
                self.now = self.now.max(at);
                let Some(ev) = self.events.remove(&(at, seq)) else {
                    return;
                };
                self.handle(ev);
            }
            _ => {
                self.now = self.next_tick;
                self.next_tick += self.tick_ms;
                let names: Vec<String> = self.nodes.keys().cloned().collect();
                for n in names {
                    if self.is_up(&n) {
                        let now = self.now;
                        if let Some(node) = self.nodes.get_mut(&n) {
                            node.core.tick(now);
                        }
                        self.dispatch(&n);
                    }
                }
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = self.now;
        match ev {
            Event::Deliver { from, to, msg } => {
                // A message in flight dies with its connection or its receiver.
                let alive_sender =
                    self.id_of(&from.name).is_some_and(|id| id == from) && self.is_up(&from.name);
                if !alive_sender || !self.links.contains(&(from.name.clone(), to.clone())) {
                    return;
                }
                if let Some(n) = self.nodes.get_mut(&to) {
                    n.core.on_peer_msg(&from, msg, now);
                }
                self.dispatch(&to);
            }
            Event::Probe {
                at,
                at_gen,
                target,
                for_peer,
            } => {
                if self.id_of(&at).map(|i| i.generation) != Some(at_gen) || !self.is_up(&at) {
                    return;
                }
                let ok = self.reachable(&at, &target);
                if let Some(n) = self.nodes.get_mut(&at) {
                    n.core.on_probe_result(&target, for_peer, ok, now);
                }
                self.dispatch(&at);
            }
        }
    }

    pub fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.step();
        }
    }

    /// Runs until `cond` holds or `ms` pass; returns whether it held.
    pub fn run_until(&mut self, ms: u64, mut cond: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + ms;
        while self.now < end {
            if cond(self) {
                return true;
            }
            self.step();
        }
        cond(self)
    }

    /// A local write on `node`; returns the write id, whose result lands in
    /// `write_results` (at once for completed writes).
    pub fn write(&mut self, node: &str, id: &str, ops: Vec<Op>, mode: SendMode) -> u64 {
        let w = self.next_write;
        self.next_write += 1;
        let now = self.now;
        let Ok(sid) = SessionId::parse(id) else {
            return w;
        };
        if let Some(n) = self.nodes.get_mut(node) {
            match n.core.write(w, sid, ops, None, Some(mode), now) {
                Ok(true) => {
                    self.write_results.insert((node.to_owned(), w), Ok(()));
                }
                Ok(false) => {}
                Err(e) => {
                    self.write_results.insert((node.to_owned(), w), Err(e));
                }
            }
        }
        self.dispatch(node);
        w
    }

    /// Writes on `node` that form one atomic group (a Redis MULTI/EXEC),
    /// handed to the network together.
    pub fn write_group(&mut self, node: &str, writes: Vec<(&str, Vec<Op>)>) {
        let now = self.now;
        if let Some(n) = self.nodes.get_mut(node) {
            n.core.begin_group();
            for (id, ops) in writes {
                let w = self.next_write;
                self.next_write += 1;
                if let Ok(sid) = SessionId::parse(id) {
                    let _ = n.core.write(w, sid, ops, None, Some(SendMode::Async), now);
                }
            }
            n.core.end_group();
        }
        self.dispatch(node);
    }

    pub fn set(&mut self, node: &str, id: &str, name: &str, value: &str, mode: SendMode) -> u64 {
        self.write(
            node,
            id,
            vec![Op::Set {
                name: name.into(),
                value: value.as_bytes().to_vec().into(),
            }],
            mode,
        )
    }

    pub fn create(&mut self, node: &str, id: &str) -> u64 {
        self.write(node, id, vec![Op::Create], SendMode::Async)
    }

    pub fn value(&self, node: &str, id: &str, name: &str) -> Option<String> {
        let n = self.nodes.get(node)?;
        let s = n
            .core
            .store
            .get(&SessionId::parse(id).ok()?, self.now, 0)
            .ok()?;
        let v = s.attrs.get(name)?.value.as_ref()?;
        Some(String::from_utf8_lossy(v).into_owned())
    }

    /// What the runtime does before a transaction on `id` runs on `node`:
    /// in backup mode, fetch the session from its holders when `node` holds
    /// no copy, waiting (virtual time) until the fetch is done.
    pub fn fetch(&mut self, node: &str, id: &str) {
        let now = self.now;
        let (Ok(sid), Some(n)) = (SessionId::parse(id), self.nodes.get_mut(node)) else {
            return;
        };
        let Some(f) = n.core.fetch_for(&[sid], now) else {
            return;
        };
        // A restarted member numbers its fetches afresh.
        let key = (node.to_owned(), f);
        self.fetches_done.remove(&key);
        self.dispatch(node);
        self.run_until(5_000, |s| s.fetches_done.contains(&key));
    }

    /// `fetch`, then a write, as a front-end's transaction on `node` would.
    pub fn set_anywhere(
        &mut self,
        node: &str,
        id: &str,
        name: &str,
        value: &str,
        mode: SendMode,
    ) -> u64 {
        self.fetch(node, id);
        self.set(node, id, name, value, mode)
    }

    /// `fetch`, then a read of one attribute.
    pub fn value_anywhere(&mut self, node: &str, id: &str, name: &str) -> Option<String> {
        self.fetch(node, id);
        self.value(node, id, name)
    }

    pub fn state_seen(&self, observer: &str, target: &str) -> Option<MemberState> {
        self.nodes.get(observer)?.core.member_state(target)
    }

    /// True when every running, ready member holds the same replicated content.
    pub fn converged(&self) -> bool {
        let prints: BTreeSet<u64> = self
            .nodes
            .values()
            .filter(|n| n.up && n.core.is_ready())
            .map(|n| n.core.store.fingerprint())
            .collect();
        prints.len() <= 1
    }
}

#[cfg(test)]
mod backup_tests;
#[cfg(test)]
mod tests;
