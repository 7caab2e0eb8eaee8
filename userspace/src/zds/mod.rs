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
pub use server::{InPodWorkload, PeerState, Server};
pub use session::{ACK_TIMEOUT, Session, SessionError, SnapshotReport, WorkloadNetns};

/// Where in-pod ztunnel looks for the agent's socket unless `INPOD_UDS` says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

#[cfg(test)]
mod tests;
