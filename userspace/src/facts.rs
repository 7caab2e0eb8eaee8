//! Node facts: where each pod of the desired state actually is on this node (its host veth, from
//! the route to its address, as in the article's ptp network) and where ztunnel is. A pod that
//! cannot be resolved is reported with its name and left out; it never blocks the others.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::{
    error::{Error, Result},
    netns,
    nl::{Link, Netlink, RouteKind},
    state::{NodeState, PodId, ZtunnelSpec},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub ips: Vec<IpAddr>,
    pub veth: Link,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZtunnelFacts {
    pub pod: PodId,
    pub ips: Vec<IpAddr>,
    pub netns: PathBuf,
    pub netns_inode: u64,
    /// ztunnel's listeners that are not there (not started yet, or exited): captured traffic
    /// is dropped until they are.
    pub missing_listeners: Vec<u16>,
    /// ztunnel's veth in the node's netns.
    pub host_veth: Link,
    /// The interface holding ztunnel's address inside its netns.
    pub eth0: Link,
}

#[derive(Debug, Default)]
pub struct NodeFacts {
    /// Addresses of the node itself (every interface): traffic with them is not captured.
    pub node_ips: Vec<IpAddr>,
    pub ztunnel: Option<ZtunnelFacts>,
    pub pods: BTreeMap<PodId, PodFacts>,
    /// What could not be resolved, by pod; retried on the next reconcile.
    pub failures: Vec<(PodId, Error)>,
    /// Held veths (`NodeState::held_links`) that still exist and that no pod was found behind.
    pub held: Vec<Link>,
}

pub fn resolve(nl: &Netlink, state: &NodeState) -> Result<NodeFacts> {
    // Two dumps instead of two netlink round trips per pod: an apply at 10k pods stays cheap.
    let view = NodeView {
        routes: MainRoutes::load(nl)?,
        links: nl.links()?.into_iter().map(|l| (l.index, l)).collect(),
    };
    let mut facts = NodeFacts {
        node_ips: node_ips(nl.addresses()?, &view.links),
        ..NodeFacts::default()
    };
    if let Some(z) = &state.ztunnel {
        match resolve_ztunnel(nl, z) {
            Ok(zf) => facts.ztunnel = Some(zf),
            Err(e) => facts.failures.push((z.pod.clone(), e)),
        }
    }
    let ztunnel_veth = facts.ztunnel.as_ref().map(|z| z.host_veth.index);
    for (id, pod) in &state.pods {
        match resolve_pod(nl, &view, id, &pod.ips, ztunnel_veth) {
            Ok(pf) => {
                facts.pods.insert(id.clone(), pf);
            }
            Err(e) => facts.failures.push((id.clone(), e)),
        }
    }
    facts.held = still_held(state, &facts, &view);
    Ok(facts)
}

/// The held veths no known pod was found behind. An ambient pod that did not resolve keeps its
/// veth held: it is released by capture, never before.
fn still_held(state: &NodeState, facts: &NodeFacts, view: &NodeView) -> Vec<Link> {
    if state.held_links.is_empty() {
        return Vec::new();
    }
    let mut known: std::collections::BTreeSet<u32> =
        facts.pods.values().map(|p| p.veth.index).collect();
    known.extend(facts.ztunnel.as_ref().map(|z| z.host_veth.index));
    known.extend(state.outside.iter().filter_map(|ip| view.routes.oif(*ip)));
    state
        .held_links
        .iter()
        .filter(|i| !known.contains(i))
        .filter_map(|i| view.links.get(i).cloned())
        .collect()
}

/// Devices whose addresses are Services', not the node's: kube-proxy in IPVS mode binds every
/// ClusterIP on `kube-ipvs0`, NodeLocal DNSCache binds its address (and kube-dns's ClusterIP)
/// on `nodelocaldns`. Taken for the node's, a pod's TCP to a Service would pass around ztunnel.
const SERVICE_ADDRESS_DEVICES: [&str; 2] = ["kube-ipvs0", "nodelocaldns"];

/// The node's own addresses, sorted, from every `(ifindex, address)` of its netns.
fn node_ips(addresses: Vec<(u32, IpAddr)>, links: &HashMap<u32, Link>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = addresses
        .into_iter()
        .filter(|(index, _)| {
            links
                .get(index)
                .is_none_or(|l| !SERVICE_ADDRESS_DEVICES.contains(&l.name.as_str()))
        })
        .map(|(_, ip)| ip)
        .filter(is_node_ip)
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

fn is_node_ip(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The main routing table and the links, dumped once per reconcile.
struct NodeView {
    routes: MainRoutes,
    links: HashMap<u32, Link>,
}

/// Unicast routes of the main table by prefix length, longest first, for longest-prefix
/// matches without a netlink round trip per address.
struct MainRoutes(Vec<(u8, bool, HashMap<u128, u32>)>);

const MAIN_TABLE: u32 = 254;

fn masked(ip: IpAddr, len: u8) -> (bool, u128) {
    match ip {
        IpAddr::V4(v4) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len as u32)
            };
            (false, u128::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len as u32)
            };
            (true, u128::from(v6) & mask)
        }
    }
}

impl MainRoutes {
    fn load(nl: &Netlink) -> Result<Self> {
        let mut routes = nl.routes(MAIN_TABLE, false)?;
        routes.extend(nl.routes(MAIN_TABLE, true)?);
        Ok(Self::from_routes(&routes))
    }

    fn from_routes(routes: &[crate::nl::Route]) -> Self {
        let mut by_len: BTreeMap<(u8, bool), HashMap<u128, u32>> = BTreeMap::new();
        for r in routes {
            if let (RouteKind::Unicast, Some(oif)) = (r.kind, r.oif) {
                let (is_v6, key) = masked(r.dst, r.prefix);
                by_len
                    .entry((r.prefix, is_v6))
                    .or_default()
                    .insert(key, oif);
            }
        }
        MainRoutes(
            by_len
                .into_iter()
                .rev()
                .map(|((len, v6), m)| (len, v6, m))
                .collect(),
        )
    }

    fn oif(&self, ip: IpAddr) -> Option<u32> {
        self.0
            .iter()
            .filter(|(_, v6, _)| *v6 == ip.is_ipv6())
            .find_map(|(len, _, m)| m.get(&masked(ip, *len).1).copied())
    }
}

fn resolve_pod(
    nl: &Netlink,
    view: &NodeView,
    id: &PodId,
    ips: &[IpAddr],
    ztunnel_veth: Option<u32>,
) -> Result<PodFacts> {
    let mut veth: Option<Link> = None;
    for &ip in ips {
        // A veth from the main table is the ptp answer; anything else (policy routing, a
        // covering default route) is asked of the kernel, as `ip route get` would.
        let from_main = view
            .routes
            .oif(ip)
            .filter(|i| view.links.get(i).is_some_and(|l| l.is_veth));
        let index = match from_main {
            Some(i) => i,
            None => nl.route_oif(ip)?.ok_or(Error::PodRoute {
                pod: id.to_string(),
                ip,
            })?,
        };
        let link = match view.links.get(&index) {
            Some(l) => l.clone(),
            None => nl.link_by_index(index)?,
        };
        if !link.is_veth || Some(link.index) == ztunnel_veth {
            return Err(Error::PodNotVeth {
                pod: id.to_string(),
                ip,
                interface: link.name,
            });
        }
        match &veth {
            Some(first) if first.index != link.index => {
                return Err(Error::PodSplitRoute {
                    pod: id.to_string(),
                    first: first.name.clone(),
                    second: link.name,
                });
            }
            _ => veth = Some(link),
        }
    }
    Ok(PodFacts {
        ips: ips.to_vec(),
        veth: veth.expect("a pod has at least one address"),
    })
}

fn resolve_ztunnel(nl: &Netlink, z: &ZtunnelSpec) -> Result<ZtunnelFacts> {
    let first = z.ips[0];
    let index = nl.route_oif(first)?.ok_or(Error::PodRoute {
        pod: z.pod.to_string(),
        ip: first,
    })?;
    let host_veth = nl.link_by_index(index)?;
    let ns = match &z.netns {
        Some(path) => path.clone(),
        None => netns::holding(first).ok_or_else(|| Error::ZtunnelNetnsNotFound {
            pod: z.pod.to_string(),
            ip: first,
        })?,
    };
    let eth0 = netns::run_in(&ns, || ztunnel_eth0(z, &ns))??;
    let missing_listeners = crate::ztunnel::missing(&crate::ztunnel::listening(&ns)?);
    Ok(ZtunnelFacts {
        missing_listeners,
        pod: z.pod.clone(),
        ips: z.ips.clone(),
        netns_inode: netns::inode(&ns)?,
        netns: ns,
        host_veth,
        eth0,
    })
}

/// Runs inside ztunnel's netns.
fn ztunnel_eth0(z: &ZtunnelSpec, ns: &Path) -> Result<Link> {
    let nl = Netlink::new()?;
    let first = z.ips[0];
    let index = nl
        .addresses()?
        .into_iter()
        .find(|(_, ip)| *ip == first)
        .map(|(i, _)| i)
        .ok_or_else(|| Error::ZtunnelAddress {
            pod: z.pod.to_string(),
            ip: first,
            netns: ns.into(),
        })?;
    nl.link_by_index(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nl::Route;

    fn route(dst: &str, prefix: u8, oif: u32) -> Route {
        let mut r = Route::to(MAIN_TABLE, dst.parse().unwrap(), prefix);
        r.oif = Some(oif);
        r
    }

    #[test]
    fn service_addresses_are_not_the_nodes() {
        let link = |index, name: &str| {
            let l = Link {
                name: name.into(),
                index,
                mac: [0; 6],
                is_veth: false,
                peer_netns_id: None,
                peer_index: None,
            };
            (index, l)
        };
        let links = HashMap::from([
            link(1, "lo"),
            link(2, "eth0"),
            link(3, "kube-ipvs0"),
            link(4, "nodelocaldns"),
        ]);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let addresses = vec![
            (1, ip("127.0.0.1")),
            (2, ip("10.0.0.5")),
            (2, ip("fe80::1")),
            (2, ip("fd00::5")),
            (3, ip("10.96.0.1")),
            (3, ip("10.96.0.10")),
            (4, ip("169.254.20.10")),
            (2, ip("10.0.0.5")),
        ];
        assert_eq!(
            node_ips(addresses, &links),
            vec![ip("10.0.0.5"), ip("fd00::5")]
        );
    }

    #[test]
    fn longest_prefix_wins_per_family() {
        let mut blackhole = route("10.244.2.99", 32, 9);
        blackhole.kind = RouteKind::Blackhole;
        let routes = MainRoutes::from_routes(&[
            route("0.0.0.0", 0, 1),
            route("10.244.0.0", 16, 2),
            route("10.244.2.3", 32, 3),
            route("fd00:10:244:2::", 64, 4),
            route("fd00:10:244:2::3", 128, 5),
            blackhole,
        ]);
        let cases = [
            ("10.244.2.3", Some(3)),
            ("10.244.2.4", Some(2)),
            ("10.9.9.9", Some(1)),
            ("10.244.2.99", Some(2)),
            ("fd00:10:244:2::3", Some(5)),
            ("fd00:10:244:2::7", Some(4)),
            ("fd00:10:244:3::7", None),
        ];
        for (ip, want) in cases {
            assert_eq!(routes.oif(ip.parse().unwrap()), want, "{ip}");
        }
    }
}
