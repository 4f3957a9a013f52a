//! The runtime: the only place that owns sockets, tasks and the clock.
//!
//! One task owns the `Core` and is fed by two channels (commands from the local
//! API, events from the network). Every peer has an outbound task that dials,
//! authenticates, and writes what the core sends it; a listener accepts
//! inbound connections and feeds their frames to the core. The member file is
//! polled and hot-reloaded. Shutdown is a `CancellationToken`: the member
//! stops serving, flushes its replication queues (bounded), announces its
//! leave, and returns.

use crate::core::detector::MemberState;
use crate::core::identity::NodeId;
use crate::core::message::PeerMsg;

pub mod txn;

pub use txn::{Results, Step, Ticket, Tx};

use crate::core::{Core, CoreConfig, MemberView, Output, Phase, Stats};
use crate::membership::{MemberFile, MemberSpec};
use crate::net::transport::{self, IoStats, Security};
use bytes::BytesMut;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// Milliseconds on a monotonic clock since the process started: for measuring
/// silences, which a stepped wall clock must not fake.
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub core: CoreConfig,
    pub member: String,
    pub members: MembershipSource,
    pub secret: Vec<u8>,
    /// Bind address for replication; defaults to the member's own address.
    pub listen: Option<SocketAddr>,
    pub reload_interval: Duration,
    pub leave_timeout: Duration,
    pub connect_timeout: Duration,
    pub tick: Duration,
    /// Serve `POST /v1/test/freeze-core` (tests only).
    pub test_hooks: bool,
}

/// Where the membership comes from.
#[derive(Debug, Clone)]
pub enum MembershipSource {
    /// A static YAML file, polled for changes.
    File(PathBuf),
    /// The operator's membership ConfigMap, watched through the API server
    /// (needs only get/watch on that one object).
    Kube { namespace: String, name: String },
}

impl std::fmt::Display for MembershipSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipSource::File(p) => write!(f, "{}", p.display()),
            MembershipSource::Kube { namespace, name } => write!(f, "configmap {namespace}/{name}"),
        }
    }
}

/// What the core task is asked to do.
pub enum Command {
    /// A front-end's transaction (see `txn`).
    Txn(txn::TxnFn),
    Status {
        reply: oneshot::Sender<Status>,
    },
    /// Test hook (`--test-hooks`): the core task stops going round its loop
    /// for `ms` while every other task goes on, as a core stuck on an await
    /// (or a deadlock) would.
    Freeze {
        ms: u64,
    },
}

/// What `/v1/cluster` and `/metrics` show.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub cluster: String,
    pub me: MeView,
    pub members: Vec<MemberView>,
    #[serde(skip)]
    pub stats: Stats,
    #[serde(skip)]
    pub sessions: usize,
    #[serde(skip)]
    pub tombstones: usize,
    #[serde(skip)]
    pub payload_bytes: usize,
    #[serde(skip)]
    pub queue: (usize, usize),
    #[serde(skip)]
    pub states: Vec<(MemberState, usize)>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeView {
    pub name: String,
    pub generation: u64,
    pub jvm_route: String,
    pub address: String,
    pub phase: Phase,
    /// Our clock minus our peers', when it is off most of them by more than the bound.
    pub clock_skew_ms: Option<i64>,
}

enum IoEvent {
    Msg {
        from: NodeId,
        msg: PeerMsg,
    },
    OutboundUp {
        peer: NodeId,
        ready: bool,
    },
    OutboundDown {
        peer: String,
        down: crate::core::Down,
    },
    InboundUp {
        peer: NodeId,
    },
    InboundClosed {
        peer: NodeId,
    },
    Probe {
        target: String,
        for_peer: Option<String>,
        ok: bool,
    },
    Members(MemberFile),
}

/// What the local API holds: a way to reach the core task, and flags it can
/// read without asking.
#[derive(Clone)]
pub struct Handle {
    pub cmd_tx: mpsc::Sender<Command>,
    pub ready: Arc<AtomicBool>,
    pub io: Arc<IoStats>,
    pub me: NodeId,
    pub jvm_route: String,
    pub limits: crate::core::store::Limits,
    pub default_max_inactive_ms: u64,
    /// When the core task last went round its loop (`mono_ms`); it
    /// does so at least every tick while it is healthy.
    pub core_beat: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the test-only endpoints are served.
    pub test_hooks: bool,
}

/// How long the core may go without a loop before `/healthz` fails (the
/// kubelet then restarts the member).
pub const CORE_STALL_HEALTH_MS: u64 = 2_000;

impl Handle {
    /// Milliseconds since the core task last went round its loop.
    pub fn core_silent_ms(&self) -> u64 {
        mono_ms().saturating_sub(self.core_beat.load(Ordering::Relaxed))
    }
}

impl Handle {
    /// Runs a transaction on the core; `None` if the member is stopping.
    pub async fn txn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Step<T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.cmd_tx
            .send(Command::Txn(txn::boxed(f, tx)))
            .await
            .ok()?;
        rx.await.ok()
    }

    pub async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.cmd_tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }
}

struct PeerLink {
    addr: SocketAddr,
    tx: mpsc::UnboundedSender<PeerMsg>,
    /// Bytes handed to the writer and not yet written to the socket.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    cancel: CancellationToken,
    kick: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// A started member: its handle, and where it listens.
pub struct Started {
    pub handle: Handle,
    pub replication_addr: SocketAddr,
    pub done: tokio::task::JoinHandle<()>,
}

/// Binds the replication port and starts every task. The returned
/// `done` finishes after `shutdown` is cancelled and the member has left.
pub async fn start(cfg: NodeConfig, shutdown: CancellationToken) -> anyhow::Result<Started> {
    let kube = match &cfg.members {
        MembershipSource::Kube { .. } => Some(
            kube::Client::try_default()
                .await
                .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API: {e}"))?,
        ),
        MembershipSource::File(_) => None,
    };
    let mf = match (&cfg.members, &kube) {
        (MembershipSource::File(path), _) => {
            MemberFile::load(path).map_err(|e| anyhow::anyhow!("member file: {e}"))?
        }
        (MembershipSource::Kube { namespace, name }, Some(client)) => {
            crate::membership::kube::wait_for_member(
                client,
                namespace,
                name,
                &cfg.member,
                Duration::from_secs(120),
            )
            .await?
        }
        _ => anyhow::bail!("no Kubernetes client"),
    };
    let Some(me_spec) = mf.get(&cfg.member).cloned() else {
        anyhow::bail!(
            "member {:?} is not in {} (members: {})",
            cfg.member,
            cfg.members,
            mf.names().join(", ")
        );
    };
    let listen = cfg.listen.unwrap_or(me_spec.address);
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot bind the replication port {listen} for member {:?}: {e}. Every member on a host needs its own receiver port; \
             refusing to start rather than run without replication",
            cfg.member
        )
    })?;
    let replication_addr = listener.local_addr()?;
    let me = NodeId {
        name: cfg.member.clone(),
        generation: crate::core::identity::Generation::random(),
    };
    let mut core_cfg = cfg.core.clone();
    core_cfg.cluster = mf.cluster.clone();
    let io = Arc::new(IoStats::default());
    let sec = Security {
        cluster: mf.cluster.clone(),
        me: me.clone(),
        secret: Arc::new(cfg.secret.clone()),
        max_frame: core_cfg.max_frame_bytes,
        handshake_timeout: Duration::from_millis(1_000),
        stats: io.clone(),
    };
    let (cmd_tx, cmd_rx) = mpsc::channel(4096);
    let (io_tx, io_rx) = mpsc::channel(8192);
    let ready = Arc::new(AtomicBool::new(false));
    let known = Arc::new(RwLock::new(mf.names()));
    let core_beat = Arc::new(std::sync::atomic::AtomicU64::new(mono_ms()));
    let handle = Handle {
        cmd_tx,
        ready: ready.clone(),
        io: io.clone(),
        me: me.clone(),
        jvm_route: me_spec.jvm_route.clone(),
        limits: core_cfg.limits.clone(),
        default_max_inactive_ms: core_cfg.default_max_inactive_ms,
        core_beat: core_beat.clone(),
        test_hooks: cfg.test_hooks,
    };
    // A core silent for this long answers no peer: probes fail and the peers
    // declare it dead, as they would a hung process.
    let peer_stall_ms = (3 * core_cfg.heartbeat_interval_ms).max(300);
    info!(member = %me, cluster = %mf.cluster, replication = %replication_addr, route = %me_spec.jvm_route, "member starting");

    let tracker = TaskTracker::new();
    let net_cancel = CancellationToken::new();
    let gate = CoreGate {
        beat: core_beat.clone(),
        stall_ms: peer_stall_ms,
    };
    tracker.spawn(accept_loop(
        listener,
        sec.clone(),
        ready.clone(),
        known.clone(),
        gate,
        io_tx.clone(),
        net_cancel.clone(),
        tracker.clone(),
    ));
    match (&cfg.members, kube) {
        (MembershipSource::File(path), _) => {
            tracker.spawn(reload_loop(
                path.clone(),
                mf.clone(),
                cfg.reload_interval,
                io_tx.clone(),
                net_cancel.clone(),
            ));
        }
        (MembershipSource::Kube { namespace, name }, Some(client)) => {
            let (tx, cancel) = (io_tx.clone(), net_cancel.clone());
            let (namespace, name) = (namespace.clone(), name.clone());
            tracker.spawn(async move {
                crate::membership::kube::watch(
                    client,
                    &namespace,
                    &name,
                    move |mf| {
                        let tx = tx.clone();
                        async move { tx.send(IoEvent::Members(mf)).await.is_ok() }
                    },
                    cancel,
                )
                .await
            });
        }
        _ => {}
    }
    let core = Core::new(me.clone(), core_cfg, &mf.names(), now_ms());
    let runner = CoreTask {
        core,
        cfg,
        sec,
        me_spec,
        links: HashMap::new(),
        pending: txn::Pending::default(),
        next_write: 1,
        ready,
        known,
        core_beat,
        frozen: None,
        probes: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        io_tx,
        tracker: tracker.clone(),
        net_cancel: net_cancel.clone(),
    };
    let done = tokio::spawn(async move {
        runner.run(mf, cmd_rx, io_rx, shutdown).await;
        net_cancel.cancel();
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(2), tracker.wait())
            .await
            .is_err()
        {
            warn!("some connections did not close in time");
        }
    });
    Ok(Started {
        handle,
        replication_addr,
        done,
    })
}

struct CoreTask {
    core: Core,
    cfg: NodeConfig,
    sec: Security,
    me_spec: MemberSpec,
    links: HashMap<String, PeerLink>,
    /// Transactions waiting for their writes.
    pending: txn::Pending,
    next_write: u64,
    ready: Arc<AtomicBool>,
    known: Arc<RwLock<Vec<String>>>,
    core_beat: Arc<std::sync::atomic::AtomicU64>,
    /// Set by the freeze test hook.
    frozen: Option<Duration>,
    /// Probes (direct and on peers' behalf) under way.
    probes: Arc<std::sync::atomic::AtomicUsize>,
    io_tx: mpsc::Sender<IoEvent>,
    tracker: TaskTracker,
    net_cancel: CancellationToken,
}

/// Lets peer connections in only while the core task is going round its loop.
#[derive(Clone)]
struct CoreGate {
    beat: Arc<std::sync::atomic::AtomicU64>,
    stall_ms: u64,
}

impl CoreGate {
    fn open(&self) -> bool {
        mono_ms().saturating_sub(self.beat.load(Ordering::Relaxed)) <= self.stall_ms
    }
}

impl CoreTask {
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
        self.core.begin_leave();
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
            let task = self.tracker.spawn(outbound_loop(
                m.name.clone(),
                m.address,
                self.sec.clone(),
                rx,
                queued.clone(),
                self.io_tx.clone(),
                cancel.clone(),
                kick.clone(),
                self.cfg.connect_timeout,
            ));
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
            Command::Txn(job) => {
                self.pending
                    .run(&mut self.core, now, &mut self.next_write, job);
            }
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
                });
            }
        }
    }

    fn flush(&mut self) {
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
            }
        }
        let r = self.core.is_ready();
        if self.ready.swap(r, Ordering::Relaxed) != r {
            info!(ready = r, "readiness changed");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    sec: Security,
    ready: Arc<AtomicBool>,
    known: Arc<RwLock<Vec<String>>>,
    gate: CoreGate,
    io_tx: mpsc::Sender<IoEvent>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut acceptor = crate::net::accept::Acceptor::new("replication");
    let pending = Pending::default();
    loop {
        let (stream, remote) = tokio::select! {
            _ = cancel.cancelled() => return,
            x = acceptor.accept(&listener) => x,
        };
        if !gate.open() {
            // Stuck core: answering the handshake here would tell the peers'
            // probes we are alive while nothing is being done.
            sec.stats
                .core_stalled_refusals
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let Some(guard) = pending.enter(remote.ip()) else {
            // Before authentication a connection costs us a descriptor and a
            // task: bound how many a source (or everyone) may hold open.
            sec.stats.pending_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let (sec, ready, known, io_tx, cancel) = (
            sec.clone(),
            ready.clone(),
            known.clone(),
            io_tx.clone(),
            cancel.clone(),
        );
        tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = inbound(stream, remote, sec, ready, known, io_tx, guard) => {}
            }
        });
    }
}

async fn inbound(
    mut stream: TcpStream,
    remote: SocketAddr,
    sec: Security,
    ready: Arc<AtomicBool>,
    known: Arc<RwLock<Vec<String>>>,
    io_tx: mpsc::Sender<IoEvent>,
    pending: PendingGuard,
) {
    let _ = stream.set_nodelay(true);
    let is_known = |n: &str| {
        known
            .read()
            .map(|k| k.iter().any(|m| m == n))
            .unwrap_or(false)
    };
    let shaken =
        transport::server_handshake(&mut stream, &sec, ready.load(Ordering::Relaxed), is_known)
            .await;
    drop(pending);
    let (peer, probe, mut buf, mut keys) = match shaken {
        Ok(x) => x,
        Err(e) => {
            sec.stats.frame_errors.fetch_add(1, Ordering::Relaxed);
            // One line per failure would let a flood write the log full: at
            // most 10 lines per 10 s; the metric counts them all.
            static WINDOW: std::sync::Mutex<(u64, u32)> = std::sync::Mutex::new((0, 0));
            let log = WINDOW.lock().map(|mut w| {
                let now = mono_ms();
                if now.saturating_sub(w.0) >= 10_000 || w.1 == 0 {
                    *w = (now, 0);
                }
                w.1 += 1;
                w.1 <= 10
            });
            if log.unwrap_or(false) {
                warn!(%remote, error = %e, total = sec.stats.frame_errors.load(Ordering::Relaxed), "refused a replication connection (at most 10 lines per 10 s)");
            }
            return;
        }
    };
    if probe {
        return;
    }
    debug!(%remote, peer = %peer, "inbound replication connection");
    let _ = io_tx.send(IoEvent::InboundUp { peer: peer.clone() }).await;
    loop {
        match transport::read_frame(&mut stream, &mut buf, sec.max_frame, &sec.stats).await {
            Ok(Some((ty, payload))) => match keys.recv.open(ty, &payload) {
                Ok(msg) => {
                    if io_tx
                        .send(IoEvent::Msg {
                            from: peer.clone(),
                            msg,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    sec.stats.frame_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(%remote, peer = %peer, error = %e, "bad frame from peer; closing the connection");
                    break;
                }
            },
            Ok(None) => break,
            Err(e) => {
                sec.stats.frame_errors.fetch_add(1, Ordering::Relaxed);
                warn!(%remote, peer = %peer, error = %e, "replication connection failed");
                break;
            }
        }
    }
    let _ = io_tx.send(IoEvent::InboundClosed { peer }).await;
}

async fn outbound_loop(
    name: String,
    addr: SocketAddr,
    sec: Security,
    mut rx: mpsc::UnboundedReceiver<PeerMsg>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    io_tx: mpsc::Sender<IoEvent>,
    cancel: CancellationToken,
    kick: Arc<tokio::sync::Notify>,
    connect_timeout: Duration,
) {
    let mut backoff = Duration::from_millis(25);
    let mut failures = 0u32;
    loop {
        let dialed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = transport::dial(addr, &sec, &name, false, connect_timeout + sec.handshake_timeout) => r,
        };
        match dialed {
            Ok(transport::Dialed {
                stream,
                peer,
                ready,
                keys,
            }) => {
                if failures > 0 {
                    info!(peer = %peer, %addr, "connected after {failures} failed attempts");
                }
                failures = 0;
                backoff = Duration::from_millis(25);
                drain_queue(&mut rx, &queued);
                if io_tx
                    .send(IoEvent::OutboundUp {
                        peer: peer.clone(),
                        ready,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                let closed = write_loop(stream, keys.send, &mut rx, &queued, &sec, &cancel).await;
                if closed {
                    // Our side is shutting down: whatever was queued was written.
                    return;
                }
                let _ = io_tx
                    .send(IoEvent::OutboundDown {
                        peer: name.clone(),
                        down: crate::core::Down::Lost,
                    })
                    .await;
            }
            Err(e) => {
                failures += 1;
                match &e {
                    transport::TransportError::Auth(_)
                    | transport::TransportError::Rejected(_)
                    | transport::TransportError::Protocol(_) => {
                        error!(peer = %name, %addr, error = %e, "peer refused the handshake; check the cluster secret and member file")
                    }
                    _ if failures == 1 => {
                        info!(peer = %name, %addr, error = %e, "cannot reach peer; retrying with backoff")
                    }
                    _ => debug!(peer = %name, %addr, error = %e, "cannot reach peer"),
                }
                let refused = matches!(
                    e,
                    transport::TransportError::Auth(_)
                        | transport::TransportError::Rejected(_)
                        | transport::TransportError::Protocol(_)
                );
                let down = if refused {
                    crate::core::Down::Refused
                } else if matches!(e, transport::TransportError::Silent) {
                    crate::core::Down::Silent
                } else {
                    crate::core::Down::Lost
                };
                let _ = io_tx
                    .send(IoEvent::OutboundDown {
                        peer: name.clone(),
                        down,
                    })
                    .await;
                drain_queue(&mut rx, &queued);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                    _ = kick.notified() => {}
                }
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Writes queued messages, batching whatever is ready into one syscall.
/// Returns true when the queue was closed (orderly shutdown), false when the
/// connection broke.
/// Empties a writer's queue (the connection is gone), keeping the count right.
fn drain_queue(rx: &mut mpsc::UnboundedReceiver<PeerMsg>, queued: &std::sync::atomic::AtomicUsize) {
    while let Ok(m) = rx.try_recv() {
        queued.fetch_sub(
            msg_size(&m).min(queued.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
    }
}

/// What a message counts for in a writer's queue.
fn msg_size(m: &PeerMsg) -> usize {
    match m {
        PeerMsg::Deltas { deltas, .. } => 16 + deltas.iter().map(|d| d.size_hint()).sum::<usize>(),
        _ => 64,
    }
}

async fn write_loop(
    stream: TcpStream,
    mut sealer: transport::Sealer,
    rx: &mut mpsc::UnboundedReceiver<PeerMsg>,
    queued: &std::sync::atomic::AtomicUsize,
    sec: &Security,
    cancel: &CancellationToken,
) -> bool {
    let (mut rd, mut wr) = stream.into_split();
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return true,
            // The listener never writes after Welcome: any read result means the connection is gone.
            _ = tokio::io::AsyncReadExt::read(&mut rd, &mut scratch) => return false,
            m = rx.recv() => {
                let Some(m) = m else {
                    let _ = wr.shutdown().await;
                    return true;
                };
                out.clear();
                let mut taken = msg_size(&m);
                if let Err(e) = sealer.seal(&m, &mut out) {
                    warn!(error = %e, "cannot encode a message; dropped");
                }
                while out.len() < 1 << 20 {
                    match rx.try_recv() {
                        Ok(m) => {
                            taken += msg_size(&m);
                            if let Err(e) = sealer.seal(&m, &mut out) {
                                warn!(error = %e, "cannot encode a message; dropped");
                            }
                        }
                        Err(_) => break,
                    }
                }
                let written = wr.write_all(&out).await;
                queued.fetch_sub(taken.min(queued.load(Ordering::Relaxed)), Ordering::Relaxed);
                if let Err(e) = written {
                    debug!(error = %e, "write to peer failed");
                    return false;
                }
                sec.stats.bytes_out.fetch_add(out.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Probes under way at most; more requests are dropped (and counted).
const MAX_PROBES_IN_FLIGHT: usize = 16;
/// Connections that have not finished their handshake, at most, in all and
/// from one source address; more are closed at once.
const MAX_PENDING_HANDSHAKES: usize = 256;
const MAX_PENDING_PER_SOURCE: usize = 16;

/// Connections accepted and not yet through their handshake, by source.
#[derive(Clone, Default)]
struct Pending(Arc<std::sync::Mutex<(usize, HashMap<std::net::IpAddr, usize>)>>);

/// Holds one pending slot until the handshake is over.
struct PendingGuard(Pending, std::net::IpAddr);

impl Pending {
    fn enter(&self, ip: std::net::IpAddr) -> Option<PendingGuard> {
        let mut g = self.0.lock().ok()?;
        let (total, by_ip) = &mut *g;
        let n = by_ip.get(&ip).copied().unwrap_or(0);
        if *total >= MAX_PENDING_HANDSHAKES || n >= MAX_PENDING_PER_SOURCE {
            return None;
        }
        *total += 1;
        by_ip.insert(ip, n + 1);
        Some(PendingGuard(self.clone(), ip))
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Ok(mut g) = (self.0).0.lock() {
            let (total, by_ip) = &mut *g;
            *total = total.saturating_sub(1);
            if let Some(n) = by_ip.get_mut(&self.1) {
                *n -= 1;
                if *n == 0 {
                    by_ip.remove(&self.1);
                }
            }
        }
    }
}

/// How long a changed member file must stay the same before it is applied.
const RELOAD_SETTLE: Duration = Duration::from_millis(50);

async fn reload_loop(
    path: PathBuf,
    mut current: MemberFile,
    every: Duration,
    io_tx: mpsc::Sender<IoEvent>,
    cancel: CancellationToken,
) {
    let mut last_text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut last_err = String::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let text = match MemberFile::read_text(&path) {
            Ok(t) => t,
            Err(e) => {
                if last_err != e.to_string() {
                    warn!(error = %e, "member file unreadable; keeping the last good membership");
                    last_err = e.to_string();
                }
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        // A file caught halfway through a write that is not a rename can be
        // valid YAML with members missing: apply a change only once two reads
        // a moment apart agree.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RELOAD_SETTLE) => {}
        }
        if MemberFile::read_text(&path).ok().as_ref() != Some(&text) {
            continue;
        }
        last_text = text.clone();
        match MemberFile::parse(&text, &path.display().to_string()) {
            Ok(mf) => {
                last_err.clear();
                if mf != current {
                    current = mf.clone();
                    if io_tx.send(IoEvent::Members(mf)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                error!(error = %e, "invalid member file; keeping the last good membership");
                last_err = e.to_string();
            }
        }
    }
}
