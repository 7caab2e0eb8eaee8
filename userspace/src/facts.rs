//! Node facts: where each pod of the desired state actually is on this node (its host veth, from
//! the route to its address, as in the article's ptp network) and where ztunnel is. A pod that
//! cannot be resolved is reported with its name and left out; it never blocks the others.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::{
    error::{Error, Result},
    netns,
    nl::{Link, Netlink},
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
}

pub fn resolve(nl: &Netlink, state: &NodeState) -> Result<NodeFacts> {
    let mut facts = NodeFacts {
        node_ips: nl
            .addresses()?
            .into_iter()
            .map(|(_, ip)| ip)
            .filter(is_node_ip)
            .collect(),
        ..NodeFacts::default()
    };
    facts.node_ips.sort();
    facts.node_ips.dedup();
    if let Some(z) = &state.ztunnel {
        match resolve_ztunnel(nl, z) {
            Ok(zf) => facts.ztunnel = Some(zf),
            Err(e) => facts.failures.push((z.pod.clone(), e)),
        }
    }
    let ztunnel_veth = facts.ztunnel.as_ref().map(|z| z.host_veth.index);
    for (id, pod) in &state.pods {
        match resolve_pod(nl, id, &pod.ips, ztunnel_veth) {
            Ok(pf) => {
                facts.pods.insert(id.clone(), pf);
            }
            Err(e) => facts.failures.push((id.clone(), e)),
        }
    }
    Ok(facts)
}

fn is_node_ip(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

fn resolve_pod(
    nl: &Netlink,
    id: &PodId,
    ips: &[IpAddr],
    ztunnel_veth: Option<u32>,
) -> Result<PodFacts> {
    let mut veth: Option<Link> = None;
    for &ip in ips {
        let index = nl.route_oif(ip)?.ok_or(Error::PodRoute {
            pod: id.to_string(),
            ip,
        })?;
        let link = nl.link_by_index(index)?;
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
    Ok(ZtunnelFacts {
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
