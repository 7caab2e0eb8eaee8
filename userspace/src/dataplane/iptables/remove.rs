//! Taking the layout apart: from a previous ztunnel's netns, from a node with nothing left to
//! capture, and for `zdivert cleanup` (from the state file and the kernel alone).
use std::path::{Path, PathBuf};

use super::{
    CHAINS, HOLD_CHAINS, NODE_TABLES, ZTUNNEL_TABLES, ipset, is_ztunnel_rule, layout, nftables,
    saved::{self, Saved, SavedNetns, StateFile},
    tables::{self, Backend},
};
use crate::{error::Result, netns, nl::Netlink};

pub(super) fn remove_ztunnel_side(
    file: &StateFile,
    saved: &mut Saved,
    backend: Backend,
    ns: &SavedNetns,
) -> Result<()> {
    // A netns that is gone took everything in it along.
    let alive = netns::inode(&ns.path).ok() == Some(ns.inode);
    if alive {
        netns::run_in(&ns.path, || -> Result<()> {
            let nl = Netlink::new()?;
            for v6 in [false, true] {
                tables::sync_builtin(backend, v6, "mangle", "PREROUTING", &[], is_ztunnel_rule)?;
                // The table our rules made the backend create, now empty, unless it was there.
                if let Some(before) = &ns.tables_before
                    && !before.contains(&nftables::tag(v6, "mangle"))
                {
                    nftables::delete_if_empty(backend, v6, "mangle")?;
                }
                for r in layout::ztunnel_policy_rules() {
                    nl.remove_rule(r, v6)?;
                }
                for t in ZTUNNEL_TABLES {
                    nl.sync_table(t, v6, &[])?;
                }
            }
            for name in [layout::ZTUNNEL_INBOUND, layout::ZTUNNEL_OUTBOUND] {
                nl.delete_link(name)?;
            }
            saved::restore_sysctls(file, saved, ns.inode, |_| true)
        })??;
    } else {
        saved.sysctls.retain(|s| s.netns_inode != ns.inode);
    }
    saved.ztunnel_netns = None;
    file.store(saved)
}

/// Removes the whole layout from the node (the calling thread's netns) and from ztunnel's netns.
pub(super) fn remove_all(file: &StateFile, saved: &mut Saved, backend: Backend) -> Result<()> {
    if let Some(ns) = saved.ztunnel_netns.clone() {
        remove_ztunnel_side(file, saved, backend, &ns)?;
    }
    for v6 in [false, true] {
        tables::remove_chains(backend, v6, &CHAINS)?;
    }
    for (set, _, _) in layout::ipsets(&[]) {
        ipset::destroy(set)?;
    }
    let nl = Netlink::new()?;
    for v6 in [false, true] {
        nl.ensure_rule(layout::LOCAL_RULE_AT_0, v6)?;
        for r in layout::local_rule_move()
            .into_iter()
            .chain(layout::node_rules())
        {
            nl.remove_rule(r, v6)?;
        }
        for t in NODE_TABLES {
            nl.sync_table(t, v6, &[])?;
        }
    }
    for name in [layout::NODE_INBOUND, layout::NODE_OUTBOUND] {
        nl.delete_link(name)?;
    }
    let node_inode = netns::inode(Path::new("/proc/thread-self/ns/net"))?;
    saved::restore_sysctls(file, saved, node_inode, |_| true)
}

/// Whether an agent left the fallback's state for `node` here.
pub fn has_state(state_dir: &Path, node: &str) -> bool {
    StateFile::new(state_dir, node).exists()
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub state_file: Option<PathBuf>,
    pub ztunnel_netns: Option<PathBuf>,
}

/// Removes this node's fallback layout completely, with no agent running: chains and jumps (in
/// whichever backend holds them), the ipset, rules, routes, tunnels, ztunnel's side, and puts
/// back every sysctl recorded in the state file.
pub fn cleanup(state_dir: &Path, node: &str) -> Result<Cleaned> {
    let file = StateFile::new(state_dir, node);
    let existed = file.exists();
    let mut saved = file.load()?;
    let ztunnel_netns = saved.ztunnel_netns.as_ref().map(|n| n.path.clone());
    let backends = match saved.backend {
        Some(b) => vec![b],
        None => vec![Backend::Nft, Backend::Legacy],
    };
    for b in backends {
        remove_all(&file, &mut saved, b)?;
        for v6 in [false, true] {
            tables::remove_chains(b, v6, &HOLD_CHAINS)?;
        }
        for (set, _, _) in layout::hold_members(&[]) {
            ipset::destroy(set)?;
        }
        // The tables our chains made the backend create, now empty, unless the node had them.
        if let Some(before) = &saved.tables_before {
            for v6 in [false, true] {
                for table in ["mangle", "nat"] {
                    if !before.contains(&nftables::tag(v6, table)) {
                        nftables::delete_if_empty(b, v6, table)?;
                    }
                }
            }
        }
    }
    file.remove()?;
    Ok(Cleaned {
        state_file: existed.then(|| file.path.clone()),
        ztunnel_netns,
    })
}
