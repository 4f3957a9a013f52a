//! Leaving on purpose: stop serving, let replication drain (and, in backup
//! mode, hand the sessions over), tell the peers, and know when they heard.

use super::{Core, Output, Phase};
use crate::core::message::PeerMsg;

impl Core {
    /// Stops serving the app; replication keeps draining. In backup mode the
    /// sessions this member holds go to the members that hold them next.
    pub fn begin_leave(&mut self, now_ms: u64) {
        self.phase = Phase::Leaving;
        self.backup_leave(now_ms);
    }

    /// True once every live, connected member has acknowledged everything
    /// (in backup mode, the copies handed over too).
    pub fn flushed(&self) -> bool {
        self.copies_settled()
            && self.peers.iter().all(|(n, p)| {
                p.out.is_empty()
                    || !p.connected
                    || !self.detector.state(n).is_some_and(|s| s.is_live())
            })
    }

    /// True once every connected, live member confirmed our `Leave`.
    pub fn leave_acknowledged(&self) -> bool {
        self.peers.iter().all(|(n, p)| {
            p.left_ack || !p.connected || !self.detector.state(n).is_some_and(|s| s.is_live())
        })
    }

    pub fn announce_leave(&mut self) {
        let names: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            self.outbox.push(Output::Send {
                to: n,
                msg: PeerMsg::Leave,
            });
        }
    }
}
