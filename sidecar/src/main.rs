//! `sessionmesh-sidecar`: `run` a member, or run the `demo`.

use clap::{Args, Parser, Subcommand};
use sessionmesh_sidecar::core::detector::DetectorConfig;
use sessionmesh_sidecar::core::store::Limits;
use sessionmesh_sidecar::core::{CoreConfig, SendMode};
use sessionmesh_sidecar::node::{self, NodeConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "sessionmesh-sidecar",
    version,
    about = "Replicated HTTP session store for the app next to it"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one member of a cluster.
    Run(Box<RunArgs>),
    #[cfg(feature = "demo")]
    /// The seed scenario on loopback: 3 app instances with sidecars behind a load balancer;
    /// SIGKILL the node holding a user's session and show the session survive.
    Demo {
        /// Load balancer: auto (HAProxy if installed, else built-in), haproxy, builtin.
        #[arg(long, default_value = "auto")]
        lb: String,
    },
    #[cfg(feature = "demo")]
    /// The demo web app: a per-user counter in the session, through the local sidecar.
    DemoApp(DemoAppArgs),
    /// Wait, then exit (a preStop hook for images without a shell).
    Pause {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

#[cfg(feature = "demo")]
#[derive(Args)]
struct DemoAppArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The local sidecar's HTTP API.
    #[arg(long, default_value = "127.0.0.1:7070")]
    sidecar: SocketAddr,
    /// This instance's jvmRoute (cookie suffix).
    #[arg(long, env = "SESSIONMESH_JVM_ROUTE")]
    route: String,
    #[arg(long, default_value = "app")]
    name: String,
    /// sync or async writes to the sidecar.
    #[arg(long, default_value = "sync")]
    send: String,
    /// The sidecar's API token (injected by the operator).
    #[arg(long, env = "SESSIONMESH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    /// Static member file (YAML), hot-reloaded.
    #[arg(
        long,
        env = "SESSIONMESH_MEMBERS_FILE",
        conflicts_with = "kube_membership"
    )]
    members: Option<PathBuf>,
    /// The operator's membership document, `namespace/configmap`, watched through the API server.
    #[arg(long, env = "SESSIONMESH_KUBE_MEMBERSHIP")]
    kube_membership: Option<String>,
    /// This member's name in the member file.
    #[arg(long, env = "SESSIONMESH_MEMBER")]
    member: String,
    /// Local HTTP API address (keep it on loopback).
    #[arg(long, env = "SESSIONMESH_HTTP", default_value = "127.0.0.1:7070")]
    http: SocketAddr,
    /// Bind address for replication, if it differs from the member's address (e.g. 0.0.0.0:4000).
    #[arg(long, env = "SESSIONMESH_LISTEN")]
    listen: Option<SocketAddr>,
    /// File holding the cluster secret.
    #[arg(long, env = "SESSIONMESH_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// The cluster secret itself (prefer --secret-file).
    #[arg(long, env = "SESSIONMESH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// What a SessionCluster sets for every member (the webhook renders the
    /// same type into these flags).
    #[command(flatten)]
    settings: sessionmesh_api::ClusterSettings,
    /// Members asked to probe a suspect on our behalf.
    #[arg(long, default_value_t = 2)]
    indirect_probes: usize,
    /// How long a write may wait for acknowledgements or queue space.
    #[arg(long, default_value_t = 2000)]
    write_timeout_ms: u64,
    /// Unacknowledged bytes per peer above which writes wait.
    #[arg(long, default_value_t = 64 << 20)]
    max_queue_bytes: usize,
    #[arg(long, default_value_t = 4 << 20)]
    transfer_chunk_bytes: usize,
    #[arg(long, default_value_t = 3000)]
    transfer_stall_ms: u64,
    #[arg(long, default_value_t = 1500)]
    startup_wait_ms: u64,
    #[arg(long, default_value_t = 5000)]
    anti_entropy_interval_ms: u64,
    #[arg(long, default_value_t = 1000)]
    touch_flush_ms: u64,
    #[arg(long, default_value_t = 600_000)]
    tombstone_ttl_ms: u64,
    #[arg(long, default_value_t = 1 << 20)]
    max_attr_bytes: usize,
    #[arg(long, default_value_t = 64 << 20)]
    max_frame_bytes: usize,
    /// How far ahead of this member's clock a peer's timestamp may be; further
    /// ahead it is refused. A member whose clock is off most of its peers' by
    /// more than this reports it and turns not ready.
    #[arg(long, env = "SESSIONMESH_MAX_CLOCK_SKEW_MS", default_value_t = 1000)]
    max_clock_skew_ms: u64,
    /// How long a starting member waits (not ready) for peers that accept
    /// connections but never answer, before it serves with an empty store.
    #[arg(long, default_value_t = 30_000)]
    silent_peer_wait_ms: u64,
    /// Backup mode: how long a member that holds no copy of a session waits
    /// for the session's holders to send it.
    #[arg(long, default_value_t = 500)]
    fetch_timeout_ms: u64,
    #[arg(long, default_value_t = 1000)]
    reload_interval_ms: u64,
    #[arg(long, default_value_t = 5000)]
    leave_timeout_ms: u64,
    #[arg(long, default_value_t = 200)]
    connect_timeout_ms: u64,
    /// text or json
    #[arg(long, env = "SESSIONMESH_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Serve the Redis protocol (RESP2/RESP3) on this address, e.g. 127.0.0.1:6379.
    #[arg(long, env = "SESSIONMESH_REDIS")]
    redis: Option<SocketAddr>,
    /// Password for Redis AUTH / HELLO AUTH (user `default`); none by default.
    #[arg(long, env = "SESSIONMESH_REDIS_PASSWORD", hide_env_values = true)]
    redis_password: Option<String>,
    /// Serve only /healthz, /readyz and /metrics on this address too (for kubelet probes, which
    /// cannot reach the loopback API).
    #[arg(long, env = "SESSIONMESH_PROBE")]
    probe: Option<SocketAddr>,
    /// Runtime threads: 1 (default) runs the member on one thread, which costs
    /// the least CPU per request; 0 uses one per core, for apps that need more
    /// than one core's worth of session traffic (about 20k requests/s).
    #[arg(long, env = "SESSIONMESH_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    /// A file holding a token every local API request must carry as
    /// `Authorization: Bearer <token>` (the probes excepted).
    #[arg(long, env = "SESSIONMESH_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Most open connections on the local HTTP API (and on the probe port);
    /// more are closed at once and counted.
    #[arg(long, default_value_t = 1024)]
    http_max_connections: usize,
    /// A local HTTP connection that sends no complete request header for this
    /// long is closed.
    #[arg(long, default_value_t = 30_000)]
    http_idle_timeout_ms: u64,
    /// Tests only: serve `POST /v1/test/freeze-core?ms=N`, which blocks the
    /// core task as a stuck core would be.
    #[arg(long, hide = true)]
    test_hooks: bool,
    /// Most simultaneous Redis connections.
    #[arg(long, default_value_t = 10_000)]
    redis_max_clients: usize,
    /// How the Redis endpoint's writes replicate, whatever --send says: sync
    /// (the default) answers once every live member has the write, so a
    /// logout (DEL) on one member is seen on all before the app goes on, and
    /// non-sticky routing cannot bring a logged-out session back; async
    /// answers after the local apply.
    #[arg(long, env = "SESSIONMESH_REDIS_SEND", default_value = "sync")]
    redis_send: SendMode,
    /// Let FLUSHDB and FLUSHALL delete every key on every member (test
    /// set-ups; frameworks' own test suites call them). Off by default.
    #[arg(long, env = "SESSIONMESH_ALLOW_FLUSH")]
    allow_flush: bool,
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// One thread by default: a replicated write crosses several tasks (API,
/// core, peer writers and readers), and on one thread handing work between
/// them is a queue push instead of a cross-thread wake-up (measured: sidecar
/// CPU per demo request 88 -> 65 us; docs/operations.md, "Sizing").
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().build()
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Run(a) => a.worker_threads,
        // The demo drives processes with blocking waits next to its built-in router.
        #[cfg(feature = "demo")]
        Cmd::Demo { .. } => 0,
        // The demo app is small; one thread is plenty.
        _ => 1,
    };
    let rt = runtime(threads)?;
    match cli.cmd {
        Cmd::Run(a) => {
            init_logs(&a.log_format);
            rt.block_on(run(*a))
        }
        #[cfg(feature = "demo")]
        Cmd::Demo { lb } => {
            let lb = match lb.as_str() {
                "auto" => sessionmesh_sidecar::demo::stack::LbChoice::Auto,
                "haproxy" => sessionmesh_sidecar::demo::stack::LbChoice::Haproxy,
                "builtin" => sessionmesh_sidecar::demo::stack::LbChoice::Builtin,
                other => anyhow::bail!("--lb must be auto, haproxy or builtin, not {other:?}"),
            };
            rt.block_on(sessionmesh_sidecar::demo::scenario::run(lb))
        }
        Cmd::Pause { seconds } => {
            std::thread::sleep(Duration::from_secs(seconds));
            Ok(())
        }
        #[cfg(feature = "demo")]
        Cmd::DemoApp(a) => rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(a.listen).await?;
            println!("{}", serde_json::json!({"event": "listening", "http": listener.local_addr()?.to_string()}));
            sessionmesh_sidecar::demo::app::serve(
                listener,
                sessionmesh_sidecar::demo::app::AppConfig { name: a.name, route: a.route, sidecar: a.sidecar, send: a.send, token: a.api_token },
            )
            .await;
            Ok(())
        }),
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    sessionmesh_sidecar::core::identity::check_random()
        .map_err(|e| anyhow::anyhow!("{e}; refusing to start"))?;
    warn_about_secrets_in_args();
    if !a.http.ip().is_loopback() {
        tracing::warn!(http = %a.http, "the local API is not on loopback: anyone who can reach it can read sessions");
    }
    let cfg = node_config(&a)?;
    let shutdown = CancellationToken::new();
    let started = match node::start(cfg, shutdown.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return Err(e);
        }
    };
    let http = tokio::net::TcpListener::bind(a.http)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the HTTP API on {}: {e}", a.http))?;
    let http_addr = http.local_addr()?;
    let redis = bind_redis(&a).await?;
    let redis_addr = redis.as_ref().and_then(|l| l.local_addr().ok());
    println!(
        "{}",
        serde_json::json!({
            "event": "listening",
            "member": started.handle.me.name,
            "http": http_addr.to_string(),
            "redis": redis_addr.map(|a| a.to_string()),
            "replication": started.replication_addr.to_string(),
        })
    );
    let redis_stop = CancellationToken::new();
    let redis_task = redis.map(|l| {
        tracing::info!(redis = ?redis_addr, "Redis endpoint listening");
        let cfg = resp_config(&a);
        tokio::spawn(sessionmesh_sidecar::front::resp::server::serve(
            l,
            started.handle.clone(),
            cfg,
            redis_stop.clone(),
        ))
    });
    tracing::info!(http = %http_addr, "local API listening");
    let api_stop = CancellationToken::new();
    let token = read_token(&a)?;
    let http_limits = sessionmesh_sidecar::front::http::HttpLimits {
        max_connections: a.http_max_connections.max(1),
        idle_timeout: Duration::from_millis(a.http_idle_timeout_ms.max(10)),
        token,
    };
    let api = tokio::spawn(sessionmesh_sidecar::front::http::serve(
        http,
        started.handle.clone(),
        http_limits.clone(),
        api_stop.clone(),
    ));
    if let Some(addr) = a.probe {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot bind the probe address {addr}: {e}"))?;
        tokio::spawn(sessionmesh_sidecar::front::http::serve_probes(
            l,
            started.handle.clone(),
            http_limits,
            api_stop.clone(),
        ));
    }

    let done = wait_for_signal(started.done).await?;
    shutdown.cancel();
    let _ = done.await;
    api_stop.cancel();
    redis_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), api).await;
    if let Some(t) = redis_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    Ok(())
}

/// The cluster secret from `--secret-file` or the environment: at least 16
/// bytes once surrounding ASCII white space (a trailing newline) is dropped.
fn read_secret(a: &RunArgs) -> anyhow::Result<Vec<u8>> {
    let secret = match (&a.secret_file, &a.secret) {
        (Some(f), _) => std::fs::read(f)
            .map_err(|e| anyhow::anyhow!("cannot read --secret-file {}: {e}", f.display()))?,
        (None, Some(s)) => s.as_bytes().to_vec(),
        (None, None) => {
            anyhow::bail!("a cluster secret is required: --secret-file or SESSIONMESH_SECRET")
        }
    };
    // Bytes as they are (a binary secret stays intact); only surrounding ASCII
    // white space, such as the newline `echo` leaves, is dropped.
    let secret: Vec<u8> = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        anyhow::bail!("the cluster secret must be at least 16 bytes");
    }
    Ok(secret)
}

/// The core's settings from the command line.
fn core_config(a: &RunArgs) -> CoreConfig {
    CoreConfig {
        cluster: String::new(),
        send: a.settings.send,
        heartbeat_interval_ms: a.settings.heartbeat_interval_ms,
        detector: DetectorConfig {
            suspect_after_ms: a.settings.suspect_after_ms,
            probe_timeout_ms: a.settings.probe_timeout_ms,
            indirect_probes: a.indirect_probes,
        },
        write_timeout_ms: a.write_timeout_ms,
        max_queue_bytes: a.max_queue_bytes,
        transfer_chunk_bytes: a.transfer_chunk_bytes,
        transfer_stall_ms: a.transfer_stall_ms,
        startup_wait_ms: a.startup_wait_ms,
        anti_entropy_interval_ms: a.anti_entropy_interval_ms.max(100),
        touch_flush_ms: a.touch_flush_ms,
        sweep_interval_ms: 1000,
        tombstone_ttl_ms: a.tombstone_ttl_ms,
        default_max_inactive_ms: a.settings.max_inactive_seconds.saturating_mul(1000),
        limits: Limits {
            max_attr_bytes: a.max_attr_bytes,
            max_session_bytes: usize::try_from(a.settings.max_session_bytes).unwrap_or(usize::MAX),
            max_sessions: usize::try_from(a.settings.max_sessions).unwrap_or(usize::MAX),
            max_attr_name: 1024,
        },
        max_frame_bytes: a.max_frame_bytes,
        max_clock_skew_ms: a.max_clock_skew_ms,
        silent_peer_wait_ms: a.silent_peer_wait_ms,
        backups: (a.settings.replication == sessionmesh_api::ReplicationMode::Backup)
            .then_some(usize::from(a.settings.backups)),
        fetch_timeout_ms: a.fetch_timeout_ms,
    }
}

/// Where the member list comes from: a file, or the operator's document.
fn membership_source(a: &RunArgs) -> anyhow::Result<node::MembershipSource> {
    Ok(match (a.members.clone(), &a.kube_membership) {
        (Some(p), _) => node::MembershipSource::File(p),
        (None, Some(k)) => {
            let Some((namespace, name)) = k.split_once('/') else {
                anyhow::bail!("--kube-membership must be namespace/configmap, not {k:?}");
            };
            node::MembershipSource::Kube {
                namespace: namespace.into(),
                name: name.into(),
            }
        }
        (None, None) => anyhow::bail!(
            "give a membership source: --members FILE or --kube-membership NAMESPACE/CONFIGMAP"
        ),
    })
}

/// The local API's bearer token from `--api-token-file`, if one is given.
fn read_token(a: &RunArgs) -> anyhow::Result<Option<std::sync::Arc<Vec<u8>>>> {
    Ok(match &a.api_token_file {
        Some(f) => {
            let t = std::fs::read(f).map_err(|e| {
                anyhow::anyhow!("cannot read --api-token-file {}: {e}", f.display())
            })?;
            let t = t.trim_ascii().to_vec();
            anyhow::ensure!(
                t.len() >= 16,
                "the API token in --api-token-file must be at least 16 bytes"
            );
            Some(std::sync::Arc::new(t))
        }
        None => None,
    })
}

/// The Redis endpoint's listener, when `--redis` asks for one.
async fn bind_redis(a: &RunArgs) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    Ok(match a.redis {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot bind the Redis endpoint on {addr}: {e}"))?;
            if !addr.ip().is_loopback() {
                tracing::warn!(redis = %addr, "the Redis endpoint is not on loopback");
            }
            Some(l)
        }
        None => None,
    })
}

/// The Redis endpoint's settings from the command line.
fn resp_config(a: &RunArgs) -> sessionmesh_sidecar::front::resp::server::RespConfig {
    let session_bytes = usize::try_from(a.settings.max_session_bytes).unwrap_or(usize::MAX);
    sessionmesh_sidecar::front::resp::server::RespConfig {
        password: a.redis_password.clone(),
        max_clients: a.redis_max_clients,
        send: a.redis_send,
        allow_flush: a.allow_flush,
        limits: sessionmesh_sidecar::front::resp::protocol::Limits {
            max_bulk: a.max_attr_bytes.max(session_bytes),
            max_args: 1 << 20,
            max_request: (16usize << 20).max(session_bytes.saturating_mul(2)),
        },
    }
}

/// The member's settings from the command line.
fn node_config(a: &RunArgs) -> anyhow::Result<NodeConfig> {
    a.settings
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid setting ({e})"))?;
    let secret = read_secret(a)?;
    let core = core_config(a);
    let members = membership_source(a)?;
    Ok(NodeConfig {
        core,
        member: a.member.clone(),
        members,
        secret,
        listen: a.listen,
        reload_interval: Duration::from_millis(a.reload_interval_ms.max(50)),
        leave_timeout: Duration::from_millis(a.leave_timeout_ms),
        connect_timeout: Duration::from_millis(a.connect_timeout_ms),
        tick: Duration::from_millis(10),
        test_hooks: a.test_hooks,
    })
}

/// Waits for SIGTERM or SIGINT; exits at once if the core task ends on its own.
async fn wait_for_signal(
    mut done: tokio::task::JoinHandle<()>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: leaving the cluster"),
        _ = int.recv() => tracing::info!("SIGINT: leaving the cluster"),
        r = &mut done => {
            // The core task ended on its own (a panic, in a build that unwinds):
            // a member without its core must not linger looking alive.
            tracing::error!(panicked = r.is_err(), "the core task ended; exiting");
            std::process::exit(70);
        }
    }
    Ok(done)
}

/// A secret on the command line is visible to every user of the host.
fn warn_about_secrets_in_args() {
    for flag in ["--secret", "--redis-password"] {
        if std::env::args().any(|x| x == flag || x.starts_with(&format!("{flag}="))) {
            tracing::warn!(flag, "a secret on the command line is visible to every user of this host (ps); prefer --secret-file or the environment");
        }
    }
}
