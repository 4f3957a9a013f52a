//! sessionmesh sidecar: holds HTTP sessions, replicates them to its peers over
//! TCP, detects failed peers, transfers state to joining members, and serves the
//! local app over HTTP/JSON.

pub mod accept;
pub mod api;
pub mod client;
pub mod core;
pub mod demo_app;
pub mod detector;
pub mod hlc;
pub mod identity;
pub mod kubesource;
pub mod localcluster;
pub mod membership;
pub mod node;
pub mod redis;
pub mod resp;
pub mod resp_server;
pub mod router;
pub mod seal;
pub mod sim;
pub mod stack;
pub mod store;
pub mod transport;
pub mod wire;
