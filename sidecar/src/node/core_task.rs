//! The task that owns the `Core`: feeds it commands, network events and
//! ticks, carries out its outputs, and leaves the cluster on shutdown.

use super::links::{msg_size, outbound_loop, Outbound, MAX_PROBES_IN_FLIGHT};
use super::{mono_ms, now_ms, txn, Command, IoEvent, MeView, NodeConfig, PeerLink, Status};
use crate::core::message::PeerMsg;
use crate::core::{Core, Output};
use crate::membership::{MemberFile, MemberSpec};
use crate::net::transport::{self, Security};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

pub(super) struct CoreTask {
    pub(super) core: Core,
    pub(super) cfg: NodeConfig,
    pub(super) sec: Security,
    pub(super) me_spec: MemberSpec,
    pub(super) links: HashMap<String, PeerLink>,
    /// Transactions waiting for their writes.
    pub(super) pending: txn::Pending,
    pub(super) next_write: u64,
    pub(super) ready: Arc<AtomicBool>,
    pub(super) known: Arc<RwLock<Vec<String>>>,
    pub(super) core_beat: Arc<std::sync::atomic::AtomicU64>,
    /// Set by the freeze test hook.
    pub(super) frozen: Option<Duration>,
    /// Probes (direct and on peers' behalf) under way.
    pub(super) probes: Arc<std::sync::atomic::AtomicUsize>,
    pub(super) io_tx: mpsc::Sender<IoEvent>,
    pub(super) tracker: TaskTracker,
    pub(super) net_cancel: CancellationToken,
    pub(super) watchers: Arc<super::watch::Watchers>,
}

/// Lets peer connections in only while the core task is going round its loop.
#[derive(Clone)]
pub(super) struct CoreGate {
    pub(super) beat: Arc<std::sync::atomic::AtomicU64>,
    pub(super) stall_ms: u64,
}

impl CoreGate {
    pub(super) fn open(&self) -> bool {
        mono_ms().saturating_sub(self.beat.load(Ordering::Relaxed)) <= self.stall_ms
    }
}

impl CoreTask {
    /// Runs until `shutdown`, leaves the cluster, then closes every
    /// connection (bounded).
    pub(super) async fn run_to_end(
        self,
        mf: MemberFile,
        cmd_rx: mpsc::Receiver<Command>,
        io_rx: mpsc::Receiver<IoEvent>,
        shutdown: CancellationToken,
    ) {
        let (tracker, net_cancel) = (self.tracker.clone(), self.net_cancel.clone());
        let watchers = self.watchers.clone();
        self.run(mf, cmd_rx, io_rx, shutdown).await;
        watchers.close_all();
        net_cancel.cancel();
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(2), tracker.wait())
            .await
            .is_err()
        {
            warn!("some connections did not close in time");
        }
    }

    async fn run(
        mut self,
        mf: MemberFile,
        mut cmd_rx: mpsc::Receiver<Command>,
        mut io_rx: mpsc::Receiver<IoEvent>,
        shutdown: CancellationToken,
    ) {
        self.apply_members(&mf);
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(ev) = io_rx.recv() => {
                    self.on_io(ev);
                    // Take what else is waiting, so outputs are batched.
                    for _ in 0..256 {
                        match io_rx.try_recv() { Ok(ev) => self.on_io(ev), Err(_) => break }
                    }
                }
                Some(cmd) = cmd_rx.recv() => {
                    self.on_cmd(cmd);
                    for _ in 0..256 {
                        match cmd_rx.try_recv() { Ok(c) => self.on_cmd(c), Err(_) => break }
                    }
                }
                _ = tick.tick() => self.core.tick(now_ms()),
            }
            self.flush();
            self.core_beat.store(mono_ms(), Ordering::Relaxed);
            if let Some(d) = self.frozen.take() {
                tokio::time::sleep(d).await;
            }
        }
        self.leave(&mut cmd_rx, &mut io_rx).await;
    }

    async fn leave(
        &mut self,
        cmd_rx: &mut mpsc::Receiver<Command>,
        io_rx: &mut mpsc::Receiver<IoEvent>,
    ) {
        info!("leaving: flushing replication queues");
        self.core.begin_leave(now_ms());
        self.flush();
        let deadline = tokio::time::Instant::now() + self.cfg.leave_timeout;
        let mut tick = tokio::time::interval(self.cfg.tick);
        while !self.core.flushed() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    let (n, b) = self.core.queue_totals();
                    warn!(deltas = n, bytes = b, "leave timeout: some deltas were not acknowledged; peers repair by anti-entropy");
                    break;
                }
                Some(ev) = io_rx.recv() => self.on_io(ev),
                Some(cmd) = cmd_rx.recv() => self.on_cmd(cmd),
                _ = tick.tick() => self.core.tick(now_ms()),
            }
            self.flush();
        }
        self.core.announce_leave();
        self.flush();
        // Wait (bounded) until the peers confirm, so they mark us `left`
        // before our connections close and never suspect us.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1_000);
        while !self.core.leave_acknowledged() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    warn!("not every peer confirmed the leave in time");
                    break;
                }
                Some(ev) = io_rx.recv() => self.on_io(ev),
                _ = tick.tick() => self.core.tick(now_ms()),
            }
            self.flush();
        }
        // Closing the channels lets each writer send what it holds and stop.
        let mut writers = Vec::new();
        for (_, l) in self.links.drain() {
            drop(l.tx);
            writers.push(l.task);
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            for w in writers {
                let _ = w.await;
            }
        })
        .await;
        info!("left the cluster");
    }

    fn apply_members(&mut self, mf: &MemberFile) {
        if let Ok(mut k) = self.known.write() {
            *k = mf.names();
        }
        match mf.get(&self.me_spec.name) {
            Some(me) if me.address != self.me_spec.address => warn!(
                old = %self.me_spec.address, new = %me.address,
                "this member's address changed in the member file; restart it to move its receiver"
            ),
            None => error!("this member was removed from the member file; it keeps running with its peers until stopped"),
            _ => {}
        }
        let now = now_ms();
        self.core.set_members(&mf.names(), now);
        self.core.mark_leaving(&mf.leaving, now);
        let stale: Vec<String> = self
            .links
            .iter()
            .filter(|(n, l)| mf.get(n).is_none_or(|m| m.address != l.addr))
            .map(|(n, _)| n.clone())
            .collect();
        for n in stale {
            if let Some(l) = self.links.remove(&n) {
                l.cancel.cancel();
            }
        }
        for m in &mf.members {
            if m.name == self.me_spec.name || self.links.contains_key(&m.name) {
                continue;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let cancel = self.net_cancel.child_token();
            let kick = Arc::new(tokio::sync::Notify::new());
            let link = Outbound {
                name: m.name.clone(),
                addr: m.address,
                sec: self.sec.clone(),
                queued: queued.clone(),
                io_tx: self.io_tx.clone(),
                cancel: cancel.clone(),
                kick: kick.clone(),
                connect_timeout: self.cfg.connect_timeout,
            };
            let task = self.tracker.spawn(outbound_loop(link, rx));
            self.links.insert(
                m.name.clone(),
                PeerLink {
                    addr: m.address,
                    tx,
                    queued,
                    cancel,
                    kick,
                    task,
                },
            );
        }
    }

    fn on_io(&mut self, ev: IoEvent) {
        let now = now_ms();
        match ev {
            IoEvent::Msg { from, msg } => self.core.on_peer_msg(&from, msg, now),
            IoEvent::OutboundUp { peer, ready } => self.core.on_outbound_up(&peer, ready, now),
            IoEvent::OutboundDown { peer, down } => self.core.on_outbound_down(&peer, down, now),
            IoEvent::InboundUp { peer } => {
                // The peer is up: if our dialer is backing off, try now.
                if let Some(l) = self.links.get(&peer.name) {
                    l.kick.notify_one();
                }
                self.core.on_inbound_up(&peer, now);
            }
            IoEvent::InboundClosed { peer } => self.core.on_inbound_closed(&peer, now),
            IoEvent::Probe {
                target,
                for_peer,
                ok,
            } => self.core.on_probe_result(&target, for_peer, ok, now),
            IoEvent::Members(mf) => {
                info!(members = mf.members.len(), "member file reloaded");
                self.apply_members(&mf);
            }
        }
    }

    fn on_cmd(&mut self, cmd: Command) {
        let now = now_ms();
        match cmd {
            Command::Txn(ids, job) => match self.core.fetch_for(&ids, now) {
                Some(fetch) => self.pending.park(fetch, job),
                None => self
                    .pending
                    .run(&mut self.core, now, &mut self.next_write, job),
            },
            Command::Freeze { ms } => {
                warn!(ms, "test hook: freezing the core task");
                self.frozen = Some(Duration::from_millis(ms));
            }
            Command::Status { reply } => {
                let _ = reply.send(Status {
                    cluster: self.core.cfg.cluster.clone(),
                    me: MeView {
                        name: self.core.me.name.clone(),
                        generation: self.core.me.generation.0,
                        jvm_route: self.me_spec.jvm_route.clone(),
                        address: self.me_spec.address.to_string(),
                        phase: self.core.phase().clone(),
                        clock_skew_ms: self.core.clock_skew(),
                    },
                    members: self.core.members(),
                    stats: self.core.stats.clone(),
                    sessions: self.core.store.live_count(),
                    tombstones: self.core.store.tombstone_count(),
                    payload_bytes: self.core.store.payload_bytes(),
                    queue: self.core.queue_totals(),
                    states: self.core.state_counts().to_vec(),
                    backup: self.core.backup_stats(),
                });
            }
        }
    }

    fn flush(&mut self) {
        // Changed sessions go to the watching apps before this round's
        // messages (acknowledgements among them) go to the peers.
        if self.watchers.count() == 0 {
            self.core.unwatch_changes();
        } else {
            let changes = self.core.take_changes(now_ms());
            if !changes.is_empty() {
                self.watchers.publish(&changes);
            }
        }
        let mut fetched = Vec::new();
        for o in self.core.drain(now_ms()) {
            match o {
                Output::Send { to, msg } => {
                    if let Some(l) = self.links.get(&to) {
                        let size = msg_size(&msg);
                        // A peer that does not read: its writer's queue stays
                        // bounded. Deltas stay in the core's log and are sent
                        // again once the writer has caught up.
                        if matches!(msg, PeerMsg::Deltas { .. })
                            && l.queued.load(Ordering::Relaxed) + size
                                > self.cfg.core.max_queue_bytes
                        {
                            self.sec
                                .stats
                                .send_queue_full
                                .fetch_add(1, Ordering::Relaxed);
                            self.core.writer_full(&to, now_ms());
                            continue;
                        }
                        l.queued.fetch_add(size, Ordering::Relaxed);
                        let _ = l.tx.send(msg);
                    }
                }
                Output::Probe { target, for_peer } => {
                    let Some(addr) = self.links.get(&target).map(|l| l.addr) else {
                        continue;
                    };
                    // Peers can ask us to probe; a flood of requests must not
                    // turn into a flood of sockets.
                    if self.probes.load(Ordering::Relaxed) >= MAX_PROBES_IN_FLIGHT {
                        self.sec
                            .stats
                            .probes_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    self.probes.fetch_add(1, Ordering::Relaxed);
                    let probes = self.probes.clone();
                    let sec = self.sec.clone();
                    let io_tx = self.io_tx.clone();
                    let timeout = Duration::from_millis(
                        self.core
                            .cfg
                            .detector
                            .probe_timeout_ms
                            .saturating_sub(50)
                            .max(50),
                    );
                    self.tracker.spawn(async move {
                        let ok = transport::probe(addr, &sec, &target, timeout).await;
                        probes.fetch_sub(1, Ordering::Relaxed);
                        debug!(target = %target, ok, indirect = for_peer.is_some(), "probe finished");
                        let _ = io_tx.send(IoEvent::Probe { target, for_peer, ok }).await;
                    });
                }
                Output::WriteDone { write, result } => self.pending.complete(write, result),
                Output::FetchDone { fetch } => {
                    if let Some(job) = self.pending.unpark(fetch) {
                        fetched.push(job);
                    }
                }
            }
        }
        if !fetched.is_empty() {
            // Their sessions are here: run them, and send what they wrote.
            for job in fetched {
                self.pending
                    .run(&mut self.core, now_ms(), &mut self.next_write, job);
            }
            self.flush();
            return;
        }
        let r = self.core.is_ready();
        if self.ready.swap(r, Ordering::Relaxed) != r {
            info!(ready = r, "readiness changed");
        }
    }
}
