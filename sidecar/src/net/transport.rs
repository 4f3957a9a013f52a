//! TCP transport between sidecars: the authenticated handshake, frame I/O, and
//! the direct liveness probe.
//!
//! Handshake: `Hello{nonce} -> Challenge{nonce, proof} -> Auth{proof, sealed
//! identity} -> Welcome{sealed identity} | Reject`. The listener proves it
//! holds the cluster secret first (HMAC-SHA256 over the cluster and both
//! nonces); only then does the dialer prove itself and say who it is, sealed
//! under a key from the secret and both nonces. So nothing names a member or
//! the cluster in clear, and a dialer tells nothing to an address that does
//! not hold the secret. Until it completes, frames are limited to
//! `MAX_HANDSHAKE_FRAME` bytes; after it, every frame is sealed (`seal`).

use crate::core::identity::{fill_random, NodeId};
use crate::core::message::PeerMsg;
use crate::net::frame::{
    self, FrameType, Handshake, HelloInner, WelcomeInner, WireError, MAX_HANDSHAKE_FRAME,
};
pub use crate::net::seal::{Keys, Sealer};
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a connection failed. Connection-scoped: the connection is closed and
/// no member state was changed by the transport itself.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("peer closed the connection")]
    Closed,
    #[error("timed out")]
    Timeout,
    /// The TCP connection was accepted but the handshake got no answer in
    /// time: something is listening there (a hung process, a stuck core).
    #[error("connected, but no answer to the handshake in time")]
    Silent,
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("peer refused us: {0}")]
    Rejected(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Counters shared by every connection, for `/metrics`.
#[derive(Debug, Default)]
pub struct IoStats {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub frame_errors: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Open Redis-protocol connections (kept here so /metrics can show it).
    pub redis_clients: AtomicU64,
    /// Peer connections closed unanswered because the core task was stuck.
    pub core_stalled_refusals: AtomicU64,
    /// Probe requests dropped: too many probes were under way.
    pub probes_dropped: AtomicU64,
    /// Delta batches held back because a peer's writer queue was full.
    pub send_queue_full: AtomicU64,
    /// Replication connections closed before their handshake: too many pending.
    pub pending_refused: AtomicU64,
    /// Local HTTP connections closed at once because the cap was reached.
    pub http_refused: AtomicU64,
    /// Failed Redis AUTH / HELLO AUTH attempts.
    pub redis_auth_failures: AtomicU64,
    /// Redis clients disconnected for reading none of their replies in time.
    pub redis_output_stalls: AtomicU64,
}

#[derive(Clone)]
pub struct Security {
    pub cluster: String,
    pub me: NodeId,
    pub secret: Arc<Vec<u8>>,
    pub max_frame: usize,
    pub handshake_timeout: Duration,
    pub stats: Arc<IoStats>,
}

/// Reads one frame, `Ok(None)` on a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
    stats: &IoStats,
) -> Result<Option<(FrameType, BytesMut)>, TransportError> {
    loop {
        if let Some(f) = frame::split_frame(buf, max)? {
            return Ok(Some(f));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        let n = r.read_buf(buf).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(TransportError::Closed)
            };
        }
        stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn send_hs<W: AsyncWrite + Unpin>(
    w: &mut W,
    m: &Handshake,
    stats: &IoStats,
) -> Result<(), TransportError> {
    let b = frame::encode_vec(FrameType::Handshake, m)?;
    w.write_all(&b).await?;
    stats.bytes_out.fetch_add(b.len() as u64, Ordering::Relaxed);
    Ok(())
}

async fn recv_hs<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    stats: &IoStats,
) -> Result<Handshake, TransportError> {
    match read_frame(r, buf, MAX_HANDSHAKE_FRAME, stats).await? {
        Some((ty, p)) => Ok(frame::decode(FrameType::Handshake, ty, &p)?),
        None => Err(TransportError::Closed),
    }
}

fn proof(
    secret: &[u8],
    label: &str,
    cluster: &str,
    nc: &[u8; 32],
    ns: &[u8; 32],
    client: &NodeId,
    server: &NodeId,
) -> Hmac<Sha256> {
    // A key of any length is accepted by HMAC.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| {
        <Hmac<Sha256> as Mac>::new_from_slice(&[0u8; 32]).unwrap_or_else(|_| unreachable_hmac())
    });
    for part in [
        label.as_bytes(),
        cluster.as_bytes(),
        &nc[..],
        &ns[..],
        client.to_string().as_bytes(),
        server.to_string().as_bytes(),
    ] {
        mac.update(&(part.len() as u32).to_be_bytes());
        mac.update(part);
    }
    mac
}

/// The keys of one connection, from the same inputs as the proofs: each
/// direction its own, so the two counters never share a nonce.
fn keys(
    sec: &Security,
    nc: &[u8; 32],
    ns: &[u8; 32],
    client: &NodeId,
    server: &NodeId,
    dialer: bool,
) -> Keys {
    let key = |label: &str| {
        let mut k = [0u8; 32];
        k.copy_from_slice(
            &proof(&sec.secret, label, &sec.cluster, nc, ns, client, server)
                .finalize()
                .into_bytes(),
        );
        k
    };
    let (c2s, s2c) = (
        key("sessionmesh key client to server"),
        key("sessionmesh key server to client"),
    );
    if dialer {
        Keys {
            send: Sealer::new(c2s),
            recv: Sealer::new(s2c),
        }
    } else {
        Keys {
            send: Sealer::new(s2c),
            recv: Sealer::new(c2s),
        }
    }
}

#[allow(clippy::panic)]
fn unreachable_hmac() -> Hmac<Sha256> {
    panic!("HMAC accepts keys of any length")
}

/// An HMAC over the cluster secret of length-prefixed parts.
fn mac(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable_hmac());
    for part in parts {
        m.update(&(part.len() as u32).to_be_bytes());
        m.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(&m.finalize().into_bytes());
    out
}

/// The listener's proof, the dialer's proof, and the two handshake keys, all
/// bound to the cluster and both nonces.
fn hs_mac(sec: &Security, label: &str, nc: &[u8; 32], ns: &[u8; 32]) -> [u8; 32] {
    mac(
        &sec.secret,
        &[label.as_bytes(), sec.cluster.as_bytes(), nc, ns],
    )
}

/// Seals one handshake message under a key used once (nonce 0).
fn seal_hs<T: serde::Serialize>(key: [u8; 32], msg: &T) -> Result<Vec<u8>, TransportError> {
    use chacha20poly1305::aead::{Aead, KeyInit};
    let body = postcard::to_allocvec(msg).map_err(WireError::from)?;
    chacha20poly1305::ChaCha20Poly1305::new(&key.into())
        .encrypt(&[0u8; 12].into(), body.as_slice())
        .map_err(|_| TransportError::Protocol("cannot seal".into()))
}

fn open_hs<T: serde::de::DeserializeOwned>(
    key: [u8; 32],
    sealed: &[u8],
) -> Result<T, TransportError> {
    use chacha20poly1305::aead::{Aead, KeyInit};
    let body = chacha20poly1305::ChaCha20Poly1305::new(&key.into())
        .decrypt(&[0u8; 12].into(), sealed)
        .map_err(|_| TransportError::Auth("handshake message failed authentication".into()))?;
    Ok(postcard::from_bytes(&body).map_err(WireError::from)?)
}

/// Dialer side. Returns the authenticated peer and whether it is ready.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    sec: &Security,
    to: &str,
    probe: bool,
) -> Result<(NodeId, bool, Keys), TransportError> {
    let fut = async {
        let mut buf = BytesMut::with_capacity(1024);
        let mut nc = [0u8; 32];
        fill_random(&mut nc);
        send_hs(s, &Handshake::Hello { nonce: nc }, &sec.stats).await?;
        let ns = match recv_hs(s, &mut buf, &sec.stats).await? {
            Handshake::Challenge { nonce, proof } => {
                // The listener proves first: we say nothing about ourselves to
                // an address that does not hold this cluster's secret.
                if !crate::core::identity::ct_eq(
                    &proof,
                    &hs_mac(sec, "sessionmesh server proof", &nc, &nonce),
                ) {
                    sec.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(TransportError::Auth(format!(
                        "the peer at {to:?}'s address does not hold the cluster secret (or is in another cluster)"
                    )));
                }
                nonce
            }
            Handshake::Reject { reason } => return Err(TransportError::Rejected(reason)),
            other => {
                return Err(TransportError::Protocol(format!(
                    "expected Challenge, got {}",
                    hs_name(&other)
                )))
            }
        };
        let inner = HelloInner {
            from: sec.me.clone(),
            to: to.to_owned(),
            probe,
        };
        let sealed = seal_hs(hs_mac(sec, "sessionmesh hello key", &nc, &ns), &inner)?;
        send_hs(
            s,
            &Handshake::Auth {
                proof: hs_mac(sec, "sessionmesh client proof", &nc, &ns),
                sealed,
            },
            &sec.stats,
        )
        .await?;
        match recv_hs(s, &mut buf, &sec.stats).await? {
            Handshake::Welcome { sealed } => {
                let w: WelcomeInner =
                    open_hs(hs_mac(sec, "sessionmesh welcome key", &nc, &ns), &sealed)?;
                if w.from.name != to {
                    return Err(TransportError::Protocol(format!(
                        "expected member {to:?} at this address but {:?} answered (check the member file's addresses)",
                        w.from.name
                    )));
                }
                if !buf.is_empty() {
                    return Err(TransportError::Protocol("data after Welcome".into()));
                }
                let k = keys(sec, &nc, &ns, &sec.me, &w.from, true);
                Ok((w.from, w.ready, k))
            }
            Handshake::Reject { reason } => Err(TransportError::Rejected(reason)),
            other => Err(TransportError::Protocol(format!(
                "expected Welcome, got {}",
                hs_name(&other)
            ))),
        }
    };
    tokio::time::timeout(sec.handshake_timeout, fut)
        .await
        .map_err(|_| TransportError::Silent)?
}

/// Tells the dialer why it is refused (it has proved the secret by then) and
/// returns the error for our side; a failed send is reported as such.
async fn reject<S: AsyncWrite + Unpin>(
    s: &mut S,
    sec: &Security,
    reason: String,
) -> TransportError {
    match send_hs(
        s,
        &Handshake::Reject {
            reason: reason.clone(),
        },
        &sec.stats,
    )
    .await
    {
        Ok(()) => TransportError::Rejected(reason),
        Err(e) => e,
    }
}

/// Listener side. `known` says whether a member name belongs to the cluster.
/// Returns the authenticated peer and whether it only came to probe us.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    sec: &Security,
    ready: bool,
    known: impl Fn(&str) -> bool,
) -> Result<(NodeId, bool, BytesMut, Keys), TransportError> {
    let fut = async {
        let mut buf = BytesMut::with_capacity(1024);
        let nc = match recv_hs(s, &mut buf, &sec.stats).await? {
            Handshake::Hello { nonce } => nonce,
            other => {
                return Err(TransportError::Protocol(format!(
                    "expected Hello, got {}",
                    hs_name(&other)
                )))
            }
        };
        let mut ns = [0u8; 32];
        fill_random(&mut ns);
        let proof = hs_mac(sec, "sessionmesh server proof", &nc, &ns);
        send_hs(s, &Handshake::Challenge { nonce: ns, proof }, &sec.stats).await?;
        let (cp, sealed) = match recv_hs(s, &mut buf, &sec.stats).await? {
            Handshake::Auth { proof, sealed } => (proof, sealed),
            other => {
                return Err(TransportError::Protocol(format!(
                    "expected Auth, got {}",
                    hs_name(&other)
                )))
            }
        };
        if !crate::core::identity::ct_eq(&cp, &hs_mac(sec, "sessionmesh client proof", &nc, &ns)) {
            sec.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            send_hs(
                s,
                &Handshake::Reject {
                    reason: "authentication failed".into(),
                },
                &sec.stats,
            )
            .await?;
            return Err(TransportError::Auth(
                "the dialer does not hold the cluster secret".into(),
            ));
        }
        let hello: HelloInner = open_hs(hs_mac(sec, "sessionmesh hello key", &nc, &ns), &sealed)?;
        // The dialer has proved the secret: it may learn why it is refused.
        if hello.to != sec.me.name {
            return Err(reject(
                s,
                sec,
                format!("this is member {:?}, not {:?}", sec.me.name, hello.to),
            )
            .await);
        }
        if !known(&hello.from.name) {
            return Err(reject(
                s,
                sec,
                format!("{:?} is not a member of this cluster", hello.from.name),
            )
            .await);
        }
        let sealed = seal_hs(
            hs_mac(sec, "sessionmesh welcome key", &nc, &ns),
            &WelcomeInner {
                from: sec.me.clone(),
                ready,
            },
        )?;
        send_hs(s, &Handshake::Welcome { sealed }, &sec.stats).await?;
        let k = keys(sec, &nc, &ns, &hello.from, &sec.me, false);
        Ok((hello.from, hello.probe, buf, k))
    };
    tokio::time::timeout(sec.handshake_timeout, fut)
        .await
        .map_err(|_| TransportError::Timeout)?
}

fn hs_name(h: &Handshake) -> &'static str {
    match h {
        Handshake::Hello { .. } => "Hello",
        Handshake::Challenge { .. } => "Challenge",
        Handshake::Auth { .. } => "Auth",
        Handshake::Welcome { .. } => "Welcome",
        Handshake::Reject { .. } => "Reject",
    }
}

/// Dials and authenticates. A probe proves the member's process answers, not
/// just that its kernel accepts connections.
/// An authenticated connection to a peer, with the keys its frames are sealed with.
pub struct Dialed {
    pub stream: TcpStream,
    pub peer: NodeId,
    pub ready: bool,
    pub keys: Keys,
}

pub async fn dial(
    addr: SocketAddr,
    sec: &Security,
    to: &str,
    probe: bool,
    timeout: Duration,
) -> Result<Dialed, TransportError> {
    let mut s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::Timeout)??;
    s.set_nodelay(true)?;
    let (peer, ready, keys) = client_handshake(&mut s, sec, to, probe).await?;
    Ok(Dialed {
        stream: s,
        peer,
        ready,
        keys,
    })
}

pub async fn probe(addr: SocketAddr, sec: &Security, to: &str, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, dial(addr, sec, to, true, timeout))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// A peer message as an unsealed frame: only for tests that play a peer
/// without the keys (sealed frames are made by `Sealer::seal`).
pub fn encode_peer(msg: &PeerMsg, out: &mut BytesMut) -> Result<(), WireError> {
    frame::encode(FrameType::Peer, msg, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::identity::Generation;

    fn sec(name: &str, secret: &str) -> Security {
        Security {
            cluster: "c".into(),
            me: NodeId {
                name: name.into(),
                generation: Generation(1),
            },
            secret: Arc::new(secret.as_bytes().to_vec()),
            max_frame: 1 << 20,
            handshake_timeout: Duration::from_secs(2),
            stats: Arc::new(IoStats::default()),
        }
    }

    #[tokio::test]
    async fn handshake_succeeds_with_the_same_secret() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let (sa, sb) = (sec("a", "s3cret"), sec("b", "s3cret"));
        let (c, s) = tokio::join!(
            client_handshake(&mut a, &sa, "b", false),
            server_handshake(&mut b, &sb, true, |_| true)
        );
        let (peer, ready, mut ck) = c.unwrap();
        assert_eq!(peer.name, "b");
        assert!(ready);
        let (client, _, _, mut sk) = s.unwrap();
        assert_eq!(client.name, "a");
        // Both ends derived the same keys, one per direction.
        let mut buf = BytesMut::new();
        ck.send.seal(&PeerMsg::Leave, &mut buf).unwrap();
        sk.send.seal(&PeerMsg::LeaveAck, &mut buf).unwrap();
        let (t1, p1) = frame::split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        let (t2, p2) = frame::split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(sk.recv.open(t1, &p1).unwrap(), PeerMsg::Leave);
        assert_eq!(ck.recv.open(t2, &p2).unwrap(), PeerMsg::LeaveAck);
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_sides() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let (sa, sb) = (sec("a", "wrong"), sec("b", "s3cret"));
        let (c, s) = tokio::join!(
            client_handshake(&mut a, &sa, "b", false),
            server_handshake(&mut b, &sb, true, |_| true)
        );
        // The dialer checks the listener's proof first, and stops there.
        assert!(matches!(c, Err(TransportError::Auth(_))), "{c:?}");
        assert!(s.is_err());
        assert_eq!(sa.stats.auth_failures.load(Ordering::Relaxed), 1);
    }

    /// Each side, before the other has proved the secret, reveals no name: a
    /// listener without it hears a nonce; a dialer without it hears a nonce
    /// and a proof.
    #[tokio::test]
    async fn nothing_names_a_member_before_the_secret_is_proved() {
        use tokio::io::AsyncReadExt;
        // A listener that does not hold the secret: what does the dialer send it?
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let sa = sec("alice-member", "s3cret");
        let dial = tokio::spawn(async move {
            client_handshake(&mut a, &sa, "bob-member", false)
                .await
                .map(|_| ())
        });
        let mut heard = vec![0u8; 4096];
        let n = b.read(&mut heard).await.unwrap();
        let heard = &heard[..n];
        for name in [&b"alice-member"[..], b"bob-member", b"local"] {
            assert!(
                !heard.windows(name.len()).any(|w| w == name),
                "the dialer said {:?} to an unproved listener",
                String::from_utf8_lossy(name)
            );
        }
        drop(b);
        assert!(dial.await.unwrap().is_err());
        // A dialer that does not hold the secret: what does the listener tell it?
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let sb = sec("bob-member", "s3cret");
        let listen = tokio::spawn(async move {
            server_handshake(&mut b, &sb, true, |_| true)
                .await
                .map(|_| ())
        });
        let mut hello = BytesMut::new();
        frame::encode(
            FrameType::Handshake,
            &Handshake::Hello { nonce: [1; 32] },
            &mut hello,
        )
        .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut a, &hello)
            .await
            .unwrap();
        let mut told = vec![0u8; 4096];
        let n = a.read(&mut told).await.unwrap();
        let told = &told[..n];
        for name in [&b"bob-member"[..], b"local"] {
            assert!(
                !told.windows(name.len()).any(|w| w == name),
                "the listener said {:?} to an unproved dialer",
                String::from_utf8_lossy(name)
            );
        }
        // A forged Auth is refused.
        let mut auth = BytesMut::new();
        frame::encode(
            FrameType::Handshake,
            &Handshake::Auth {
                proof: [0; 32],
                sealed: vec![0; 48],
            },
            &mut auth,
        )
        .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut a, &auth)
            .await
            .unwrap();
        assert!(matches!(listen.await.unwrap(), Err(_)));
    }

    #[tokio::test]
    async fn wrong_member_at_address_is_named() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let (sa, sb) = (sec("a", "k"), sec("b", "k"));
        let (c, _) = tokio::join!(
            client_handshake(&mut a, &sa, "x", false),
            server_handshake(&mut b, &sb, true, |_| true)
        );
        let e = c.unwrap_err().to_string();
        assert!(e.contains("not \"x\""), "{e}");
    }
}
