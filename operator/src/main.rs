//! `sessionmesh-operator`: reconciles SessionCluster resources. Runs as two
//! replicas; a Lease elects the one that reconciles. Serves `/healthz`,
//! `/readyz` and `/metrics`.

use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use sessionmesh_api::{SessionCluster, CLUSTER_ANNOTATION};
use sessionmesh_operator::leader::Elector;
use sessionmesh_operator::reconcile::{error_policy, reconcile, Ctx};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(name = "sessionmesh-operator", version, about = "Reconciles sessionmesh SessionCluster resources")]
struct Args {
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "SESSIONMESH_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "sessionmesh-operator-leader")]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name in Kubernetes).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration in seconds: a dead leader is replaced after this long.
    #[arg(long, default_value_t = 10)]
    lease_seconds: u64,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    health: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let client = Client::try_default().await?;
    let identity = args.identity.clone().unwrap_or_else(|| format!("sessionmesh-operator-{}", std::process::id()));
    let recorder = Recorder::new(client.clone(), Reporter { controller: "sessionmesh-operator".into(), instance: Some(identity.clone()) });
    let ctx = Arc::new(Ctx::new(client.clone(), recorder));
    let shutdown = CancellationToken::new();
    let leading = Arc::new(AtomicBool::new(false));

    let health = tokio::net::TcpListener::bind(args.health).await?;
    println!("{}", serde_json::json!({"event": "listening", "health": health.local_addr()?.to_string(), "identity": identity}));
    tokio::spawn(serve_health(health, ctx.clone(), leading.clone()));

    let sd = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutting down");
        sd.cancel();
    });

    let elector = Elector::new(client.clone(), &args.lease_namespace, &args.lease_name, &identity, Duration::from_secs(args.lease_seconds));
    let Some(lost) = elector.lead(shutdown.clone()).await else { return Ok(()) };
    leading.store(true, Ordering::Relaxed);

    let (clusters, pods): (Api<SessionCluster>, Api<Pod>) = match &args.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let stop = {
        let (s, l) = (shutdown.clone(), lost.clone());
        async move {
            tokio::select! {
                _ = s.cancelled() => {}
                _ = l.cancelled() => {}
            }
        }
    };
    Controller::new(clusters, watcher::Config::default())
        .watches(pods, watcher::Config::default(), |pod: Pod| {
            let ns = pod.namespace().unwrap_or_default();
            pod.annotations().get(CLUSTER_ANNOTATION).map(|c| ObjectRef::<SessionCluster>::new(c).within(&ns))
        })
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {})
        .await;
    if lost.is_cancelled() && !shutdown.is_cancelled() {
        // Another replica leads now; exit so the Deployment restarts us as a standby.
        anyhow::bail!("lost leadership");
    }
    shutdown.cancel();
    // Give the elector a moment to release the lease.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

async fn serve_health(listener: tokio::net::TcpListener, ctx: Arc<Ctx>, leading: Arc<AtomicBool>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (ctx, leading) = (ctx.clone(), leading.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (ctx, leading) = (ctx.clone(), leading.clone());
                async move {
                    let m = &ctx.metrics;
                    let body = match req.uri().path() {
                        "/healthz" | "/readyz" => "ok\n".to_owned(),
                        "/metrics" => format!(
                            "# TYPE sessionmesh_operator_leader gauge\nsessionmesh_operator_leader {}\n\
                             # TYPE sessionmesh_operator_reconciles_total counter\nsessionmesh_operator_reconciles_total {}\n\
                             # TYPE sessionmesh_operator_reconcile_failures_total counter\nsessionmesh_operator_reconcile_failures_total {}\n\
                             # TYPE sessionmesh_operator_last_reconcile_seconds gauge\nsessionmesh_operator_last_reconcile_seconds {}\n",
                            u8::from(leading.load(Ordering::Relaxed)),
                            m.reconciles.load(Ordering::Relaxed),
                            m.failures.load(Ordering::Relaxed),
                            m.last_reconcile_us.load(Ordering::Relaxed) as f64 / 1e6,
                        ),
                        _ => {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
                            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                            return Ok::<_, std::convert::Infallible>(r);
                        }
                    };
                    Ok(Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
