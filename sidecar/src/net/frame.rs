//! Wire format between sidecars: length-delimited frames
//! `magic "SMSH" | version u8 | type u8 | length u32 BE | payload`, payload
//! encoded with postcard.
//!
//! Invariants: a length is checked against the caller's maximum before any
//! allocation; a partial frame is `Ok(None)`; nothing decoded here can panic.

use crate::core::identity::NodeId;
use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"SMSH";
/// 2: delta streams carry an epoch (`Deltas`, `Ack`).
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 10;
/// Frames before authentication are small; this bounds what an unauthenticated
/// peer can make us allocate.
pub const MAX_HANDSHAKE_FRAME: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Handshake = 1,
    Peer = 2,
}

/// Why a byte stream could not be decoded. The connection must be closed; no
/// state was changed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:02x?}: not a sessionmesh peer")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this member speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("unexpected frame type {got:?}, expected {want:?}")]
    UnexpectedType { got: FrameType, want: FrameType },
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed payload: {0}")]
    Payload(#[from] postcard::Error),
}

/// The handshake. Nothing names a member or the cluster in clear, and the
/// dialer proves nothing before the listener has: whoever answers at a
/// member's address learns only a random nonce unless it holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handshake {
    /// Dialer -> listener: a fresh nonce, nothing else.
    Hello {
        nonce: [u8; 32],
    },
    /// Listener -> dialer: its nonce and its proof over both nonces.
    Challenge {
        nonce: [u8; 32],
        proof: [u8; 32],
    },
    /// Dialer -> listener, once the listener's proof holds: its own proof, and
    /// its identity sealed under the handshake key (`HelloInner`).
    Auth {
        proof: [u8; 32],
        sealed: Vec<u8>,
    },
    /// Listener -> dialer: its identity sealed (`WelcomeInner`).
    Welcome {
        sealed: Vec<u8>,
    },
    Reject {
        reason: String,
    },
}

/// What the dialer says about itself, sealed in `Auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloInner {
    pub from: NodeId,
    pub to: String,
    pub probe: bool,
}

/// What the listener says about itself, sealed in `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WelcomeInner {
    pub from: NodeId,
    pub ready: bool,
}

/// Appends one frame to `out`.
pub fn encode<T: Serialize>(ty: FrameType, msg: &T, out: &mut BytesMut) -> Result<(), WireError> {
    // postcard writes a Vec with bulk copies; extending a BytesMut would go byte by byte.
    let payload = postcard::to_allocvec(msg)?;
    let len = u32::try_from(payload.len()).map_err(|_| WireError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    out.reserve(HEADER_LEN + payload.len());
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(ty as u8);
    out.put_u32(len);
    out.put_slice(&payload);
    Ok(())
}

pub fn encode_vec<T: Serialize>(ty: FrameType, msg: &T) -> Result<BytesMut, WireError> {
    let mut b = BytesMut::new();
    encode(ty, msg, &mut b)?;
    Ok(b)
}

/// Splits one whole frame off `buf`: `Ok(None)` until it is all there.
pub fn split_frame(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(FrameType, BytesMut)>, WireError> {
    if buf.len() < HEADER_LEN {
        // Reject garbage as soon as the magic is visibly wrong.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            let mut m = [0u8; 4];
            m[..n].copy_from_slice(&buf[..n]);
            return Err(WireError::BadMagic(m));
        }
        return Ok(None);
    }
    let mut m = [0u8; 4];
    m.copy_from_slice(&buf[..4]);
    if &m != MAGIC {
        return Err(WireError::BadMagic(m));
    }
    if buf[4] != VERSION {
        return Err(WireError::Version(buf[4]));
    }
    let ty = match buf[5] {
        1 => FrameType::Handshake,
        2 => FrameType::Peer,
        t => return Err(WireError::UnknownType(t)),
    };
    let len = u32::from_be_bytes([buf[6], buf[7], buf[8], buf[9]]) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    Ok(Some((ty, buf.split_to(len))))
}

pub fn decode<T: for<'de> Deserialize<'de>>(
    want: FrameType,
    ty: FrameType,
    payload: &[u8],
) -> Result<T, WireError> {
    if ty != want {
        return Err(WireError::UnexpectedType { got: ty, want });
    }
    Ok(postcard::from_bytes(payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::hlc::Hlc;
    use crate::core::identity::SessionId;
    use crate::core::message::PeerMsg;
    use crate::core::store::{Delta, Op};
    use proptest::prelude::*;

    fn roundtrip(msg: &PeerMsg) -> PeerMsg {
        let mut b = encode_vec(FrameType::Peer, msg).unwrap();
        let (ty, payload) = split_frame(&mut b, 1 << 20).unwrap().unwrap();
        assert!(b.is_empty());
        decode(FrameType::Peer, ty, &payload).unwrap()
    }

    #[test]
    fn partial_frames_wait_and_garbage_is_refused() {
        let whole = encode_vec(FrameType::Peer, &PeerMsg::Leave).unwrap();
        for cut in 0..whole.len() {
            let mut b = BytesMut::from(&whole[..cut]);
            assert!(split_frame(&mut b, 1024).unwrap().is_none(), "cut at {cut}");
        }
        let mut g = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(
            split_frame(&mut g, 1024),
            Err(WireError::BadMagic(_))
        ));
        let mut g = BytesMut::from(&b"SM"[..]);
        assert!(split_frame(&mut g, 1024).unwrap().is_none());
        let mut g = BytesMut::from(&b"SX"[..]);
        assert!(split_frame(&mut g, 1024).is_err());
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut b = BytesMut::new();
        b.put_slice(MAGIC);
        b.put_u8(VERSION);
        b.put_u8(2);
        b.put_u32(u32::MAX);
        let cap = b.capacity();
        assert!(matches!(
            split_frame(&mut b, 1 << 20),
            Err(WireError::TooLarge { .. })
        ));
        assert_eq!(b.capacity(), cap);
    }

    #[test]
    fn wrong_version_and_type() {
        let mut b = encode_vec(FrameType::Peer, &PeerMsg::Leave).unwrap();
        b[4] = 9;
        assert!(matches!(
            split_frame(&mut b, 1024),
            Err(WireError::Version(9))
        ));
        let mut b = encode_vec(FrameType::Peer, &PeerMsg::Leave).unwrap();
        let (ty, p) = split_frame(&mut b, 1024).unwrap().unwrap();
        assert!(decode::<Handshake>(FrameType::Handshake, ty, &p).is_err());
    }

    fn arb_delta() -> impl Strategy<Value = Delta> {
        (
            "[A-Za-z0-9]{1,40}",
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(
                ("[a-z]{1,10}", prop::collection::vec(any::<u8>(), 0..64)),
                0..5,
            ),
        )
            .prop_map(|(id, w, n, attrs)| Delta {
                id: SessionId::parse(&id).unwrap(),
                hlc: Hlc {
                    wall_ms: w,
                    logical: n,
                    node: n ^ 7,
                },
                created_ms: w / 2,
                last_accessed_ms: w,
                max_inactive_ms: 1_800_000,
                ops: attrs
                    .into_iter()
                    .map(|(name, v)| Op::Set {
                        name,
                        value: v.into(),
                    })
                    .chain([Op::Touch, Op::Remove { name: "r".into() }])
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn deltas_roundtrip(epoch in any::<u64>(), first_seq in any::<u64>(), deltas in prop::collection::vec(arb_delta(), 0..8)) {
            let msg = PeerMsg::Deltas { epoch, first_seq, deltas: deltas.into_iter().map(std::sync::Arc::new).collect() };
            prop_assert_eq!(roundtrip(&msg), msg);
        }

        #[test]
        fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut b = BytesMut::from(&bytes[..]);
            if let Ok(Some((ty, p))) = split_frame(&mut b, 1024) {
                let _ = decode::<PeerMsg>(FrameType::Peer, ty, &p);
                let _ = decode::<Handshake>(FrameType::Handshake, ty, &p);
            }
        }

        #[test]
        fn payload_corruption_is_an_error_not_a_panic(seq in any::<u64>(), flip in 0usize..64, byte in any::<u8>()) {
            let mut b = encode_vec(FrameType::Peer, &PeerMsg::Ack { epoch: 7, upto: seq }).unwrap();
            let i = HEADER_LEN + flip % (b.len() - HEADER_LEN);
            b[i] = byte;
            if let Ok(Some((ty, p))) = split_frame(&mut b, 1024) {
                let _ = decode::<PeerMsg>(FrameType::Peer, ty, &p);
            }
        }
    }
}
