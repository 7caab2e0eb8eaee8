//! The pod start window, closed as runtimes expect it: `zdivert-cni`, a CNI plugin chained after
//! the primary one, asks the agent on its node to capture each new pod before the runtime starts
//! the pod's containers.
//!
//! ```text
//! runtime ──ADD──► primary plugin (veth, IPAM) ──prevResult──► zdivert-cni ──unix socket──► agent
//!                                                                   ◄── captured | outside | error
//! ```
//!
//! - `plugin`: the plugin's side (CNI's environment and stdin, its answers on stdout), and
//!   `client`: how it reaches the agent, or the API server while the agent is down;
//! - `server`: the agent's socket, which decides (the same selection as the source) and, for an
//!   ambient pod, answers only once the pod is captured (in-pod: acked by ztunnel);
//! - `conflist`: how the DaemonSet chains the plugin into the primary CNI's configuration.
//!
//! The plugin keeps no state of its own: the agent's socket is the only thing it talks to,
//! besides the API server when the agent cannot be reached.
pub mod client;
pub mod conflist;
pub mod install;
pub mod plugin;
pub mod server;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Where the agent listens for the plugin, unless the plugin's configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/zdivert/cni.sock";

/// The plugin's question to the agent: one JSON line, one answer line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRequest {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    pub container_id: String,
    /// The pod's netns as the runtime gave it (`CNI_NETNS`).
    pub netns: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The addresses the primary plugin gave the pod (`prevResult.ips`).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// How long the plugin waits for the answer: the agent answers within it.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AgentReply {
    /// The pod is captured (ADD, CHECK), or released (DEL).
    Done,
    /// The pod stays outside the mesh: nothing was done.
    Outside { why: String },
    /// An ambient pod that could not be captured: the runtime must retry.
    Failed { error: String },
}
