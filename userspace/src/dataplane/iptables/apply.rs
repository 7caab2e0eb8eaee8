//! Applying the layout: the node's side and ztunnel's, for IPv4 and, where there is IPv6 to
//! capture, for IPv6 the same way (ip6tables, `ip -6` rules and routes, the same tunnels).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    IptablesDataplane, NODE_TABLES, ZTUNNEL_TABLES, is_ztunnel_rule,
    layout::{self, Params, TunnelIndexes},
    nftables,
    remove::remove_ztunnel_side,
    saved::{self, SavedNetns},
    tables,
};
use crate::{
    error::Result,
    facts::{NodeFacts, ZtunnelFacts},
    netns,
    nl::Netlink,
};

/// The layout's parameters per family: IPv4 always (the tunnels' underlay), IPv6 where there is
/// any to capture.
pub(super) struct Families<'a> {
    pub v4: &'a Params,
    pub v6: Option<&'a Params>,
}

impl Families<'_> {
    /// Whether the tunnels carry IPv6: there is an IPv6 layout with a ztunnel in it.
    fn tunnels_v6(&self) -> bool {
        self.v6.is_some_and(|p| p.ztunnel.is_some())
    }
}

fn any(v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    }
}

impl IptablesDataplane {
    /// ztunnel's side: tunnels, sysctls, rules, routes and TPROXY rules in its netns; and the
    /// removal of all of it from a previous ztunnel's netns.
    pub(super) fn apply_ztunnel(&mut self, f: &Families, zf: Option<&ZtunnelFacts>) -> Result<()> {
        let want = zf.map(|z| SavedNetns {
            path: z.netns.clone(),
            inode: z.netns_inode,
            tables_before: None,
        });
        if let Some(old) = self.saved.ztunnel_netns.clone()
            && !want.as_ref().is_some_and(|w| w.same(&old))
        {
            remove_ztunnel_side(&self.file, &mut self.saved, self.backend, &old)?;
        }
        let (Some(z), Some(mut ns)) = (&f.v4.ztunnel, want) else {
            return Ok(());
        };
        if let Some(known) = self.saved.ztunnel_netns.as_ref().filter(|o| o.same(&ns)) {
            ns.tables_before = known.tables_before.clone();
        }
        self.saved.ztunnel_netns = Some(ns.clone());
        self.file.store(&self.saved)?;
        let (file, saved, backend) = (&self.file, &mut self.saved, self.backend);
        netns::run_in(&ns.path, || -> Result<()> {
            let nl = Netlink::new()?;
            // Its tables before our first rule there, so that cleanup removes only ours.
            if ns.tables_before.is_none() {
                let before = nftables::tagged_existing(backend)?;
                if let Some(z) = saved.ztunnel_netns.as_mut() {
                    z.tables_before = Some(before);
                }
                file.store(saved)?;
            }
            let mut idx = [0; 2];
            for (i, t) in layout::tunnels(f.v4, z, false, f.tunnels_v6())
                .iter()
                .enumerate()
            {
                idx[i] = nl.ensure_tunnel(t)?;
            }
            let t = TunnelIndexes {
                inbound: idx[0],
                outbound: idx[1],
            };
            saved::apply_sysctls(
                file,
                saved,
                ns.inode,
                &layout::ztunnel_sysctls(z),
                &[layout::ZTUNNEL_INBOUND, layout::ZTUNNEL_OUTBOUND],
            )?;
            let lo = nl.link_index("lo")?.unwrap_or(1);
            let v6 = f.v6.and_then(|p| Some((p, p.ztunnel.as_ref()?)));
            for (v6_family, p) in [(false, Some((f.v4, z))), (true, v6)] {
                match p {
                    Some((p, z)) => {
                        for (table, routes) in layout::ztunnel_routes(p, z, t, lo) {
                            nl.sync_table(table, v6_family, &routes)?;
                        }
                        for r in layout::ztunnel_policy_rules() {
                            nl.ensure_rule(r, v6_family)?;
                        }
                    }
                    None => {
                        for r in layout::ztunnel_policy_rules() {
                            nl.remove_rule(r, v6_family)?;
                        }
                        for table in ZTUNNEL_TABLES {
                            nl.sync_table(table, v6_family, &[])?;
                        }
                    }
                }
                let rules = p.map(|(_, z)| layout::ztunnel_rules(z)).unwrap_or_default();
                tables::sync_builtin(
                    backend,
                    v6_family,
                    "mangle",
                    "PREROUTING",
                    &rules,
                    is_ztunnel_rule,
                )?;
            }
            Ok(())
        })?
    }

    /// The node's side, both families. Without a ztunnel in a family's parameters, that
    /// family's captured traffic is dropped (blackholed tables).
    pub(super) fn apply_node(
        &mut self,
        f: &Families,
        facts: &NodeFacts,
        pods4: &[IpAddr],
        pods6: &[IpAddr],
    ) -> Result<()> {
        let tunnels = match &f.v4.ztunnel {
            Some(z) => {
                let mut idx = [0; 2];
                for (i, t) in layout::tunnels(f.v4, z, true, f.tunnels_v6())
                    .iter()
                    .enumerate()
                {
                    idx[i] = self.nl.ensure_tunnel(t)?;
                }
                Some(TunnelIndexes {
                    inbound: idx[0],
                    outbound: idx[1],
                })
            }
            None => {
                for name in [layout::NODE_INBOUND, layout::NODE_OUTBOUND] {
                    self.nl.delete_link(name)?;
                }
                None
            }
        };
        let veths: Vec<&str> = facts.pods.values().map(|f| f.veth.name.as_str()).collect();
        saved::apply_sysctls(
            &self.file,
            &mut self.saved,
            self.node_netns_inode,
            &layout::node_sysctls(f.v4, veths.into_iter()),
            &[layout::NODE_INBOUND, layout::NODE_OUTBOUND],
        )?;
        for (v6, p, pods) in [(false, Some(f.v4), pods4), (true, f.v6, pods6)] {
            let Some(p) = p else {
                self.remove_family(v6)?;
                continue;
            };
            let routes = match (&p.ztunnel, tunnels) {
                (Some(z), Some(t)) => layout::node_routes(p, z, t, pods),
                _ => layout::node_routes_closed(any(v6), pods),
            };
            for (table, routes) in routes {
                self.nl.sync_table(table, v6, &routes)?;
            }
            for r in layout::node_rules() {
                self.nl.ensure_rule(r, v6)?;
            }
            // The local rule's new place first, then the old one goes: never a moment without.
            for r in layout::local_rule_move() {
                self.nl.ensure_rule(r, v6)?;
            }
            self.nl.remove_rule(layout::LOCAL_RULE_AT_0, v6)?;
        }
        let members: Vec<(IpAddr, String)> = facts
            .pods
            .values()
            .flat_map(|f| f.ips.iter().map(|ip| (*ip, f.veth.name.clone())))
            .collect();
        for (set, kind, want) in layout::ipsets(&members) {
            super::ipset::sync(set, kind, &want)?;
        }
        tables::sync_chains(self.backend, false, &layout::node_chains(f.v4))?;
        tables::sync_chains(self.backend, true, &node_chains6(f))?;
        Ok(())
    }

    /// A family with nothing to capture: its rules and routes go (its chains stay closed).
    fn remove_family(&mut self, v6: bool) -> Result<()> {
        self.nl.ensure_rule(layout::LOCAL_RULE_AT_0, v6)?;
        for r in layout::local_rule_move()
            .into_iter()
            .chain(layout::node_rules())
        {
            self.nl.remove_rule(r, v6)?;
        }
        for t in NODE_TABLES {
            self.nl.sync_table(t, v6, &[])?;
        }
        Ok(())
    }
}

/// The node's ip6tables chains: the layout where there is IPv6 to capture, else the closed
/// chain (an ambient pod's IPv6 TCP is dropped, never passed around ztunnel).
pub(super) fn node_chains6(f: &Families) -> Vec<layout::Chain> {
    match f.v6 {
        Some(p) => layout::node_chains(p),
        None => layout::node_chains6_closed(),
    }
}
