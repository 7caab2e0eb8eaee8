//! `zdivert status`: what is in the kernel for one node, read without the agent, in the mode
//! the node runs: the eBPF dataplane's pins, or the fallback's state file, sets and rules.
use std::path::Path;

use serde::Serialize;

use crate::{dataplane::iptables, error::Result};

pub mod ebpf;
pub mod fallback;

#[derive(Debug, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Status {
    Ebpf(ebpf::Status),
    Iptables(fallback::Status),
}

/// The node's status in whichever mode its state says it runs.
pub fn read(bpffs: &Path, state_dir: &Path, node: &str) -> Result<Status> {
    if iptables::has_state(state_dir, node) {
        Ok(Status::Iptables(fallback::read(state_dir, node)?))
    } else {
        Ok(Status::Ebpf(ebpf::read(bpffs, node)?))
    }
}

impl Status {
    pub fn render(&self) -> String {
        match self {
            Status::Ebpf(s) => s.render(),
            Status::Iptables(s) => s.render(),
        }
    }
}

pub fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
