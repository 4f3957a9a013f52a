//! Between members: frames on TCP, the handshake that proves both ends hold
//! the cluster secret, sealing of every frame after it, and accepting
//! connections without spinning.

pub mod accept;
pub mod frame;
pub mod handshake;
pub mod seal;
pub mod transport;
