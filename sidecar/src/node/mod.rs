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
use crate::core::identity::{Generation, NodeId, SessionId};
use crate::core::message::PeerMsg;

mod core_task;
mod links;
mod reload;
pub mod txn;
pub mod watch;

use core_task::{CoreGate, CoreTask};
use links::{accept_loop, Listener};
use reload::reload_loop;

pub use txn::{Results, Step, Ticket, Tx};

use crate::core::{Core, CoreConfig, MemberView, Phase, Stats};
use crate::membership::{MemberFile, MemberSpec};
use crate::net::transport::{IoStats, Security};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

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
    /// A front-end's transaction (see `txn`), and the sessions it works on:
    /// in backup mode those this member holds no copy of are fetched first.
    Txn(Vec<SessionId>, txn::TxnFn),
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
    /// Backup mode's counters; `None` in `all` mode.
    #[serde(skip)]
    pub backup: Option<crate::core::BackupStats>,
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
    /// The cluster-wide settings this member runs with (`/v1/cluster`).
    pub settings: sessionmesh_api::ClusterSettings,
    /// Apps watching for changed sessions (`GET /v1/changes`).
    pub watchers: Arc<watch::Watchers>,
}

/// The settings a SessionCluster gives every member, as this member uses them.
fn settings_of(c: &CoreConfig) -> sessionmesh_api::ClusterSettings {
    sessionmesh_api::ClusterSettings {
        send: c.send,
        replication: if c.backups.is_some() {
            sessionmesh_api::ReplicationMode::Backup
        } else {
            sessionmesh_api::ReplicationMode::All
        },
        backups: c.backups.map_or(1, |k| u8::try_from(k).unwrap_or(u8::MAX)),
        heartbeat_interval_ms: c.heartbeat_interval_ms,
        suspect_after_ms: c.detector.suspect_after_ms,
        probe_timeout_ms: c.detector.probe_timeout_ms,
        max_inactive_seconds: c.default_max_inactive_ms / 1000,
        max_session_bytes: c.limits.max_session_bytes as u64,
        max_sessions: c.limits.max_sessions as u64,
    }
}

/// How long a peer has for its part of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(1_000);

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
        self.txn_on(Vec::new(), f).await
    }

    /// A transaction on the sessions `ids`: in backup mode, those this member
    /// holds no copy of are fetched from their holders before it runs.
    pub async fn txn_on<T: Send + 'static>(
        &self,
        ids: Vec<SessionId>,
        f: impl FnOnce(&mut Tx<'_>) -> Step<T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.cmd_tx
            .send(Command::Txn(ids, txn::boxed(f, tx)))
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
    let (kube, mf) = load_members(&cfg).await?;
    let me_spec = my_entry(&cfg, &mf)?;
    let listener = bind_replication(&cfg, &me_spec).await?;
    let replication_addr = listener.local_addr()?;
    // Every start is a new life of the member: peers tell it from the last one.
    let me = NodeId::new(cfg.member.clone(), Generation::random());
    let mut core_cfg = cfg.core.clone();
    core_cfg.cluster = mf.cluster.clone();
    let io = Arc::new(IoStats::default());
    let sec = Security {
        cluster: mf.cluster.clone(),
        me: me.clone(),
        secret: Arc::new(cfg.secret.clone()),
        max_frame: core_cfg.max_frame_bytes,
        handshake_timeout: HANDSHAKE_TIMEOUT,
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
        io,
        me: me.clone(),
        jvm_route: me_spec.jvm_route.clone(),
        limits: core_cfg.limits.clone(),
        default_max_inactive_ms: core_cfg.default_max_inactive_ms,
        core_beat: core_beat.clone(),
        test_hooks: cfg.test_hooks,
        settings: settings_of(&core_cfg),
        watchers: Arc::default(),
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
    let peers_in = Listener {
        sec: sec.clone(),
        ready: ready.clone(),
        known: known.clone(),
        gate,
        io_tx: io_tx.clone(),
        cancel: net_cancel.clone(),
        tracker: tracker.clone(),
    };
    tracker.spawn(accept_loop(listener, peers_in));
    watch_members(&cfg, kube, &mf, &tracker, &io_tx, &net_cancel);
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
        watchers: handle.watchers.clone(),
    };
    let done = tokio::spawn(runner.run_to_end(mf, cmd_rx, io_rx, shutdown));
    Ok(Started {
        handle,
        replication_addr,
        done,
    })
}

/// The member list at start: the file, or the operator's document once it
/// names this member (and the API client that watches it from then on).
async fn load_members(cfg: &NodeConfig) -> anyhow::Result<(Option<kube::Client>, MemberFile)> {
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
    Ok((kube, mf))
}

/// Keeps the member list current: reloads the file, or watches the document.
fn watch_members(
    cfg: &NodeConfig,
    kube: Option<kube::Client>,
    mf: &MemberFile,
    tracker: &TaskTracker,
    io_tx: &mpsc::Sender<IoEvent>,
    net_cancel: &CancellationToken,
) {
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
}

/// The replication listener: a member that cannot bind it refuses to start
/// rather than run without replication.
async fn bind_replication(cfg: &NodeConfig, me_spec: &MemberSpec) -> anyhow::Result<TcpListener> {
    let listen = cfg.listen.unwrap_or(me_spec.address);
    TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot bind the replication port {listen} for member {:?}: {e}. Every member on a host needs its own receiver port; \
             refusing to start rather than run without replication",
            cfg.member
        )
    })
}

/// This member's entry in the list; starting without one is an error.
fn my_entry(cfg: &NodeConfig, mf: &MemberFile) -> anyhow::Result<MemberSpec> {
    let Some(me_spec) = mf.get(&cfg.member).cloned() else {
        anyhow::bail!(
            "member {:?} is not in {} (members: {})",
            cfg.member,
            cfg.members,
            mf.names().join(", ")
        );
    };
    Ok(me_spec)
}
