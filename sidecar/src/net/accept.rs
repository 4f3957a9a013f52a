//! Accepting connections without spinning. When `accept` fails (most often
//! because the process is out of file descriptors) the listener backs off,
//! 5 ms doubling to 1 s with jitter (`backon`), instead of retrying at once in
//! a loop that burns a core and starves every other task. One warning per
//! failure streak.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

const FIRST: Duration = Duration::from_millis(5);
const MAX: Duration = Duration::from_secs(1);

/// The back-off state of one listener.
pub struct Acceptor {
    what: &'static str,
    delays: backon::ExponentialBackoff,
    failures: u64,
}

fn delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(FIRST)
        .with_max_delay(MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Acceptor {
    pub fn new(what: &'static str) -> Self {
        Acceptor {
            what,
            delays: delays(),
            failures: 0,
        }
    }

    /// The next connection; waits out failures with back-off.
    pub async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(x) => {
                    if self.failures > 0 {
                        tracing::info!(
                            listener = self.what,
                            failures = self.failures,
                            "accepting connections again"
                        );
                    }
                    if self.failures > 0 {
                        self.delays = delays();
                    }
                    self.failures = 0;
                    return x;
                }
                Err(e) => {
                    if self.failures == 0 {
                        tracing::warn!(listener = self.what, error = %e, "accept failed; backing off (out of file descriptors?)");
                    }
                    self.failures += 1;
                    tokio::time::sleep(self.delays.next().unwrap_or(MAX)).await;
                }
            }
        }
    }
}
