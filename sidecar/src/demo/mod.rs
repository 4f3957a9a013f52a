//! Tooling around the product, not the product: the demo app, a built-in
//! cookie-sticky router, a local cluster of sidecar processes on loopback and
//! the stack (apps + sidecars + load balancer) the demo, tests and bench use.
//! Behind the `demo` feature (on by default); a production build can leave it
//! out with `--no-default-features`.

pub mod app;
pub mod client;
pub mod localcluster;
pub mod router;
pub mod scenario;
pub mod stack;
