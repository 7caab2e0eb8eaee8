//! `zdivert status`: what is in the kernel for one node, read without the agent, in the mode
//! the node runs: the eBPF dataplane's pins, or the fallback's state file, sets and rules.
use std::path::Path;

use serde::Serialize;

use super::{ebpf, iptables};
use crate::error::Result;

#[derive(Debug, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Status {
    Ebpf(ebpf::status::Status),
    Iptables(iptables::status::Status),
}

/// `only`, or every node that has pinned state (this layout or the one before it) or fallback
/// state on this machine.
pub fn nodes(bpffs: &Path, state_dir: &Path, only: Option<String>) -> Vec<String> {
    if let Some(n) = only {
        return vec![n];
    }
    let base = bpffs.join(zdivert_common::PIN_BASE);
    let dirs = [
        base.join(zdivert_common::PIN_VERSION),
        base.join(zdivert_common::PIN_VERSION_BEFORE),
        state_dir.to_path_buf(),
    ];
    let mut nodes: Vec<String> = dirs
        .iter()
        .flat_map(std::fs::read_dir)
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            // An in-pod agent's records (`<node>.inpod/`) and ZDS peers (`<node>.zds.json`).
            if let Some(node) = name.strip_suffix(".zds.json") {
                return Some(node.to_string());
            }
            e.path()
                .is_dir()
                .then(|| name.strip_suffix(".inpod").unwrap_or(&name).to_string())
        })
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// The node's status in whichever mode its state says it runs.
pub fn read(bpffs: &Path, state_dir: &Path, node: &str) -> Result<Status> {
    if iptables::has_state(state_dir, node) {
        Ok(Status::Iptables(iptables::status::read(state_dir, node)?))
    } else {
        Ok(Status::Ebpf(ebpf::status::read(bpffs, node)?))
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
