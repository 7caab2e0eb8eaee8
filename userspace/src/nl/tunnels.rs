//! The fallback's UDP tunnels between the node and ztunnel's netns (`istioin`/`istioout` and
//! `pistioin`/`pistioout`): geneve as the article documents, or vxlan with the same VNIs and
//! addresses where the kernel has no geneve.
use std::{fmt, net::Ipv4Addr};

use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags},
    link::{InfoData, InfoGeneve, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
};
use rtnetlink::{LinkGeneve, LinkUnspec, LinkVxlan};

use super::{Netlink, nl_err};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    Geneve,
    Vxlan,
}

impl fmt::Display for TunnelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TunnelKind::Geneve => "geneve",
            TunnelKind::Vxlan => "vxlan",
        })
    }
}

/// `ip link add <name> type <kind> id <vni> remote <remote> dstport <port> [dev <dev>]` with
/// `<address>/30` on it, up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    pub name: String,
    pub kind: TunnelKind,
    pub vni: u32,
    pub remote: Ipv4Addr,
    pub port: u16,
    /// The underlay interface (vxlan only; geneve routes its packets like any UDP).
    pub dev: Option<u32>,
    pub address: Ipv4Addr,
    /// Its IPv6 address (/64), when it carries IPv6 too.
    pub address6: Option<std::net::Ipv6Addr>,
    /// Whether the address carries a broadcast (`brd`): the article's node side does, the
    /// ztunnel side does not.
    pub broadcast: bool,
}

/// kind, VNI, remote, port, underlay device.
type TunnelParameters = (TunnelKind, u32, Option<Ipv4Addr>, u16, Option<u32>);

/// The tunnel parameters an existing link has, to compare with the wanted ones.
fn parameters(m: &LinkMessage) -> Option<TunnelParameters> {
    let infos = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(d) => Some(d),
        _ => None,
    })?;
    match data {
        InfoData::Vxlan(v) => {
            let (mut id, mut remote, mut port, mut dev) = (0, None, 0, None);
            for i in v {
                match i {
                    InfoVxlan::Id(x) => id = *x,
                    InfoVxlan::Group(g) => remote = Some(*g),
                    InfoVxlan::Port(p) => port = *p,
                    InfoVxlan::Link(l) => dev = Some(*l),
                    _ => {}
                }
            }
            Some((TunnelKind::Vxlan, id, remote, port, dev))
        }
        InfoData::Geneve(g) => {
            let (mut id, mut remote, mut port) = (0, None, 0);
            for i in g {
                match i {
                    InfoGeneve::Id(x) => id = *x,
                    InfoGeneve::Remote(r) => remote = Some(*r),
                    InfoGeneve::Port(p) => port = *p,
                    _ => {}
                }
            }
            Some((TunnelKind::Geneve, id, remote, port, None))
        }
        _ => None,
    }
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

impl Tunnel {
    fn message(&self) -> LinkMessage {
        match self.kind {
            TunnelKind::Geneve => LinkGeneve::new(&self.name, self.vni)
                .remote(self.remote)
                .port(self.port)
                .udp_csum(false)
                .udp_zero_csum6_rx(true)
                .build(),
            TunnelKind::Vxlan => {
                let mut b = LinkVxlan::new(&self.name, self.vni)
                    .remote(self.remote)
                    .port(self.port)
                    .udp_csum(false)
                    .udp_zero_csum6_rx(true);
                if let Some(dev) = self.dev {
                    b = b.dev(dev);
                }
                b.build()
            }
        }
    }
}

impl Netlink {
    fn link_message(&self, name: &str) -> Result<Option<LinkMessage>> {
        Ok(self
            .link_messages()?
            .into_iter()
            .find(|m| link_name(m) == Some(name)))
    }

    /// Index of the link called `name`, if there is one.
    pub fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link_message(name)?.map(|m| m.header.index))
    }

    /// Deletes the link called `name`; true if there was one.
    pub fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(m) = self.link_message(name)? else {
            return Ok(false);
        };
        self.rt
            .block_on(self.handle.link().del(m.header.index).execute())
            .map_err(nl_err(format!("deleting link {name}")))?;
        Ok(true)
    }

    /// Makes `t` exist as specified, up, with its address; a link of that name with other
    /// parameters is replaced. Returns its index.
    pub fn ensure_tunnel(&self, t: &Tunnel) -> Result<u32> {
        let what = format!("{} tunnel {}", t.kind, t.name);
        let existing = self.link_message(&t.name)?;
        let matches = existing.as_ref().and_then(parameters)
            == Some((t.kind, t.vni, Some(t.remote), t.port, t.dev));
        let index = match existing {
            Some(m) if matches => m.header.index,
            other => {
                if let Some(m) = other {
                    log::warn!(
                        "replacing {what}: it has other parameters {:?}",
                        parameters(&m)
                    );
                    self.rt
                        .block_on(self.handle.link().del(m.header.index).execute())
                        .map_err(nl_err(format!("replacing {what}")))?;
                }
                self.rt
                    .block_on(self.handle.link().add(t.message()).execute())
                    .map_err(nl_err(what.clone()))?;
                self.link_index(&t.name)?
                    .ok_or_else(|| Error::NetlinkNotFound { what: what.clone() })?
            }
        };
        self.ensure_address(index, t.address.into(), 30, t.broadcast, &what)?;
        if let Some(a6) = t.address6 {
            self.ensure_address(index, a6.into(), 64, false, &what)?;
            without_link_local_dad(&t.name)?;
        }
        self.rt
            .block_on(
                self.handle
                    .link()
                    .change(LinkUnspec::new_with_index(index).up().build())
                    .execute(),
            )
            .map_err(nl_err(format!("setting {what} up")))?;
        Ok(index)
    }

    fn ensure_address(
        &self,
        index: u32,
        ip: std::net::IpAddr,
        prefix: u8,
        broadcast: bool,
        what: &str,
    ) -> Result<()> {
        let present = self
            .addresses()?
            .into_iter()
            .any(|(i, a)| i == index && a == ip);
        if present {
            return Ok(());
        }
        let mut req = self.handle.address().add(index, ip, prefix);
        if !broadcast {
            req.message_mut()
                .attributes
                .retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
        }
        if ip.is_ipv6() {
            // Usable at once: routes name it as their gateway's peer, and a tentative address
            // (duplicate address detection, a second or more) cannot be a source.
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.rt
            .block_on(req.execute())
            .map_err(nl_err(format!("address {ip}/{prefix} on {what}")))
    }

    /// Sets `lo` up with `ip` as an address of its own (a fresh netns's lo is down and holds
    /// only loopback addresses).
    pub fn loopback_up_with(&self, ip: std::net::IpAddr) -> Result<()> {
        let lo = zdivert_common::LOOPBACK_IFINDEX;
        self.rt
            .block_on(
                self.handle
                    .link()
                    .change(LinkUnspec::new_with_index(lo).up().build())
                    .execute(),
            )
            .map_err(nl_err("setting lo up"))?;
        let prefix = if ip.is_ipv6() { 128 } else { 32 };
        self.ensure_address(lo, ip, prefix, false, "lo")
    }

    /// Whether this kernel can create a geneve device (`CONFIG_GENEVE`), found by creating
    /// and deleting one.
    pub fn geneve_supported(&self) -> bool {
        let name = format!("zdgnv{}", std::process::id() % 100_000);
        let msg = LinkGeneve::new(&name, 4242)
            .remote(Ipv4Addr::new(192, 0, 2, 1))
            .build();
        let created = self
            .rt
            .block_on(self.handle.link().add(msg).execute())
            .is_ok();
        if created {
            let _ = self.delete_link(&name);
        }
        created
    }
}

/// Neighbour discovery for a forwarded packet solicits from the link's link-local address,
/// and sends nothing while that is tentative: without this, the first IPv6 packets through a
/// new tunnel wait one to two seconds for duplicate address detection that a point-to-point
/// tunnel of ours has no use for. Set before the link goes up; the setting goes with the link.
fn without_link_local_dad(link: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{link}/accept_dad");
    std::fs::write(&path, "0").map_err(|source| Error::Sysctl { path, source })
}
