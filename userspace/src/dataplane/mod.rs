//! The dataplanes: one trait, fed the same desired state; `ebpf` (default) and `iptables`
//! (the article's layout, for kernels where the programs cannot run).
use crate::{
    error::Error,
    state::{NodeState, PodId},
};

pub mod choose;
pub mod ebpf;
pub mod inpod;
pub mod iptables;
pub mod status;

/// What one `apply` achieved. Failures are per pod: one bad pod never blocks the others.
#[derive(Debug, Default)]
pub struct Report {
    /// Pods whose traffic now goes through ztunnel.
    pub captured: Vec<PodId>,
    /// Pods (or ztunnel) that could not be set up this time; retried on the next apply.
    pub failed: Vec<(PodId, Error)>,
    /// Whether a ztunnel is wired in and listening; without one, captured traffic is dropped.
    pub ztunnel: ZtunnelState,
    /// Programs found behind another on their hook and moved back to the head.
    pub moved_to_head: usize,
    /// Attachments or rules found gone from the kernel (deleted behind the agent's back) and
    /// put back.
    pub repaired: usize,
    /// Veths still held (by ifindex): no pod found behind them yet, or capture failed.
    pub held: Vec<u32>,
    /// A replaced ztunnel that keeps the connections it holds until it is gone.
    pub draining: Option<PodId>,
}

/// The node's ztunnel as the last apply found it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ZtunnelState {
    /// None on the node (or it could not be wired in).
    #[default]
    Absent,
    /// Wired in, but not listening on these ports (starting, or its process exited).
    NotListening { pod: PodId, missing: Vec<u16> },
    Ready {
        pod: PodId,
        /// Where to look for its listeners between applies.
        netns: std::path::PathBuf,
    },
    /// In-pod mode: ztunnels connected over ZDS, and no pod yet to open listeners in.
    Connected { peers: usize },
}

impl ZtunnelState {
    /// From what facts found about the ztunnel that is wired in, if any.
    pub fn of(z: Option<&crate::facts::ZtunnelFacts>) -> Self {
        match z {
            None => ZtunnelState::Absent,
            Some(z) if !z.missing_listeners.is_empty() => ZtunnelState::NotListening {
                pod: z.pod.clone(),
                missing: z.missing_listeners.clone(),
            },
            Some(z) => ZtunnelState::Ready {
                pod: z.pod.clone(),
                netns: z.netns.clone(),
            },
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(
            self,
            ZtunnelState::Ready { .. } | ZtunnelState::Connected { .. }
        )
    }
}

impl std::fmt::Display for ZtunnelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ZtunnelState::Absent => {
                write!(
                    f,
                    "no usable ztunnel: ambient pods' TCP is dropped until one is ready"
                )
            }
            ZtunnelState::NotListening { pod, missing } => {
                let ports: Vec<String> = missing.iter().map(|p| format!(":{p}")).collect();
                write!(
                    f,
                    "ztunnel {pod} is not listening on {} (starting, or exited): ambient pods' \
                     TCP is dropped until it is",
                    ports.join(", ")
                )
            }
            ZtunnelState::Ready { pod, .. } => write!(f, "ztunnel {pod} is ready"),
            ZtunnelState::Connected { peers } => {
                write!(
                    f,
                    "{peers} in-pod ztunnel(s) connected over ZDS, no pod to serve yet"
                )
            }
        }
    }
}

/// `zdivert cleanup` for one node, both modes: what was removed, one line each.
/// The eBPF dataplanes' pins and links (`ebpf::cleanup`), then what in-pod mode set up beside
/// its programs in each pod netns they were detached from.
pub(crate) fn cleanup_ebpf(bpffs: &std::path::Path, node: &str) -> Result<ebpf::Cleaned, Error> {
    ebpf::sweep_stale(bpffs);
    let c = ebpf::cleanup(bpffs, node)?;
    for ns in &c.pod_netns {
        if let Err(e) = inpod::programs::unroute(ns) {
            log::warn!("pod netns {}: {}", ns.display(), e.chain());
        }
    }
    Ok(c)
}

pub fn cleanup(
    bpffs: &std::path::Path,
    state_dir: &std::path::Path,
    node: &str,
) -> Result<Vec<String>, Error> {
    let c = cleanup_ebpf(bpffs, node)?;
    let mut done = vec![format!(
        "removed {} links, {} maps, tproxy routing in {} ztunnel netns and {} pod netns",
        c.links,
        c.maps,
        c.ztunnel_netns.len(),
        c.pod_netns.len()
    )];
    for file in [
        crate::zds::status_file(state_dir, node),
        inpod::choice_file(state_dir, node),
        inpod::pods::file(state_dir, node),
        crate::agent::cni::Overlay::file_for(state_dir, node),
    ] {
        if file.exists() {
            std::fs::remove_file(&file)
                .map_err(|source| Error::StateFile { path: file, source })?;
        }
    }
    let pods = inpod::rules::cleanup(state_dir, node)?;
    if !pods.is_empty() {
        done.push(format!(
            "removed istio-cni's rules from {} pod netns",
            pods.len()
        ));
    }
    if iptables::has_state(state_dir, node) {
        let c = iptables::cleanup(state_dir, node)?;
        done.push(format!(
            "removed the iptables layout{}",
            c.ztunnel_netns
                .map(|n| format!(" (and from ztunnel netns {})", n.display()))
                .unwrap_or_default()
        ));
    }
    Ok(done)
}

pub trait Dataplane {
    fn name(&self) -> &'static str;
    /// Makes the kernel match `state`, idempotently. Errors are node-wide problems (netlink
    /// unusable, bpffs gone); per-pod problems are in the report.
    fn apply(&mut self, state: &NodeState) -> Result<Report, Error>;
    /// Holds new veths at once, their TCP dropped both ways (the node's own connections
    /// excepted), until an `apply` finds the pod behind them. Called from the link watch,
    /// before the source can know the pod: a pod must not talk around ztunnel meanwhile.
    fn hold(&mut self, links: &[crate::nl::Link]) -> Result<(), Error>;
    /// The veths held in the kernel, an earlier agent's holds included (adopted at start).
    fn held(&self) -> Result<Vec<u32>, Error>;
    /// The next `apply` checks the pod in the netns at `netns` in full, whatever was checked
    /// lately: the runtime has just (re)made its interfaces (a CNI ADD).
    fn recheck(&mut self, _netns: &std::path::Path) {}
    /// After an `apply` that captured `pod`: waits, until `deadline`, for whatever else must
    /// hold before the pod's traffic may flow (in-pod: ztunnel's ack of the pod over ZDS).
    fn confirm(
        &mut self,
        _pod: &crate::state::PodId,
        _deadline: std::time::Instant,
    ) -> Result<(), Error> {
        Ok(())
    }
    /// Registers the dataplane's own metrics (called once, before serving).
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}
}
