//! ZDS, the protocol Istio's node agent speaks to an in-pod ztunnel: ztunnel connects to a unix
//! SOCK_SEQPACKET socket the agent serves (`INPOD_UDS`), and the agent hands it each ambient
//! pod's network namespace (an fd in SCM_RIGHTS), in which ztunnel opens its listeners.
mod messages;
mod metrics;
mod seqpacket;
mod server;
mod session;

pub use messages::WorkloadInfo;
pub use metrics::Metrics;
pub use seqpacket::{Listener, MAX_MESSAGE, Peer};
pub use server::{InPodWorkload, OnAcked, PeerState, Server};
pub use session::{ACK_TIMEOUT, Session, SessionError, SnapshotReport, WorkloadNetns};

/// Where in-pod ztunnel looks for the agent's socket unless `INPOD_UDS` says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// Where an in-pod agent keeps its ZDS peers' states for `zdivert status`.
pub fn status_file(state_dir: &std::path::Path, node: &str) -> std::path::PathBuf {
    state_dir.join(format!("{node}.zds.json"))
}

/// The ZDS peers an in-pod agent of `node` last wrote, if one did.
pub fn read_status(state_dir: &std::path::Path, node: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(status_file(state_dir, node)).ok()?;
    serde_json::from_str(&text).ok()
}

/// `read_status`, as `zdivert status` prints it.
pub fn render_status(status: &serde_json::Value) -> String {
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    let mut s = format!("in-pod ztunnels connected over ZDS: {}\n", peers.len());
    for p in &peers {
        let pid = p["pid"]
            .as_i64()
            .map_or("unknown".into(), |p| p.to_string());
        let acked = p["acked"].as_array().map_or(0, Vec::len);
        s += &format!("  ztunnel pid {pid}: {acked} pods acked\n");
        for (uid, error) in p["refused"].as_object().into_iter().flatten() {
            s += &format!(
                "    refused {uid}: {} (retried)\n",
                error.as_str().unwrap_or("?")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests;
