//! Peer connections: the listener that authenticates inbound members, the
//! dialer and writer of each outbound link, and the caps on handshakes under way.

use super::core_task::CoreGate;
use super::{mono_ms, IoEvent};
use crate::core::message::PeerMsg;
use crate::net::transport::{self, Security};
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// What the listener needs besides its socket.
pub(super) struct Listener {
    pub(super) sec: Security,
    pub(super) ready: Arc<AtomicBool>,
    pub(super) known: Arc<RwLock<Vec<String>>>,
    pub(super) gate: CoreGate,
    pub(super) io_tx: mpsc::Sender<IoEvent>,
    pub(super) cancel: CancellationToken,
    pub(super) tracker: TaskTracker,
}

pub(super) async fn accept_loop(listener: TcpListener, l: Listener) {
    let Listener {
        sec,
        ready,
        known,
        gate,
        io_tx,
        cancel,
        tracker,
    } = l;
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

pub(super) async fn inbound(
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

/// Longest wait between two dials of a peer that is not there.
const DIAL_MAX_DELAY: Duration = Duration::from_millis(500);

/// Waits between dials: 25 ms doubling to `DIAL_MAX_DELAY`, jittered so that
/// members that lost the same peer do not dial it in lockstep.
fn dial_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(25))
        .with_max_delay(DIAL_MAX_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Logs a failed dial (loudly when the peer refused us, once per streak when
/// it is not there) and says what it means for a starting member.
fn classify_dial_error(
    name: &str,
    addr: SocketAddr,
    e: &transport::TransportError,
    failures: u32,
) -> crate::core::Down {
    use transport::TransportError as E;
    let refused = matches!(e, E::Auth(_) | E::Rejected(_) | E::Protocol(_));
    if refused {
        error!(peer = %name, %addr, error = %e, "peer refused the handshake; check the cluster secret and member file");
        return crate::core::Down::Refused;
    }
    if failures == 1 {
        info!(peer = %name, %addr, error = %e, "cannot reach peer; retrying with backoff");
    } else {
        debug!(peer = %name, %addr, error = %e, "cannot reach peer");
    }
    if matches!(e, E::Silent) {
        crate::core::Down::Silent
    } else {
        crate::core::Down::Lost
    }
}

/// One peer's outbound link, as its dialer and writer see it.
pub(super) struct Outbound {
    pub(super) name: String,
    pub(super) addr: SocketAddr,
    pub(super) sec: Security,
    /// Bytes handed to the writer and not yet written.
    pub(super) queued: Arc<std::sync::atomic::AtomicUsize>,
    pub(super) io_tx: mpsc::Sender<IoEvent>,
    pub(super) cancel: CancellationToken,
    /// Dial now instead of waiting out the back-off.
    pub(super) kick: Arc<tokio::sync::Notify>,
    pub(super) connect_timeout: Duration,
}

pub(super) async fn outbound_loop(o: Outbound, mut rx: mpsc::UnboundedReceiver<PeerMsg>) {
    let Outbound {
        name,
        addr,
        sec,
        queued,
        io_tx,
        cancel,
        kick,
        connect_timeout,
    } = o;
    let mut delays = dial_backoff();
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
                delays = dial_backoff();
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
                let down = classify_dial_error(&name, addr, &e, failures);
                let _ = io_tx
                    .send(IoEvent::OutboundDown {
                        peer: name.clone(),
                        down,
                    })
                    .await;
                drain_queue(&mut rx, &queued);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delays.next().unwrap_or(DIAL_MAX_DELAY)) => {}
                    _ = kick.notified() => {}
                }
            }
        }
    }
}

/// Writes queued messages, batching whatever is ready into one syscall.
/// Returns true when the queue was closed (orderly shutdown), false when the
/// connection broke.
/// Empties a writer's queue (the connection is gone), keeping the count right.
pub(super) fn drain_queue(
    rx: &mut mpsc::UnboundedReceiver<PeerMsg>,
    queued: &std::sync::atomic::AtomicUsize,
) {
    while let Ok(m) = rx.try_recv() {
        queued.fetch_sub(
            msg_size(&m).min(queued.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
    }
}

/// What a message counts for in a writer's queue.
pub(super) fn msg_size(m: &PeerMsg) -> usize {
    match m {
        PeerMsg::Deltas { deltas, .. } => 16 + deltas.iter().map(|d| d.size_hint()).sum::<usize>(),
        _ => 64,
    }
}

pub(super) async fn write_loop(
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
pub(super) const MAX_PROBES_IN_FLIGHT: usize = 16;
/// Connections that have not finished their handshake, at most, in all and
/// from one source address; more are closed at once.
pub(super) const MAX_PENDING_HANDSHAKES: usize = 256;
pub(super) const MAX_PENDING_PER_SOURCE: usize = 16;

/// Connections accepted and not yet through their handshake, by source.
#[derive(Clone, Default)]
pub(super) struct Pending(Arc<std::sync::Mutex<(usize, HashMap<std::net::IpAddr, usize>)>>);

/// Holds one pending slot until the handshake is over.
pub(super) struct PendingGuard(Pending, std::net::IpAddr);

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
