//! The Redis-protocol endpoint: RESP2/RESP3 framing (`protocol`), connections
//! (`server`), and the data commands run on the core (`commands`).

pub mod commands;
mod local;
pub mod protocol;
pub mod server;
