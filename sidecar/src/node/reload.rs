//! Hot reload of the member file.

use super::IoEvent;
use crate::membership::MemberFile;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// How long a changed member file must stay the same before it is applied.
pub(super) const RELOAD_SETTLE: Duration = Duration::from_millis(50);

pub(super) async fn reload_loop(
    path: PathBuf,
    mut current: MemberFile,
    every: Duration,
    io_tx: mpsc::Sender<IoEvent>,
    cancel: CancellationToken,
) {
    let mut last_text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut last_err = String::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let text = match MemberFile::read_text(&path) {
            Ok(t) => t,
            Err(e) => {
                if last_err != e.to_string() {
                    warn!(error = %e, "member file unreadable; keeping the last good membership");
                    last_err = e.to_string();
                }
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        // A file caught halfway through a write that is not a rename can be
        // valid YAML with members missing: apply a change only once two reads
        // a moment apart agree.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RELOAD_SETTLE) => {}
        }
        if MemberFile::read_text(&path).ok().as_ref() != Some(&text) {
            continue;
        }
        last_text = text.clone();
        match MemberFile::parse(&text, &path.display().to_string()) {
            Ok(mf) => {
                last_err.clear();
                if mf != current {
                    current = mf.clone();
                    if io_tx.send(IoEvent::Members(mf)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                error!(error = %e, "invalid member file; keeping the last good membership");
                last_err = e.to_string();
            }
        }
    }
}
