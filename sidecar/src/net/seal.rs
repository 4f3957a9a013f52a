//! Sealed frames: after the handshake every frame between two members is
//! encrypted and authenticated with ChaCha20-Poly1305 under a key of its
//! direction, derived from the cluster secret, both handshake nonces and both
//! identities. The nonce is the frame's number in its direction, and the
//! frame header is the associated data.
//!
//! So a party without the secret (a relay on the path) can neither read a
//! frame, nor inject or alter one (its tag fails), nor replay, drop or
//! reorder one (the next number fails). A failure closes the connection; the
//! stream's resend and anti-entropy repair what it carried. There is no
//! forward secrecy: whoever learns the secret later can read recorded
//! traffic.

use crate::core::message::PeerMsg;
use crate::net::frame::{FrameType, WireError, HEADER_LEN, MAGIC, VERSION};
use bytes::{BufMut, BytesMut};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

const TAG_LEN: usize = 16;

/// Why a sealed frame could not be opened or made. The connection must be
/// closed; nothing was applied.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("frame failed authentication (tampered, replayed, or not from a holder of the cluster secret)")]
    Forged,
    #[error("unexpected frame type {0:?} after the handshake")]
    Type(FrameType),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// One direction of a connection: its key and the number of the next frame.
pub struct Sealer {
    aead: ChaCha20Poly1305,
    next: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// The two directions of an authenticated connection.
#[derive(Debug)]
pub struct Keys {
    pub send: Sealer,
    pub recv: Sealer,
}

fn header(ty: FrameType, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = ty as u8;
    h[6..].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

impl Sealer {
    pub fn new(key: [u8; 32]) -> Self {
        Sealer {
            aead: ChaCha20Poly1305::new(Key::from_slice(&key)),
            next: 0,
        }
    }

    fn nonce(&mut self) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.next.to_be_bytes());
        self.next += 1;
        *Nonce::from_slice(&n)
    }

    /// Appends `msg` to `out` as one sealed frame.
    pub fn seal(&mut self, msg: &PeerMsg, out: &mut BytesMut) -> Result<(), SealError> {
        let body = postcard::to_allocvec(msg).map_err(WireError::from)?;
        self.seal_payload(body, out)
    }

    /// Appends an already encoded message as one sealed frame (tests use it to
    /// seal bytes no honest member would send).
    pub fn seal_payload(&mut self, mut body: Vec<u8>, out: &mut BytesMut) -> Result<(), SealError> {
        let len = body.len() + TAG_LEN;
        if u32::try_from(len).is_err() {
            return Err(WireError::TooLarge {
                len,
                max: u32::MAX as usize,
            }
            .into());
        }
        let h = header(FrameType::Peer, len);
        let nonce = self.nonce();
        self.aead
            .encrypt_in_place(&nonce, &h, &mut body)
            .map_err(|_| SealError::Forged)?;
        out.reserve(HEADER_LEN + body.len());
        out.put_slice(&h);
        out.put_slice(&body);
        Ok(())
    }

    /// Opens the payload of a frame read after the handshake into its message.
    pub fn open(&mut self, ty: FrameType, payload: &[u8]) -> Result<PeerMsg, SealError> {
        if ty != FrameType::Peer {
            return Err(SealError::Type(ty));
        }
        if payload.len() < TAG_LEN {
            return Err(SealError::Forged);
        }
        let h = header(ty, payload.len());
        let nonce = self.nonce();
        let mut body = payload.to_vec();
        self.aead
            .decrypt_in_place(&nonce, &h, &mut body)
            .map_err(|_| SealError::Forged)?;
        Ok(postcard::from_bytes(&body).map_err(WireError::from)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::split_frame;

    fn pair() -> (Sealer, Sealer) {
        (Sealer::new([7; 32]), Sealer::new([7; 32]))
    }

    fn frames(buf: &mut BytesMut) -> Vec<(FrameType, BytesMut)> {
        let mut v = Vec::new();
        while let Ok(Some(f)) = split_frame(buf, 1 << 20) {
            v.push(f);
        }
        v
    }

    #[test]
    fn sealed_frames_round_trip_in_order_and_hide_their_content() {
        let (mut a, mut b) = pair();
        let mut buf = BytesMut::new();
        let msgs = [
            PeerMsg::PingReq {
                target: "role=admin".into(),
            },
            PeerMsg::Ack { epoch: 1, upto: 9 },
        ];
        for m in &msgs {
            a.seal(m, &mut buf).expect("seal");
        }
        assert!(
            !buf.windows(10).any(|w| w == b"role=admin"),
            "plain text on the wire"
        );
        let got: Vec<PeerMsg> = frames(&mut buf)
            .into_iter()
            .map(|(t, p)| b.open(t, &p).expect("open"))
            .collect();
        assert_eq!(got, msgs);
    }

    #[test]
    fn altered_replayed_reordered_or_foreign_frames_are_refused() {
        let (mut a, mut b) = pair();
        let mut buf = BytesMut::new();
        a.seal(&PeerMsg::Leave, &mut buf).expect("seal");
        a.seal(&PeerMsg::LeaveAck, &mut buf).expect("seal");
        let fs = frames(&mut buf);
        // Reordered: the second frame first.
        assert!(matches!(b.open(fs[1].0, &fs[1].1), Err(SealError::Forged)));
        let (_, mut b) = pair();
        assert!(b.open(fs[0].0, &fs[0].1).is_ok());
        // Replayed.
        assert!(matches!(b.open(fs[0].0, &fs[0].1), Err(SealError::Forged)));
        // Altered.
        let (_, mut b) = pair();
        let mut bad = fs[0].1.clone();
        bad[0] ^= 1;
        assert!(matches!(b.open(fs[0].0, &bad), Err(SealError::Forged)));
        // Sealed under another key, or not sealed at all.
        let mut other = Sealer::new([8; 32]);
        let mut buf = BytesMut::new();
        other.seal(&PeerMsg::Leave, &mut buf).expect("seal");
        let f = frames(&mut buf);
        let (_, mut b) = pair();
        assert!(matches!(b.open(f[0].0, &f[0].1), Err(SealError::Forged)));
        let plain =
            crate::net::frame::encode_vec(FrameType::Peer, &PeerMsg::Leave).expect("encode");
        let mut plain = plain;
        let f = frames(&mut plain);
        assert!(b.open(f[0].0, &f[0].1).is_err());
    }
}
