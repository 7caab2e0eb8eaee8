//! What the fallback has in the kernel, read without the agent (for `zdivert status`): the mode
//! and why, the state file, the tunnels, the sets with their members, and every rule the last
//! apply made, with its packet counter or as missing.
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{
    ipset, layout,
    saved::{AppliedRule, StateFile},
    tables::{self, Backend},
};
use crate::{error::Result, netns, nl::Netlink};

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub state_file: PathBuf,
    /// Why the agent runs the fallback (`--mode iptables`, or what the kernel lacked).
    pub chosen_because: Option<String>,
    pub backend: Option<Backend>,
    pub tunnel: Option<String>,
    pub tunnel_port: Option<u16>,
    pub tunnel_links: Vec<TunnelLink>,
    /// ztunnel's netns, and whether it still exists.
    pub ztunnel_netns: Option<(PathBuf, bool)>,
    pub ipsets: Vec<SetState>,
    pub rules: Vec<RuleState>,
}

#[derive(Debug, Serialize)]
pub struct TunnelLink {
    pub name: &'static str,
    /// `node` or `ztunnel`.
    pub netns: &'static str,
    pub present: bool,
}

#[derive(Debug, Serialize)]
pub struct SetState {
    pub name: &'static str,
    /// `None`: the set does not exist.
    pub members: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
pub struct RuleState {
    #[serde(flatten)]
    pub rule: AppliedRule,
    /// Packets the rule matched; `None`: the rule is missing.
    pub packets: Option<u64>,
}

pub fn inspect(state_dir: &Path, node: &str) -> Result<Inspection> {
    let file = StateFile::new(state_dir, node);
    let saved = file.load()?;
    let nl = Netlink::new()?;
    let ztunnel_ns = saved
        .ztunnel_netns
        .as_ref()
        .map(|n| (n.path.clone(), netns::inode(&n.path).ok() == Some(n.inode)));
    let mut tunnel_links = vec![];
    for name in [layout::NODE_INBOUND, layout::NODE_OUTBOUND] {
        let present = nl.link_index(name)?.is_some();
        tunnel_links.push(TunnelLink {
            name,
            netns: "node",
            present,
        });
    }
    if let Some((path, true)) = &ztunnel_ns {
        for name in [layout::ZTUNNEL_INBOUND, layout::ZTUNNEL_OUTBOUND] {
            let present = netns::run_in(path, || Netlink::new()?.link_index(name))??.is_some();
            tunnel_links.push(TunnelLink {
                name,
                netns: "ztunnel",
                present,
            });
        }
    }
    let mut ipsets = vec![];
    let all_sets = layout::ipsets(&[])
        .into_iter()
        .map(|(name, _, _)| name)
        .chain(layout::hold_members(&[]).map(|(name, _, _)| name));
    for name in all_sets {
        ipsets.push(SetState {
            name,
            members: ipset::members(name)?.map(|m| m.into_iter().collect()),
        });
    }
    let backend = saved.backend.unwrap_or(Backend::Nft);
    let mut rules = vec![];
    for r in &saved.applied {
        let counted = match (r.netns.as_str(), &ztunnel_ns) {
            ("ztunnel", Some((path, true))) => {
                netns::run_in(path, || tables::save_counted(backend, r.v6, &r.table))??
            }
            ("ztunnel", _) => String::new(),
            _ => tables::save_counted(backend, r.v6, &r.table)?,
        };
        rules.push(RuleState {
            packets: packets_of(&counted, &r.rule),
            rule: r.clone(),
        });
    }
    Ok(Inspection {
        state_file: file.path,
        chosen_because: saved.chosen_because,
        backend: saved.backend,
        tunnel: saved.tunnel.map(|t| t.to_string()),
        tunnel_port: saved.tunnel_port,
        tunnel_links,
        ztunnel_netns: ztunnel_ns,
        ipsets,
        rules,
    })
}

/// The packet counter of `rule` in `iptables-save -c` output (`[packets:bytes] -A …`).
fn packets_of(counted: &str, rule: &str) -> Option<u64> {
    counted.lines().find_map(|l| {
        let (counters, text) = l.strip_prefix('[')?.split_once("] ")?;
        (text == rule).then(|| counters.split(':').next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_for_the_exact_rule() {
        let save = "*mangle\n:PREROUTING ACCEPT [0:0]\n[12:840] -A ztunnel-PREROUTING -p udp -j RETURN\n\
                    [3:180] -A ztunnel-PREROUTING -p tcp -j RETURN\nCOMMIT\n";
        assert_eq!(
            packets_of(save, "-A ztunnel-PREROUTING -p tcp -j RETURN"),
            Some(3)
        );
        assert_eq!(
            packets_of(save, "-A ztunnel-PREROUTING -p icmp -j RETURN"),
            None
        );
    }
}
