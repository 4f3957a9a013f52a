//! What the local app talks to. Each front-end turns requests into
//! transactions on the core (`node::Txn`); the runtime knows none of them.

pub mod http;
pub mod metrics;
pub mod resp;
