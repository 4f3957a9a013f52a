//! The handshake: `Hello{nonce} -> Challenge{nonce, proof} -> Auth{proof,
//! sealed identity} -> Welcome{sealed identity} | Reject`. The listener proves
//! it holds the cluster secret first (HMAC-SHA256 over the cluster and both
//! nonces); only then does the dialer prove itself and say who it is, sealed
//! under a key from the secret and both nonces. Both ends then derive the
//! per-direction keys that seal every later frame.

use super::transport::{read_frame, IoStats, Security, TransportError};
use crate::core::identity::{fill_random, NodeId};
use crate::net::frame::{
    self, FrameType, Handshake, HelloInner, WelcomeInner, WireError, MAX_HANDSHAKE_FRAME,
};
pub use crate::net::seal::{Keys, Sealer};
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub(super) async fn send_hs<W: AsyncWrite + Unpin>(
    w: &mut W,
    m: &Handshake,
    stats: &IoStats,
) -> Result<(), TransportError> {
    let b = frame::encode_vec(FrameType::Handshake, m)?;
    w.write_all(&b).await?;
    stats.bytes_out.fetch_add(b.len() as u64, Ordering::Relaxed);
    Ok(())
}

pub(super) async fn recv_hs<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    stats: &IoStats,
) -> Result<Handshake, TransportError> {
    match read_frame(r, buf, MAX_HANDSHAKE_FRAME, stats).await? {
        Some((ty, p)) => Ok(frame::decode(FrameType::Handshake, ty, &p)?),
        None => Err(TransportError::Closed),
    }
}

pub(super) fn proof(
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
pub(super) fn keys(
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
pub(super) fn unreachable_hmac() -> Hmac<Sha256> {
    panic!("HMAC accepts keys of any length")
}

/// An HMAC over the cluster secret of length-prefixed parts.
pub(super) fn mac(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
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
pub(super) fn hs_mac(sec: &Security, label: &str, nc: &[u8; 32], ns: &[u8; 32]) -> [u8; 32] {
    mac(
        &sec.secret,
        &[label.as_bytes(), sec.cluster.as_bytes(), nc, ns],
    )
}

/// Seals one handshake message under a key used once (nonce 0).
pub(super) fn seal_hs<T: serde::Serialize>(
    key: [u8; 32],
    msg: &T,
) -> Result<Vec<u8>, TransportError> {
    use chacha20poly1305::aead::{Aead, KeyInit};
    let body = postcard::to_allocvec(msg).map_err(WireError::from)?;
    chacha20poly1305::ChaCha20Poly1305::new(&key.into())
        .encrypt(&[0u8; 12].into(), body.as_slice())
        .map_err(|_| TransportError::Protocol("cannot seal".into()))
}

pub(super) fn open_hs<T: serde::de::DeserializeOwned>(
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
pub(super) async fn reject<S: AsyncWrite + Unpin>(
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

pub(super) fn hs_name(h: &Handshake) -> &'static str {
    match h {
        Handshake::Hello { .. } => "Hello",
        Handshake::Challenge { .. } => "Challenge",
        Handshake::Auth { .. } => "Auth",
        Handshake::Welcome { .. } => "Welcome",
        Handshake::Reject { .. } => "Reject",
    }
}
