//! The ztunnels the programs send to: the current one and, during a rolling update, the one it
//! replaced, which keeps the connections it holds until it holds none (its process exited) or
//! its pod is gone (its veth disappears).
//! Each needs tproxy routing and an sk_lookup link in its netns.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::Ebpf;

use super::{PinDirs, TPROXY_RULE, lookup};
use crate::{error::Result, facts::ZtunnelFacts, netns, nl::Netlink, state::PodId};
use zdivert_common::{
    DrainingZtunnel, ZTUNNEL_F_PRESENT, ZTUNNEL_F_V4, ZTUNNEL_F_V6, ZTUNNEL_TPROXY_TABLE,
};

/// A replaced ztunnel, and its netns as the node's netns numbers it (where the pods' programs
/// look up the sockets it holds).
pub struct Draining {
    pub ztunnel: ZtunnelFacts,
    pub netns_id: u32,
}

#[derive(Default)]
pub struct Ztunnels {
    /// The ztunnel the last apply wired in, to notice its replacement.
    wired: Option<ZtunnelFacts>,
    pub draining: Option<Draining>,
    /// ztunnel netns (path, has IPv6) whose tproxy routing and lookup link this process set up.
    routed: Vec<(PathBuf, bool)>,
}

impl Ztunnels {
    /// A restarted agent picks up the drain an earlier one started: from the draining entry it
    /// left in the map and the pins of that ztunnel's tproxy attachment (its netns).
    pub fn adopt(
        nl: &Netlink,
        entry: &DrainingZtunnel,
        pins: &[super::attach::PinnedAttachment],
    ) -> Self {
        let mut out = Ztunnels::default();
        if entry.ztunnel.flags & ZTUNNEL_F_PRESENT == 0 {
            return out;
        }
        let found = || -> Option<ZtunnelFacts> {
            let host_veth = nl.link_by_index(entry.ztunnel.host_ifindex).ok()?;
            let tproxy = pins.iter().find(|p| {
                p.hook == super::attach::Hook::ZtunnelTproxy
                    && netns::find_by_inode(p.netns_inode).is_some_and(|ns| {
                        netns::run_in(&ns, || {
                            Netlink::new()
                                .and_then(|n| n.link_by_index(p.ifindex))
                                .is_ok_and(|l| l.mac == entry.ztunnel.mac)
                        })
                        .unwrap_or(false)
                    })
            })?;
            let ns = netns::find_by_inode(tproxy.netns_inode)?;
            let eth0 = netns::run_in(&ns, || Netlink::new()?.link_by_index(tproxy.ifindex))
                .ok()?
                .ok()?;
            let mut ips = Vec::new();
            if entry.ztunnel.flags & ZTUNNEL_F_V4 != 0 {
                ips.push(IpAddr::from(entry.ztunnel.ipv4));
            }
            if entry.ztunnel.flags & ZTUNNEL_F_V6 != 0 {
                ips.push(IpAddr::from(entry.ztunnel.ipv6));
            }
            Some(ZtunnelFacts {
                pod: PodId {
                    namespace: "(draining)".into(),
                    name: eth0.name.clone(),
                },
                ips,
                netns: ns,
                netns_inode: tproxy.netns_inode,
                missing_listeners: Vec::new(),
                host_veth,
                eth0,
            })
        };
        match found() {
            Some(ztunnel) => {
                log::info!(
                    "a replaced ztunnel (netns {}) still drains: its connections stay with it",
                    ztunnel.netns.display()
                );
                out.draining = Some(Draining {
                    ztunnel,
                    netns_id: entry.netns_id,
                });
            }
            None => log::info!("the replaced ztunnel an earlier agent drained is gone"),
        }
        out
    }

    /// Notes that `current` replaced the ztunnel wired in before (which then drains), and ends
    /// the draining of one that is gone or current again.
    pub fn update(&mut self, nl: &Netlink, current: Option<&ZtunnelFacts>) {
        let index = current.map(|z| z.host_veth.index);
        if let Some(prev) = self.wired.take()
            && Some(prev.host_veth.index) != index
        {
            match nl.link_by_index(prev.host_veth.index) {
                Ok(l) if l.name == prev.host_veth.name && l.peer_netns_id.is_some() => {
                    log::info!(
                        "ztunnel {} replaced: the connections it holds stay with it until it is gone",
                        prev.pod
                    );
                    self.draining = Some(Draining {
                        netns_id: l.peer_netns_id.unwrap_or_default() as u32,
                        ztunnel: prev,
                    });
                }
                _ => log::info!("ztunnel {} replaced, and gone", prev.pod),
            }
        }
        self.wired = current.cloned();
        if let Some(d) = &self.draining {
            let veth = &d.ztunnel.host_veth;
            let alive = nl
                .link_by_index(veth.index)
                .is_ok_and(|l| l.name == veth.name);
            // Its process gone (or nothing left to keep): an error reading it keeps the drain.
            let holds = crate::ztunnel::holds_connections(&d.ztunnel.netns).unwrap_or(true);
            if !alive || !holds || Some(veth.index) == index {
                log::info!(
                    "ztunnel {} holds no connection any more: its drain ends",
                    d.ztunnel.pod
                );
                self.draining = None;
            }
        }
    }

    /// Every ztunnel the programs may send to: the current one, then the draining one.
    pub fn all<'a>(
        &'a self,
        current: Option<&'a ZtunnelFacts>,
    ) -> impl Iterator<Item = &'a ZtunnelFacts> {
        current
            .into_iter()
            .chain(self.draining.as_ref().map(|d| &d.ztunnel))
    }

    /// tproxy routing and the lookup link in the netns of every ztunnel of `all`; their removal
    /// from a netns no ztunnel of `all` lives in any more.
    pub fn route(
        &mut self,
        ebpf: &mut Ebpf,
        dirs: &PinDirs,
        current: Option<&ZtunnelFacts>,
    ) -> Result<()> {
        let want: Vec<(PathBuf, bool, u64)> = self
            .all(current)
            .map(|z| {
                (
                    z.netns.clone(),
                    z.ips.iter().any(IpAddr::is_ipv6),
                    z.netns_inode,
                )
            })
            .collect();
        let done = std::mem::take(&mut self.routed);
        for (old, v6) in &done {
            if !want.iter().any(|w| &w.0 == old)
                && old.exists()
                && let Err(e) = unroute(old, *v6)
            {
                log::warn!(
                    "removing tproxy routing from old ztunnel netns {}: {}",
                    old.display(),
                    e.chain()
                );
            }
        }
        let keep: Vec<u64> = want.iter().map(|w| w.2).collect();
        lookup::remove_others(dirs, lookup::Lookup::Ztunnel, &keep)?;
        for (ns, v6, inode) in want {
            tproxy_routing(&ns, v6, true)?;
            let pinned = dirs
                .links
                .join(lookup::Lookup::Ztunnel.pin_name(inode))
                .exists();
            if !done.iter().any(|d| d.0 == ns) || !pinned {
                lookup::attach(ebpf, dirs, lookup::Lookup::Ztunnel, &ns, inode)?;
            }
            self.routed.push((ns, v6));
        }
        Ok(())
    }
}

pub fn unroute(ns: &Path, v6: bool) -> Result<()> {
    tproxy_routing(ns, v6, false)
}

/// Installs (or removes) the rule and local route that deliver assigned packets, in ztunnel's
/// netns, for IPv4 and, if ztunnel has an IPv6 address, IPv6.
fn tproxy_routing(ns: &Path, v6: bool, install: bool) -> Result<()> {
    netns::run_in(ns, || -> Result<()> {
        let nl = Netlink::new()?;
        for family_v6 in [false, true].into_iter().filter(|f| v6 || !f) {
            if install {
                nl.ensure_rule(TPROXY_RULE, family_v6)?;
                nl.ensure_local_default(ZTUNNEL_TPROXY_TABLE, family_v6)?;
            } else {
                nl.remove_rule(TPROXY_RULE, family_v6)?;
                nl.remove_local_default(ZTUNNEL_TPROXY_TABLE, family_v6)?;
            }
        }
        Ok(())
    })?
}
