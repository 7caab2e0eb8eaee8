//! The fallback dataplane: the original istio-cni layout (ipset, fwmarks, policy routing, UDP
//! tunnels into ztunnel's netns, TPROXY there), from `layout`, for kernels where the eBPF
//! programs cannot run. Applied idempotently and incrementally; `cleanup` removes all of it and
//! puts every sysctl back, from the state file and the kernel alone.
pub mod layout;

mod apply;
mod hold;
pub mod inspect;
mod ipset;
pub(crate) mod nftables;
mod remove;
mod saved;
pub mod status;
pub(crate) mod tables;

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use self::remove::remove_all;
use self::{
    apply::Families,
    layout::{Params, Ztunnel},
    saved::{Saved, StateFile},
};
pub use self::{
    remove::{Cleaned, cleanup, has_state},
    tables::{Backend, detect as detect_backend},
};
use super::{Dataplane, Report};
use crate::{
    error::{Error, Result},
    facts::{self, NodeFacts},
    netns,
    nl::{Netlink, TunnelKind},
    state::NodeState,
};

/// Which tunnel to build between the node and ztunnel's netns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TunnelChoice {
    /// geneve if the kernel can create one, else vxlan.
    Auto,
    Geneve,
    Vxlan,
}

pub struct IptablesDataplane {
    nl: Netlink,
    file: StateFile,
    saved: Saved,
    backend: Backend,
    tunnel: TunnelKind,
    dns_capture: bool,
    node_netns_inode: u64,
}

/// Our chains: (table, chain, the built-in chain that jumps to it).
const CHAINS: [(&str, &str, &str); 7] = [
    ("mangle", "ztunnel-PREROUTING", "PREROUTING"),
    ("mangle", "ztunnel-FORWARD", "FORWARD"),
    ("mangle", "ztunnel-INPUT", "INPUT"),
    ("mangle", "ztunnel-OUTPUT", "OUTPUT"),
    ("mangle", "ztunnel-POSTROUTING", "POSTROUTING"),
    ("nat", "ztunnel-PREROUTING", "PREROUTING"),
    ("nat", "ztunnel-POSTROUTING", "POSTROUTING"),
];

/// The start-window hold's chains, in iptables and ip6tables, with their sets. They outlive the
/// rest of the layout (a node with nothing to capture still holds new veths); only `cleanup`
/// removes them.
const HOLD_CHAINS: [(&str, &str, &str); 2] = [
    ("mangle", layout::HOLD_FROM_POD, "PREROUTING"),
    ("mangle", layout::HOLD_TO_POD, "FORWARD"),
];

const NODE_TABLES: [u32; 3] = [
    layout::TABLE_INBOUND,
    layout::TABLE_OUTBOUND,
    layout::TABLE_SPOOFED_REPLY,
];
const ZTUNNEL_TABLES: [u32; 3] = [100, 101, 102];

/// The rules the fallback owns in ztunnel's mangle PREROUTING.
fn is_ztunnel_rule(rule: &str) -> bool {
    let tproxy = rule.contains("-j TPROXY")
        && [layout::ZTUNNEL_INBOUND, layout::ZTUNNEL_OUTBOUND]
            .iter()
            .any(|i| rule.contains(&format!("-i {i} ")));
    let (local, mask) = (layout::MARK_ZTUNNEL_LOCAL, zdivert_common::MARK_MASK);
    tproxy || rule.ends_with(&format!("-j MARK --set-xmark {local:#x}/{mask:#x}"))
}

/// A UDP port nothing in this netns listens on, from `from` up.
fn free_udp_port(from: u16) -> u16 {
    let bound: BTreeSet<u16> = ["udp", "udp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let local = l.split_whitespace().nth(1)?;
                    u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    (from..=u16::MAX)
        .find(|p| !bound.contains(p))
        .unwrap_or(from)
}

impl IptablesDataplane {
    /// `chosen_because`: why the node runs the fallback, for `zdivert status`.
    pub fn new(
        state_dir: &Path,
        node: &str,
        tunnel: TunnelChoice,
        dns_capture: bool,
        chosen_because: &str,
    ) -> Result<Self> {
        let file = StateFile::new(state_dir, node);
        let mut saved = file.load()?;
        saved.chosen_because = Some(chosen_because.into());
        let nl = Netlink::new()?;
        let backend = match saved.backend {
            Some(b) => b,
            None => {
                let (b, why) = tables::detect();
                log::info!("iptables backend {b:?}: {why}");
                b
            }
        };
        let kind = match (tunnel, saved.tunnel) {
            (TunnelChoice::Auto, Some(kept)) => kept,
            (TunnelChoice::Auto, None) if nl.geneve_supported() => TunnelKind::Geneve,
            (TunnelChoice::Auto, None) => {
                log::info!("this kernel cannot create geneve devices (CONFIG_GENEVE unset)");
                TunnelKind::Vxlan
            }
            (TunnelChoice::Geneve, _) if !nl.geneve_supported() => {
                return Err(Error::NodeFacts {
                    node: node.into(),
                    reason: "--tunnel geneve, but this kernel cannot create geneve devices".into(),
                });
            }
            (TunnelChoice::Geneve, _) => TunnelKind::Geneve,
            (TunnelChoice::Vxlan, _) => TunnelKind::Vxlan,
        };
        if saved.tunnel.is_some_and(|t| t != kind) {
            // The tunnels are replaced on the next apply; the port is chosen anew.
            saved.tunnel_port = None;
        }
        log::info!("iptables dataplane: {kind} tunnels between the node and ztunnel");
        if saved.tables_before.is_none() {
            saved.tables_before = Some(nftables::tagged_existing(backend)?);
        }
        saved.backend = Some(backend);
        saved.tunnel = Some(kind);
        file.store(&saved)?;
        Self::install_hold(backend)?;
        Ok(IptablesDataplane {
            nl,
            file,
            saved,
            backend,
            tunnel: kind,
            dns_capture,
            node_netns_inode: netns::inode(Path::new("/proc/self/ns/net"))?,
        })
    }

    pub fn tunnel(&self) -> TunnelKind {
        self.tunnel
    }

    pub fn state_file(&self) -> &Path {
        &self.file.path
    }

    /// The layout's parameters for one family; `None` when it has nothing of that family to
    /// capture and no ztunnel address in it. `pods`: the ambient pods' addresses of the family.
    fn params(&mut self, facts: &NodeFacts, v6: bool, pods: &[IpAddr]) -> Result<Option<Params>> {
        let of_family = |ip: &IpAddr| ip.is_ipv6() == v6;
        let zip = facts
            .ztunnel
            .as_ref()
            .and_then(|z| z.ips.iter().copied().find(of_family));
        let Some(probe) = zip.or_else(|| pods.first().copied()) else {
            return Ok(None);
        };
        let host_ip = match self.nl.route_src(probe)? {
            Some(ip) if of_family(&ip) => ip,
            _ => {
                return Err(Error::NoSourceAddress { towards: probe });
            }
        };
        let port = match self.saved.tunnel_port {
            Some(p) => p,
            None => {
                let p = free_udp_port(layout::DEFAULT_TUNNEL_PORT);
                if p != layout::DEFAULT_TUNNEL_PORT {
                    log::info!(
                        "UDP {} is taken on this node: tunnels use {p}",
                        layout::DEFAULT_TUNNEL_PORT
                    );
                }
                self.saved.tunnel_port = Some(p);
                self.file.store(&self.saved)?;
                p
            }
        };
        let ztunnel = facts.ztunnel.as_ref().and_then(|z| {
            Some(Ztunnel {
                ip: zip?,
                veth: z.host_veth.name.clone(),
                veth_index: z.host_veth.index,
                eth0: z.eth0.name.clone(),
                eth0_index: z.eth0.index,
            })
        });
        Ok(Some(Params {
            host_ip,
            tunnel: self.tunnel,
            tunnel_port: port,
            dns_capture: self.dns_capture,
            ztunnel,
        }))
    }
}

impl Dataplane for IptablesDataplane {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, state: &NodeState) -> Result<Report> {
        let mut facts = facts::resolve(&self.nl, state)?;
        let mut report = Report::default();
        report.failed.append(&mut facts.failures);
        let addresses: BTreeSet<IpAddr> = facts
            .pods
            .values()
            .flat_map(|f| f.ips.iter().copied())
            .collect();
        let (pods6, pods4): (Vec<IpAddr>, Vec<IpAddr>) =
            addresses.into_iter().partition(IpAddr::is_ipv6);
        let held: Vec<String> = facts.held.iter().map(|l| l.name.clone()).collect();
        report.held = facts.held.iter().map(|l| l.index).collect();
        let p6 = self.params(&facts, true, &pods6)?;
        // IPv4 is the tunnels' underlay: a node without it has nothing this layout can do.
        let Some(p) = self.params(&facts, false, &pods4)? else {
            // Nothing to capture and no ztunnel: nothing of ours belongs on the node.
            remove_all(&self.file, &mut self.saved, self.backend)?;
            self.sync_holds(&held)?;
            self.record_applied(None)?;
            return Ok(report);
        };
        let families = Families {
            v4: &p,
            v6: p6.as_ref(),
        };
        let closed = |p: &Params| Params {
            ztunnel: None,
            ..p.clone()
        };
        let (closed4, closed6) = (closed(&p), p6.as_ref().map(closed));
        let closed = Families {
            v4: &closed4,
            v6: closed6.as_ref(),
        };
        let applied = if p.ztunnel.is_none() {
            // Close the node's side before taking ztunnel's apart: never a moment of bypass.
            self.apply_node(&closed, &facts, &pods4, &pods6)?;
            self.apply_ztunnel(&closed, None)?;
            &closed
        } else if let Err(e) = self.apply_ztunnel(&families, facts.ztunnel.as_ref()) {
            let z = facts
                .ztunnel
                .take()
                .expect("p.ztunnel comes from facts.ztunnel");
            report.failed.push((z.pod, e));
            // Fail closed until ztunnel's side is complete.
            self.apply_node(&closed, &facts, &pods4, &pods6)?;
            &closed
        } else {
            self.apply_node(&families, &facts, &pods4, &pods6)?;
            &families
        };
        // Capture is in place before a classified veth's hold goes.
        self.sync_holds(&held)?;
        self.record_applied(Some(applied))?;
        report.ztunnel = super::ZtunnelState::of(facts.ztunnel.as_ref());
        report.captured = facts.pods.keys().cloned().collect();
        Ok(report)
    }

    fn hold(&mut self, links: &[crate::nl::Link]) -> Result<()> {
        // Only additions: one `ipset restore`, no read of what is there.
        let names: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
        for (set, _, add) in layout::hold_members(&names) {
            ipset::add(set, &add)?;
        }
        Ok(())
    }

    fn held(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for name in self.held_names()? {
            out.extend(self.nl.link_index(&name)?);
        }
        Ok(out)
    }
}
