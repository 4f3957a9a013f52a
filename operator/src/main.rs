//! `sessionmesh-operator`: reconciles SessionCluster resources. Runs as two
//! replicas; a Lease elects the one that reconciles. Serves `/healthz`,
//! `/readyz` and `/metrics`.

use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use sessionmesh_api::{SessionCluster, CLUSTER_ANNOTATION};
use sessionmesh_operator::leader::Elector;
use sessionmesh_operator::reconcile::{error_policy, reconcile, Ctx};
use sessionmesh_operator::serve::{serve, text};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "sessionmesh-operator",
    version,
    about = "Reconciles sessionmesh SessionCluster resources"
)]
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
    /// Address for /healthz, /readyz and /metrics. /readyz is 200 only on the
    /// leader, so a Service in front of the webhook reaches only the leader.
    #[arg(long, default_value = "0.0.0.0:8080")]
    health: SocketAddr,
    /// Serve the mutating admission webhook (HTTPS, path /mutate) on this address.
    #[arg(long)]
    webhook: Option<SocketAddr>,
    /// MutatingWebhookConfiguration whose caBundle the operator keeps patched.
    #[arg(long, default_value = "sessionmesh-injector")]
    webhook_config: String,
    /// Secret (in the lease namespace) holding the webhook's CA and certificate.
    #[arg(long, default_value = "sessionmesh-webhook-tls")]
    webhook_secret: String,
    /// Lifetime of the webhook's self-managed CA and certificate, in days.
    #[arg(long, default_value_t = 365)]
    webhook_cert_days: u64,
    /// Replace them this many days before they expire (checked every minute
    /// by every replica; one writes, the others follow).
    #[arg(long, default_value_t = 30)]
    webhook_cert_renew_days: u64,
    /// Tests only: lifetime,renew-before in seconds (e.g. 20,15), checked every second.
    #[arg(long, hide = true, value_parser = parse_pair)]
    webhook_cert_test_seconds: Option<(u64, u64)>,
    /// Only answer AdmissionReviews from clients with a certificate from this
    /// CA (PEM): the API server, given one through its admission
    /// configuration (docs/install.md). Without it anyone who reaches the port
    /// can ask for an assignment.
    #[arg(long, env = "SESSIONMESH_WEBHOOK_CLIENT_CA")]
    webhook_client_ca: Option<std::path::PathBuf>,
    /// Names and IPs the webhook certificate is valid for (comma-separated).
    #[arg(long, default_value = "sessionmesh-webhook.sessionmesh.svc,127.0.0.1")]
    webhook_hosts: String,
    /// Sidecar image injected when the SessionCluster does not name one.
    #[arg(
        long,
        env = "SESSIONMESH_SIDECAR_IMAGE",
        default_value = "sessionmesh:0.1.0"
    )]
    sidecar_image: String,
    /// Native sidecar support: `auto` (a server-side dry-run create of a pod
    /// with one, in the lease namespace), `true` or `false`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "true", "false"])]
    native_sidecars: String,
    /// How long a route and port handed out at admission stay reserved for a
    /// pod that has not shown up in the API (refused later in admission or
    /// by validation). Longer than the admission chain after this webhook.
    #[arg(long, default_value_t = 10)]
    reservation_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let client = Client::try_default().await?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("sessionmesh-operator-{}", std::process::id()));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "sessionmesh-operator".into(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Arc::new(Ctx::new(client.clone(), recorder));
    let shutdown = CancellationToken::new();
    let leading = Arc::new(AtomicBool::new(false));

    let health = tokio::net::TcpListener::bind(args.health).await?;
    let webhook = match args.webhook {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    println!(
        "{}",
        serde_json::json!({
            "event": "listening",
            "health": health.local_addr()?.to_string(),
            "webhook": webhook.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()),
            "identity": identity,
        })
    );
    let servers = tokio_util::task::TaskTracker::new();
    {
        let (ctx, leading) = (ctx.clone(), leading.clone());
        servers.spawn(serve(
            "health",
            health,
            None,
            move |req| health_route(req, ctx.clone(), leading.clone()),
            shutdown.clone(),
        ));
    }
    if let Some(listener) = webhook {
        start_webhook(&args, &client, listener, &servers, &shutdown).await?;
    }
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    let elector = Elector::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_seconds),
    );
    let Some(lost) = elector.lead(shutdown.clone()).await else {
        return Ok(());
    };
    leading.store(true, Ordering::Relaxed);

    run_controller(&args, &client, ctx.clone(), &shutdown, &lost).await;
    if lost.is_cancelled() && !shutdown.is_cancelled() {
        // Another replica leads now; exit so the Deployment restarts us as a standby.
        anyhow::bail!("lost leadership");
    }
    shutdown.cancel();
    // Open requests finish (bounded); the elector gets a moment to release the lease.
    servers.close();
    servers.wait().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

fn parse_pair(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once(',').ok_or("expected two numbers: A,B")?;
    Ok((
        a.trim().parse().map_err(|e| format!("{a}: {e}"))?,
        b.trim().parse().map_err(|e| format!("{b}: {e}"))?,
    ))
}

/// POST /mutate: the AdmissionReview handler.
async fn mutate(
    req: Request<Incoming>,
    admission: Arc<sessionmesh_operator::webhook::Admission>,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    if req.method() != hyper::Method::POST || req.uri().path() != "/mutate" {
        return json(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"{\"error\":\"POST /mutate\"}"),
        );
    }
    let body = http_body_util::Limited::new(req.into_body(), 8 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes());
    match body {
        Ok(b) => json(
            StatusCode::OK,
            admission.review(&b).await.to_string().into(),
        ),
        Err(_) => json(
            StatusCode::BAD_REQUEST,
            Bytes::from_static(b"{\"error\":\"unreadable body\"}"),
        ),
    }
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = text(status, body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// /healthz, /readyz (200 only on the leader) and /metrics.
async fn health_route(
    req: Request<Incoming>,
    ctx: Arc<Ctx>,
    leading: Arc<AtomicBool>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if leading.load(Ordering::Relaxed) => text(StatusCode::OK, "ok\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "standby\n"),
        "/metrics" => {
            ctx.metrics
                .leader
                .set(i64::from(leading.load(Ordering::Relaxed)));
            let mut r = text(StatusCode::OK, ctx.metrics.render());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    sessionmesh_operator::metrics::CONTENT_TYPE,
                ),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The webhook's certificate (kept in a Secret, its CA in the webhook
/// configuration), the server's sidecar support, and the TLS endpoint.
async fn start_webhook(
    args: &Args,
    client: &Client,
    listener: tokio::net::TcpListener,
    servers: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let hosts: Vec<String> = args
        .webhook_hosts
        .split(',')
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .collect();
    let keeper = sessionmesh_operator::tls::Keeper {
        client: client.clone(),
        namespace: args.lease_namespace.clone(),
        secret: args.webhook_secret.clone(),
        hosts,
        config: args.webhook_config.clone(),
        validity: sessionmesh_operator::tls::Validity {
            lifetime: Duration::from_secs(args.webhook_cert_days.saturating_mul(86_400)),
            renew_before: Duration::from_secs(args.webhook_cert_renew_days.saturating_mul(86_400)),
        }
        .scaled(args.webhook_cert_test_seconds),
        every: Duration::from_secs(60),
    };
    let tls = sessionmesh_operator::tls::load_or_create(
        client,
        &keeper.namespace,
        &keeper.secret,
        &keeper.hosts,
        keeper.validity,
    )
    .await?;
    let slot = sessionmesh_operator::tls::CertSlot::new(tls)?;
    let client_ca = match &args.webhook_client_ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--webhook-client-ca {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let tls_cfg = sessionmesh_operator::tls::server_config(slot.clone(), client_ca.as_deref())?;
    info!(
        client_certificates = client_ca.is_some(),
        "webhook TLS (with client certificates, only the API server is answered)"
    );
    let every = if args.webhook_cert_test_seconds.is_some() {
        Duration::from_secs(1)
    } else {
        keeper.every
    };
    tokio::spawn(sessionmesh_operator::tls::Keeper { every, ..keeper }.run(slot, shutdown.clone()));
    let version = client.apiserver_version().await?;
    info!(server = %version.git_version, "webhook ready");
    let cfg = sessionmesh_operator::webhook::InjectConfig {
        image: args.sidecar_image.clone(),
        native_supported: args.native_sidecars == "true",
        reservation: Duration::from_secs(args.reservation_seconds),
    };
    let admission = Arc::new(if args.native_sidecars == "auto" {
        sessionmesh_operator::webhook::Admission::detecting(
            client.clone(),
            cfg,
            &args.lease_namespace,
        )
    } else {
        sessionmesh_operator::webhook::Admission::new(client.clone(), cfg)
    });
    {
        // Found out now rather than at the first pod (the probe pod does not
        // match the webhook's object selector, so this never waits for itself).
        let admission = admission.clone();
        tokio::spawn(async move { admission.native_supported().await });
    }
    servers.spawn(serve(
        "webhook",
        listener,
        Some(tokio_rustls::TlsAcceptor::from(tls_cfg)),
        move |req| mutate(req, admission.clone()),
        shutdown.clone(),
    ));
    Ok(())
}

/// Cancels `sd` on SIGTERM or Ctrl-C.
async fn cancel_on_signal(sd: CancellationToken) {
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
}

/// Reconciles SessionClusters (and their pods' changes) until shutdown or
/// until the lease is lost.
async fn run_controller(
    args: &Args,
    client: &Client,
    ctx: Arc<Ctx>,
    shutdown: &CancellationToken,
    lost: &CancellationToken,
) {
    let (clusters, pods): (Api<SessionCluster>, Api<Pod>) = match &args.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
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
            pod.annotations()
                .get(CLUSTER_ANNOTATION)
                .map(|c| ObjectRef::<SessionCluster>::new(c).within(&ns))
        })
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {})
        .await;
}
