//! sessionmesh sidecar: holds HTTP sessions, replicates them to its peers over
//! TCP, detects failed peers, transfers state to joining members, and serves the
//! local app over HTTP/JSON and a Redis-protocol subset.
//!
//! The layout is the architecture:
//! - `core`: the sans-IO state machine (peers, replication, state transfer,
//!   anti-entropy, failure detection, the store, clocks). It takes `now` as an
//!   argument and returns what to send; it does no IO.
//! - `net`: frames, the authenticated handshake, sealing, accepting.
//! - `membership`: where the member list comes from (a file, or the
//!   operator's document through the API server).
//! - `node`: the tokio runtime around the core: one task owns the core, peer
//!   connections feed it, and front-ends submit transactions to it.
//! - `front`: what the local app talks to: HTTP/JSON, metrics, and RESP.
//! - `demo` (feature `demo`, on by default): the demo app, a built-in router
//!   and the local-cluster tooling the tests and the bench use.

pub mod core;
pub mod front;
pub mod membership;
pub mod net;
pub mod node;

#[cfg(feature = "demo")]
pub mod demo;

#[cfg(test)]
mod sim;
