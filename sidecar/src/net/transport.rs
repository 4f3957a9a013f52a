//! TCP transport between sidecars: frame I/O, dialing, and the direct
//! liveness probe. The handshake (`handshake`) runs first: nothing names a
//! member or the cluster in clear, and a dialer tells nothing to an address
//! that does not hold the secret. Until it completes, frames are limited to
//! `MAX_HANDSHAKE_FRAME` bytes; after it, every frame is sealed (`seal`).

use crate::core::identity::NodeId;
use crate::core::message::PeerMsg;
use crate::net::frame::{self, FrameType, WireError};
pub use crate::net::handshake::{client_handshake, server_handshake};
pub use crate::net::seal::{Keys, Sealer};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
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
    use crate::net::frame::Handshake;

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
        assert!(listen.await.unwrap().is_err());
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
