//! The netlink queries and changes the agent needs, synchronous: each `Netlink` owns a private
//! single-threaded runtime and a socket bound to the netns it was created in.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteScope, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::error::{Error, Result};

/// An interface: what the programs and maps need to know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub is_veth: bool,
    /// For an interface whose peer is in another netns (a veth's): that netns, as this one
    /// numbers it.
    pub peer_netns_id: Option<i32>,
    /// For a veth: its peer's index, in the peer's netns.
    pub peer_index: Option<u32>,
}

/// The fallback's skip mark (0x200): see `route_get`.
const ROUTE_LOOKUP_MARK: u32 = zdivert_common::MARK_SKIP;

pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

mod routes;
mod rules;
mod tc;
mod tunnels;

pub use routes::{Route, RouteKind};
pub use rules::{PolicyRule, RuleTarget};
pub use tc::TcFilter;
pub use tunnels::{Tunnel, TunnelKind};

pub(crate) fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

impl Netlink {
    /// Opens a netlink connection in the calling thread's current netns.
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|source| Error::NetlinkIo {
                what: "runtime".into(),
                source,
            })?;
        let handle = rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|source| Error::NetlinkIo {
                    what: "socket".into(),
                    source,
                })?;
            tokio::spawn(conn);
            Ok::<_, Error>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    pub fn link_by_index(&self, index: u32) -> Result<Link> {
        let what = format!("link {index}");
        let msg = self.rt.block_on(async {
            self.handle
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next()
                .await
        });
        match msg.map_err(nl_err(what.clone()))? {
            Some(m) => Ok(to_link(&m)),
            None => Err(Error::NetlinkNotFound { what }),
        }
    }

    pub fn links(&self) -> Result<Vec<Link>> {
        Ok(self.link_messages()?.iter().map(to_link).collect())
    }

    pub(super) fn link_messages(&self) -> Result<Vec<LinkMessage>> {
        self.rt
            .block_on(async {
                self.handle
                    .link()
                    .get()
                    .execute()
                    .try_collect::<Vec<_>>()
                    .await
            })
            .map_err(nl_err("link dump"))
    }

    /// Creates a veth pair `name`/`<name>p` (for probes: every kernel that runs pods has veth,
    /// not every one has dummy), up; returns the index of `name`. Deleting it deletes both.
    pub fn add_scratch_veth(&self, name: &str) -> Result<u32> {
        let msg = rtnetlink::LinkVeth::new(name, &format!("{name}p"))
            .up()
            .build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(nl_err(format!("adding veth {name}")))?;
        self.link_index(name)?
            .ok_or_else(|| Error::NetlinkNotFound {
                what: format!("veth {name}"),
            })
    }

    /// Every address configured on any interface, with the interface's index.
    pub fn addresses(&self) -> Result<Vec<(u32, IpAddr)>> {
        let msgs = self
            .rt
            .block_on(async {
                self.handle
                    .address()
                    .get()
                    .execute()
                    .try_collect::<Vec<_>>()
                    .await
            })
            .map_err(nl_err("address dump"))?;
        Ok(msgs
            .iter()
            .flat_map(|m| {
                m.attributes.iter().filter_map(move |a| match a {
                    AddressAttribute::Address(ip) => Some((m.header.index, *ip)),
                    _ => None,
                })
            })
            .collect())
    }

    /// The output interface of the route the kernel would use for `ip` (`ip route get`).
    pub fn route_oif(&self, ip: IpAddr) -> Result<Option<u32>> {
        Ok(self.route_get(ip)?.map(|(oif, _)| oif))
    }

    /// The source address the kernel would pick to reach `ip`.
    pub fn route_src(&self, ip: IpAddr) -> Result<Option<IpAddr>> {
        Ok(self.route_get(ip)?.and_then(|(_, src)| src))
    }

    /// `ip route get <ip> mark 0x200`: output interface and preferred source of a unicast
    /// route, as the node's own routing sees it. The mark is the fallback's skip mark (rule
    /// 100 sends it to the main table), so its capture rules never hide where a pod lives;
    /// without the fallback no rule matches it and the lookup is the plain one.
    fn route_get(&self, ip: IpAddr) -> Result<Option<(u32, Option<IpAddr>)>> {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, len)
            .map_err(|e| Error::RouteMessage {
                what: format!("route to {ip}"),
                source: Box::new(e),
            })?
            .mark(ROUTE_LOOKUP_MARK)
            .build();
        let res = self
            .rt
            .block_on(async { self.handle.route().get(msg).execute().try_next().await });
        match res {
            Ok(Some(route)) if route.header.kind == RouteType::Unicast => {
                let mut oif = None;
                let mut src = None;
                for a in &route.attributes {
                    match a {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::PrefSource(RouteAddress::Inet(v4)) => {
                            src = Some(IpAddr::V4(*v4))
                        }
                        RouteAttribute::PrefSource(RouteAddress::Inet6(v6)) => {
                            src = Some(IpAddr::V6(*v6))
                        }
                        _ => {}
                    }
                }
                Ok(oif.map(|o| (o, src)))
            }
            Ok(_) => Ok(None),
            // ENETUNREACH / EHOSTUNREACH: no route at all.
            Err(rtnetlink::Error::NetlinkError(_)) => Ok(None),
            Err(e) => Err(nl_err(format!("route to {ip}"))(e)),
        }
    }

    /// `ip route replace local 0.0.0.0/0 dev lo table <table>` (or `::/0` for v6).
    pub fn ensure_local_default(&self, table: u32, v6: bool) -> Result<()> {
        let msg = self.local_default(table, v6)?;
        self.rt
            .block_on(self.handle.route().add(msg).replace().execute())
            .map_err(nl_err(format!("local default route in table {table}")))
    }

    pub fn remove_local_default(&self, table: u32, v6: bool) -> Result<()> {
        let msg = self.local_default(table, v6)?;
        match self.rt.block_on(self.handle.route().del(msg).execute()) {
            Ok(()) | Err(rtnetlink::Error::NetlinkError(_)) => Ok(()),
            Err(e) => Err(nl_err(format!("local default route in table {table}"))(e)),
        }
    }

    fn local_default(
        &self,
        table: u32,
        v6: bool,
    ) -> Result<netlink_packet_route::route::RouteMessage> {
        let lo = self
            .links()?
            .into_iter()
            .find(|l| l.name == "lo")
            .ok_or_else(|| Error::NetlinkNotFound {
                what: "link lo".into(),
            })?;
        let any = if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(any, 0)
            .map_err(|e| Error::RouteMessage {
                what: "local route".into(),
                source: Box::new(e),
            })?
            .table_id(table)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(lo.index);
        b.get_mut().header.table = if table < 256 { table as u8 } else { 252 };
        Ok(b.build())
    }
}

pub(crate) fn to_link(m: &LinkMessage) -> Link {
    let mut link = Link {
        name: String::new(),
        index: m.header.index,
        mac: [0; 6],
        is_veth: false,
        peer_netns_id: None,
        peer_index: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::LinkNetNsId(id) => link.peer_netns_id = Some(*id),
            LinkAttribute::Link(index) => link.peer_index = Some(*index),
            LinkAttribute::Address(a) if a.len() == 6 => link.mac.copy_from_slice(a),
            LinkAttribute::LinkInfo(infos) => {
                link.is_veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
            }
            _ => {}
        }
    }
    link
}
