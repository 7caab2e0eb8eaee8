//! The desired state of a node, independent of where it came from (file, Kubernetes) and of the
//! dataplane that realises it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::PathBuf,
};

#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An ambient pod on this node whose traffic must go through ztunnel.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodSpec {
    /// Every address of the pod (`status.podIPs`), IPv4 and IPv6.
    pub ips: Vec<IpAddr>,
    /// `metadata.uid`: how in-pod ztunnel (ZDS) names the pod.
    pub uid: String,
    /// `spec.serviceAccountName`, sent to in-pod ztunnel with the pod.
    pub service_account: String,
    /// The pod's network namespace when the source knows it; otherwise found by its address.
    pub netns: Option<std::path::PathBuf>,
}

/// The node's ztunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZtunnelSpec {
    pub pod: PodId,
    pub ips: Vec<IpAddr>,
    /// ztunnel's network namespace (a `/run/netns` name or `/proc/<pid>/ns/net`); `None`: the
    /// namespace that holds ztunnel's address, found by scanning `/proc` (the DaemonSet runs
    /// with hostPID, and Kubernetes gives pod namespaces no names).
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    pub node: String,
    pub ztunnel: Option<ZtunnelSpec>,
    pub pods: BTreeMap<PodId, PodSpec>,
    /// Addresses of this node's pods that stay outside the mesh (not ambient, opted out, a
    /// sidecar): their veths are released from the start-window hold.
    pub outside: BTreeSet<IpAddr>,
    /// Veths (by ifindex) that appeared while the agent ran and are held, their TCP dropped,
    /// until a pod of `pods` or `outside` is found behind them. Filled by the reconciler from
    /// the link watch, never by a source.
    pub held_links: BTreeSet<u32>,
    /// Every pod's netns as the runtime gave it through the CNI plugin, in the mesh or not: a
    /// netns found by address for another pod is never one of these (the reconciler fills it
    /// from the plugin's requests, never a source).
    pub sandboxes: BTreeMap<PodId, PathBuf>,
}
