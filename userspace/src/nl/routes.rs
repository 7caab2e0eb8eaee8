//! Routes in the policy-routing tables the fallback owns (100/101/102), kept exactly in sync:
//! a table is compared with what it should hold and only the difference is changed.
use std::net::IpAddr;

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use rtnetlink::RouteMessageBuilder;

use super::{Netlink, nl_err};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    Unicast,
    Local,
    Blackhole,
}

/// One route, as `ip route show table N` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub dst: IpAddr,
    pub prefix: u8,
    pub kind: RouteKind,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub prefsrc: Option<IpAddr>,
    /// `scope link` (a directly connected destination).
    pub scope_link: bool,
    /// `onlink`: the gateway is reachable on `oif` without a covering route.
    pub onlink: bool,
}

impl Route {
    /// A unicast route with nothing but a destination; the rest is set by the caller.
    pub fn to(table: u32, dst: IpAddr, prefix: u8) -> Self {
        Route {
            table,
            dst,
            prefix,
            kind: RouteKind::Unicast,
            gateway: None,
            oif: None,
            prefsrc: None,
            scope_link: false,
            onlink: false,
        }
    }

    fn describe(&self) -> String {
        format!("route {}/{} table {}", self.dst, self.prefix, self.table)
    }

    fn message(&self) -> Result<RouteMessage> {
        let what = self.describe();
        let invalid = |e| Error::RouteMessage {
            what: what.clone(),
            source: Box::new(e),
        };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(self.dst, self.prefix)
            .map_err(invalid)?
            .table_id(self.table)
            // `proto boot`, what `ip route add` uses: the route prints as the article shows it.
            .protocol(RouteProtocol::Boot)
            .kind(match self.kind {
                RouteKind::Unicast => RouteType::Unicast,
                RouteKind::Local => RouteType::Local,
                RouteKind::Blackhole => RouteType::BlackHole,
            })
            .scope(match (self.kind, self.scope_link) {
                (RouteKind::Local, _) => RouteScope::Host,
                (_, true) => RouteScope::Link,
                _ => RouteScope::Universe,
            });
        if let Some(gw) = self.gateway {
            b = b.gateway(gw).map_err(invalid)?;
        }
        if let Some(src) = self.prefsrc {
            b = b.pref_source(src).map_err(invalid)?;
        }
        if let Some(oif) = self.oif {
            b = b.output_interface(oif);
        }
        if self.onlink {
            b = b.onlink();
        }
        b.get_mut().header.table = if self.table < 256 {
            self.table as u8
        } else {
            252 // RT_TABLE_COMPAT: the real id is in the Table attribute
        };
        Ok(b.build())
    }
}

fn addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn from_message(m: &RouteMessage) -> Option<Route> {
    let kind = match m.header.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::Local => RouteKind::Local,
        RouteType::BlackHole => RouteKind::Blackhole,
        _ => return None,
    };
    let v6 = m.header.address_family == AddressFamily::Inet6;
    let mut r = Route::to(
        m.header.table as u32,
        if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        },
        m.header.destination_prefix_length,
    );
    r.kind = kind;
    r.scope_link = m.header.scope == RouteScope::Link;
    r.onlink = m.header.flags.contains(RouteFlags::Onlink);
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::Destination(d) => r.dst = addr(d)?,
            RouteAttribute::Gateway(g) => r.gateway = addr(g),
            RouteAttribute::PrefSource(s) => r.prefsrc = addr(s),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            _ => {}
        }
    }
    Some(r)
}

impl Netlink {
    /// Every route of one family in `table`.
    pub fn routes(&self, table: u32, v6: bool) -> Result<Vec<Route>> {
        let family = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let msgs = self
            .rt
            .block_on(async {
                self.handle
                    .route()
                    .get(family)
                    .execute()
                    .try_collect::<Vec<_>>()
                    .await
            })
            .map_err(nl_err(format!("route dump of table {table}")))?;
        Ok(msgs
            .iter()
            .filter_map(from_message)
            .filter(|r| r.table == table)
            .collect())
    }

    pub fn add_route(&self, route: &Route) -> Result<()> {
        let msg = route.message()?;
        self.rt
            .block_on(self.handle.route().add(msg).replace().execute())
            .map_err(nl_err(route.describe()))
    }

    /// Deletes `route`; one already gone is not an error.
    pub fn del_route(&self, route: &Route) -> Result<()> {
        let mut msg = route.message()?;
        // Match whoever installed it (a dumped route does not carry its protocol here).
        msg.header.protocol = RouteProtocol::Unspec;
        match self.rt.block_on(self.handle.route().del(msg).execute()) {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code().abs() == libc::ESRCH || e.raw_code().abs() == libc::ENOENT =>
            {
                Ok(())
            }
            Err(e) => Err(nl_err(format!("deleting {}", route.describe()))(e)),
        }
    }

    /// Makes `table` (one family) hold exactly `want`: adds what is missing, removes the rest,
    /// leaves matching routes untouched. Returns how many routes changed.
    pub fn sync_table(&self, table: u32, v6: bool, want: &[Route]) -> Result<usize> {
        let have = self.routes(table, v6)?;
        let mut changed = 0;
        // Removals first: a stale route may hold the destination a wanted one replaces.
        for r in have.iter().filter(|r| !want.contains(r)) {
            self.del_route(r)?;
            changed += 1;
        }
        for r in want.iter().filter(|r| !have.contains(r)) {
            self.add_route(r)?;
            changed += 1;
        }
        Ok(changed)
    }
}
