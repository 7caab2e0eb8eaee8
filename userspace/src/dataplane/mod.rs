//! The dataplanes: one trait, fed the same desired state; `ebpf` (default) and `iptables`
//! (the article's layout, for kernels where the programs cannot run).
use crate::{
    error::Error,
    state::{NodeState, PodId},
};

pub mod ebpf;
pub mod iptables;

/// What one `apply` achieved. Failures are per pod: one bad pod never blocks the others.
#[derive(Debug, Default)]
pub struct Report {
    /// Pods whose traffic now goes through ztunnel.
    pub captured: Vec<PodId>,
    /// Pods (or ztunnel) that could not be set up this time; retried on the next apply.
    pub failed: Vec<(PodId, Error)>,
    /// Whether a ztunnel is wired in; without one, captured traffic is dropped.
    pub ztunnel_ready: bool,
}

pub trait Dataplane {
    fn name(&self) -> &'static str;
    /// Makes the kernel match `state`, idempotently. Errors are node-wide problems (netlink
    /// unusable, bpffs gone); per-pod problems are in the report.
    fn apply(&mut self, state: &NodeState) -> Result<Report, Error>;
}
