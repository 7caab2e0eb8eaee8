//! The article's layout (`docs/layout.md`) as data, computed purely from a few node facts:
//! iptables rules in the form `iptables-save` prints them, policy rules, routes, tunnels and
//! sysctls, for the node and for ztunnel's netns. Everything the dataplane installs comes from
//! here, so the golden tests and the kernel see the same lines.
mod netfilter;
mod routing;
mod sysctls;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use self::{netfilter::*, routing::*, sysctls::*};
use crate::nl::TunnelKind;

pub use zdivert_common::{MARK_OUTBOUND, MARK_SKIP};
pub const MARK_CONN_SPOOFED: u32 = 0x210;
pub const MARK_CONN_SKIP: u32 = 0x220;
pub const MARK_SPOOFED_REPLY: u32 = 0x40;
/// Beyond the article: a same-node HBONE connection (ztunnel to ztunnel through istioin),
/// kept in conntrack so the node's ICMP errors about it go back to ztunnel.
pub const MARK_CONN_HBONE_LOOP: u32 = 0x800;

/// In ztunnel's netns: ztunnel's own segments towards the node, routed back into its netns
/// (the article's 0x4d3; `ztunnel_rules`, `ztunnel_policy_rules`).
pub const MARK_ZTUNNEL_LOCAL: u32 = 0x4d3;

pub const TABLE_INBOUND: u32 = 100;
pub const TABLE_OUTBOUND: u32 = 101;
pub const TABLE_SPOOFED_REPLY: u32 = 102;

pub const INBOUND_VNI: u32 = 1000;
pub const OUTBOUND_VNI: u32 = 1001;
pub const DEFAULT_TUNNEL_PORT: u16 = 6081;

pub const NODE_INBOUND: &str = "istioin";
pub const NODE_OUTBOUND: &str = "istioout";
pub const ZTUNNEL_INBOUND: &str = "pistioin";
pub const ZTUNNEL_OUTBOUND: &str = "pistioout";

/// Tunnel addresses: `.1` on the node, `.2` in ztunnel's netns.
pub const INBOUND_NET: [u8; 3] = [192, 168, 126];
pub const OUTBOUND_NET: [u8; 3] = [192, 168, 127];

pub fn tunnel_addr(net: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(net[0], net[1], net[2], host)
}

/// Beyond the article, IPv6: the same tunnels carry it, addressed `fd00:192:168:126::1/64`
/// and so on, the IPv4 networks spelled in IPv6 (as the lab spells its pods' addresses).
pub fn tunnel_addr6(net: [u8; 3], host: u8) -> Ipv6Addr {
    let spelled = |n: u8| u16::from_str_radix(&n.to_string(), 16).expect("decimal digits");
    Ipv6Addr::new(
        0xfd00,
        spelled(net[0]),
        spelled(net[1]),
        spelled(net[2]),
        0,
        0,
        0,
        u16::from(host),
    )
}

/// A tunnel address in the family of `like`.
pub fn tunnel_addr_like(like: IpAddr, net: [u8; 3], host: u8) -> IpAddr {
    match like {
        IpAddr::V4(_) => tunnel_addr(net, host).into(),
        IpAddr::V6(_) => tunnel_addr6(net, host).into(),
    }
}

/// The node facts the layout is made from, for one address family: the article's layout is
/// IPv4; the fallback applies it to IPv6 as well (ip6tables, `ip -6` rules and routes, the
/// same tunnels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// The node's address towards its pods, their gateway (HOST_IP).
    pub host_ip: IpAddr,
    pub tunnel: TunnelKind,
    pub tunnel_port: u16,
    /// Ambient pods' DNS is DNATed to ztunnel's DNS proxy.
    pub dns_capture: bool,
    /// Without a ztunnel the layout fails closed: captured traffic is dropped.
    pub ztunnel: Option<Ztunnel>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ztunnel {
    /// ztunnel's pod IP (ZIP), in the family of `Params::host_ip`.
    pub ip: IpAddr,
    /// ztunnel's host-side veth (ZVETH) and its index.
    pub veth: String,
    pub veth_index: u32,
    /// ztunnel's interface inside its netns (eth0) and its index there.
    pub eth0: String,
    pub eth0_index: u32,
}

impl Params {
    pub fn v6(&self) -> bool {
        self.host_ip.is_ipv6()
    }
}

/// `/32` or `/128`: one address of `ip`'s family.
pub fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv6() { 128 } else { 32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn article() -> Params {
        Params {
            host_ip: Ipv4Addr::new(10, 244, 2, 1).into(),
            tunnel: TunnelKind::Geneve,
            tunnel_port: 6081,
            dns_capture: false,
            ztunnel: Some(Ztunnel {
                ip: Ipv4Addr::new(10, 244, 2, 10).into(),
                veth: "veth6cc9a213".into(),
                veth_index: 7,
                eth0: "eth0".into(),
                eth0_index: 2,
            }),
        }
    }

    #[test]
    fn node_chains_hold_the_articles_lines() {
        let all: Vec<String> = node_chains(&article())
            .into_iter()
            .flat_map(|c| c.rules)
            .collect();
        for line in [
            "-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100",
            "-A ztunnel-PREROUTING -m mark --mark 0x100/0x100 -j ACCEPT",
            "-A ztunnel-PREROUTING ! -s 10.244.2.10/32 -i veth6cc9a213 -j MARK --set-xmark 0x210/0x210",
            "-A ztunnel-PREROUTING -p udp -m udp --dport 6081 -j RETURN",
            "-A ztunnel-FORWARD -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220",
            "-A ztunnel-OUTPUT -s 10.244.2.1/32 -j MARK --set-xmark 0x220/0xffffffff",
        ] {
            assert!(all.iter().any(|l| l == line), "missing: {line}");
        }
        // The capture mark comes last: every exemption is decided before it.
        let pre = &node_chains(&article())[0].rules;
        assert!(pre.last().unwrap().contains("--match-set ztunnel-pods-ips"));
    }

    #[test]
    fn ztunnel_rules_put_hbone_before_the_plain_inbound_catch_all() {
        let r = ztunnel_rules(article().ztunnel.as_ref().unwrap());
        assert_eq!(
            r[0],
            "-A PREROUTING -i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff"
        );
        assert_eq!(
            r[2],
            "-A PREROUTING -i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff"
        );
        assert_eq!(
            r[3],
            "-A PREROUTING ! -d 10.244.2.10/32 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff"
        );
    }

    #[test]
    fn tunnels_use_the_articles_vnis_addresses_and_remotes() {
        let p = article();
        let z = p.ztunnel.clone().unwrap();
        let node = tunnels(&p, &z, true, false);
        assert_eq!(
            (
                node[0].name.as_str(),
                node[0].vni,
                IpAddr::from(node[0].remote)
            ),
            ("istioin", 1000, z.ip)
        );
        assert_eq!(node[0].address6, None);
        assert_eq!(node[1].address, Ipv4Addr::new(192, 168, 127, 1));
        assert_eq!(node[0].dev, None, "geneve has no underlay device");
        let zt = tunnels(
            &Params {
                tunnel: TunnelKind::Vxlan,
                ..p.clone()
            },
            &z,
            false,
            true,
        );
        assert_eq!(
            (zt[1].name.as_str(), IpAddr::from(zt[1].remote), zt[1].dev),
            ("pistioout", p.host_ip, Some(2))
        );
        assert_eq!(
            zt[1].address6,
            Some("fd00:192:168:127::2".parse().unwrap()),
            "IPv6 over the same tunnels, the IPv4 networks spelled in IPv6"
        );
        assert!(!zt[1].broadcast);
    }

    #[test]
    fn dns_capture_dnats_dns_to_ztunnel_before_kube_proxy_and_only_with_a_ztunnel() {
        let dns = |p: &Params| -> Vec<String> {
            let nat = node_chains(p)
                .into_iter()
                .find(|c| c.table == "nat")
                .unwrap();
            nat.rules
                .into_iter()
                .filter(|r| r.contains("DNAT"))
                .collect()
        };
        assert!(dns(&article()).is_empty());
        let on = Params {
            dns_capture: true,
            ..article()
        };
        assert_eq!(
            dns(&on),
            [
                "-A ztunnel-PREROUTING -p udp -m set --match-set ztunnel-pods-ips src -m udp --dport 53 -j DNAT --to-destination 10.244.2.10:15053",
                "-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -m tcp --dport 53 -j DNAT --to-destination 10.244.2.10:15053",
            ]
        );
        let nat = node_chains(&on)
            .into_iter()
            .find(|c| c.table == "nat")
            .unwrap();
        assert!(
            nat.rules.last().unwrap().ends_with("-j ACCEPT"),
            "DNAT first"
        );
        let without_ztunnel = Params {
            ztunnel: None,
            ..on
        };
        assert!(dns(&without_ztunnel).is_empty());
    }

    #[test]
    fn without_ztunnel_the_exemptions_for_its_veth_go_and_capture_stays() {
        let p = Params {
            ztunnel: None,
            ..article()
        };
        let pre = &node_chains(&p)[0].rules;
        assert!(pre.iter().all(|l| !l.contains("veth6cc9a213")));
        assert!(pre.last().unwrap().contains("--match-set ztunnel-pods-ips"));
        assert!(node_sysctls(&p, std::iter::empty()).len() == 2);
    }

    #[test]
    fn closed_tables_drop_instead_of_falling_through() {
        let t = node_routes_closed(
            Ipv4Addr::UNSPECIFIED.into(),
            &[Ipv4Addr::new(10, 244, 2, 3).into()],
        );
        assert!(
            t.iter()
                .take(2)
                .all(|(_, rs)| rs.iter().all(|r| r.kind == crate::nl::RouteKind::Blackhole))
        );
        assert_eq!(t[1].1[0].prefix, 0);
    }

    fn article6() -> Params {
        let mut p = article();
        p.host_ip = "fd00:10:244:2::1".parse().unwrap();
        p.ztunnel.as_mut().unwrap().ip = "fd00:10:244:2::10".parse().unwrap();
        p
    }

    #[test]
    fn the_ipv6_layout_is_the_ipv4_one_in_ip6tables_spelling() {
        let (v4, v6) = (node_chains(&article()), node_chains(&article6()));
        assert_eq!(v4.len(), v6.len());
        let all: Vec<String> = v6.into_iter().flat_map(|c| c.rules).collect();
        for line in [
            "-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips6 src -j MARK --set-xmark 0x100/0x100",
            "-A ztunnel-PREROUTING ! -s fd00:10:244:2::10/128 -i veth6cc9a213 -j MARK --set-xmark 0x210/0x210",
            "-A ztunnel-PREROUTING -p ipv6-icmp -j MARK --set-xmark 0x220/0x220",
            "-A ztunnel-OUTPUT -s fd00:10:244:2::1/128 -j MARK --set-xmark 0x220/0xffffffff",
        ] {
            assert!(all.iter().any(|l| l == line), "missing: {line}\n{all:#?}");
        }
        assert!(all.iter().all(|l| !l.contains("ztunnel-pods-ips ")));
        let z = ztunnel_rules(article6().ztunnel.as_ref().unwrap());
        assert_eq!(
            z[0],
            "-A PREROUTING -i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip ::1 --tproxy-mark 0x400/0xfff"
        );
        assert_eq!(
            z[4],
            "-A PREROUTING ! -d fd00:10:244:2::10/128 -i eth0 -p ipv6-icmp -j MARK --set-xmark 0x4d3/0xfff"
        );
    }

    #[test]
    fn ipv6_routes_go_through_the_tunnels_ipv6_addresses() {
        let p = article6();
        let z = p.ztunnel.clone().unwrap();
        let t = TunnelIndexes {
            inbound: 20,
            outbound: 21,
        };
        let pod: IpAddr = "fd00:10:244:2::3".parse().unwrap();
        let tables = node_routes(&p, &z, t, &[pod]);
        let inbound = &tables[0].1[0];
        assert_eq!((inbound.dst, inbound.prefix), (pod, 128));
        assert_eq!(
            inbound.gateway,
            Some("fd00:192:168:126::2".parse().unwrap())
        );
        assert_eq!(tables[1].1[0].dst, IpAddr::from(Ipv6Addr::UNSPECIFIED));
        let zt = ztunnel_routes(&p, &z, t, 1);
        assert_eq!(zt[0].1[0].dst, IpAddr::from(Ipv6Addr::UNSPECIFIED));
        assert_eq!(
            zt[1].1[0].gateway,
            Some("fd00:192:168:127::1".parse().unwrap())
        );
        // No ztunnel address of the family: its captured traffic is blackholed.
        let closed = node_routes_closed(Ipv6Addr::UNSPECIFIED.into(), &[pod]);
        assert_eq!(closed[0].1[0].kind, crate::nl::RouteKind::Blackhole);
    }

    #[test]
    fn without_ipv6_to_capture_ambient_pods_ipv6_tcp_is_dropped() {
        let closed = node_chains6_closed();
        assert_eq!(
            closed.iter().map(|c| (c.table, c.name)).collect::<Vec<_>>(),
            node_chains(&article6())
                .iter()
                .map(|c| (c.table, c.name))
                .collect::<Vec<_>>(),
            "the same chains, so switching is one sync"
        );
        assert!(closed[0].rules.iter().all(|r| r.ends_with("-j DROP")));
        assert!(closed[1..].iter().all(|c| c.rules.is_empty()));
    }
}
