//! The article's layout (`../shared/LAYOUT.md`) as data, computed purely from a few node facts:
//! iptables rules in the form `iptables-save` prints them, policy rules, routes, tunnels and
//! sysctls, for the node and for ztunnel's netns. Everything the dataplane installs comes from
//! here, so the golden tests and the kernel see the same lines.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use crate::nl::{PolicyRule, Route, RuleTarget, TunnelKind};

pub const IPSET: &str = "ztunnel-pods-ips";
/// `<pod IP>,<its host veth>`: the only source each ambient pod's veth may carry.
pub const IPSET_SOURCES: &str = "ztunnel-pods-srcs";
/// `0.0.0.0/0,<host veth>`: the interfaces of ambient pods.
pub const IPSET_IFACES: &str = "ztunnel-pods-ifaces";

/// The IPv6 sets: the fallback cannot capture IPv6, so it fails closed with them.
pub const IPSET6: &str = "ztunnel-pods-ips6";
pub const IPSET6_SOURCES: &str = "ztunnel-pods-srcs6";
pub const IPSET6_IFACES: &str = "ztunnel-pods-ifaces6";

type IpSet = (&'static str, &'static str, BTreeSet<String>);

/// The fallback's sets: name, type, and members for the given pods (address, host veth).
pub fn ipsets(pods: &[(IpAddr, String)]) -> Vec<IpSet> {
    let v4: Vec<(Ipv4Addr, String)> = pods
        .iter()
        .filter_map(|(ip, veth)| match ip {
            IpAddr::V4(a) => Some((*a, veth.clone())),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<(&IpAddr, &String)> = pods
        .iter()
        .filter(|(ip, _)| ip.is_ipv6())
        .map(|(i, v)| (i, v))
        .collect();
    // Every ambient veth, for both families: a pod without IPv6 still must not send any.
    let veths: BTreeSet<&String> = pods.iter().map(|(_, v)| v).collect();
    let mut sets = ipsets_v4(&v4);
    sets.extend([
        (
            IPSET6,
            "hash:ip family inet6",
            v6.iter().map(|(ip, _)| ip.to_string()).collect(),
        ),
        (
            IPSET6_SOURCES,
            "hash:net,iface family inet6",
            v6.iter().map(|(ip, veth)| format!("{ip},{veth}")).collect(),
        ),
        (
            IPSET6_IFACES,
            "hash:net,iface family inet6",
            veths.iter().map(|veth| format!("::/0,{veth}")).collect(),
        ),
    ]);
    sets
}

fn ipsets_v4(pods: &[(Ipv4Addr, String)]) -> Vec<IpSet> {
    vec![
        (
            IPSET,
            "hash:ip family inet",
            pods.iter().map(|(ip, _)| ip.to_string()).collect(),
        ),
        (
            IPSET_SOURCES,
            "hash:net,iface family inet",
            pods.iter()
                .map(|(ip, veth)| format!("{ip},{veth}"))
                .collect(),
        ),
        (
            IPSET_IFACES,
            "hash:net,iface family inet",
            pods.iter()
                .map(|(_, veth)| format!("0.0.0.0/0,{veth}"))
                .collect(),
        ),
    ]
}

pub const MARK_OUTBOUND: u32 = 0x100;
pub const MARK_SKIP: u32 = 0x200;
pub const MARK_CONN_SPOOFED: u32 = 0x210;
pub const MARK_CONN_SKIP: u32 = 0x220;
pub const MARK_SPOOFED_REPLY: u32 = 0x40;

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

/// The node facts the layout is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// The node's address towards its pods, their gateway (HOST_IP).
    pub host_ip: Ipv4Addr,
    pub tunnel: TunnelKind,
    pub tunnel_port: u16,
    /// Without a ztunnel the layout fails closed: captured traffic is dropped.
    pub ztunnel: Option<Ztunnel>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ztunnel {
    /// ztunnel's pod IP (ZIP).
    pub ip: Ipv4Addr,
    /// ztunnel's host-side veth (ZVETH) and its index.
    pub veth: String,
    pub veth_index: u32,
    /// ztunnel's interface inside its netns (eth0) and its index there.
    pub eth0: String,
    pub eth0_index: u32,
}

/// A user chain we own and the built-in chain that jumps to it (inserted first, `-I`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub table: &'static str,
    pub name: &'static str,
    pub from: &'static str,
    /// Rules as `iptables-save` prints them, `-A <name> ...`.
    pub rules: Vec<String>,
}

fn mark(rule: &str, bits: u32) -> String {
    format!("{rule} -j MARK --set-xmark {bits:#x}/{bits:#x}")
}

fn has_mark(bits: u32) -> String {
    format!("-m mark --mark {bits:#x}/{bits:#x}")
}

fn save_mark(chain: &str) -> Vec<String> {
    [MARK_CONN_SKIP, MARK_CONN_SPOOFED]
        .iter()
        .map(|b| {
            format!(
                "-A {chain} {} -j CONNMARK --save-mark --nfmask {b:#x} --ctmask {b:#x}",
                has_mark(*b)
            )
        })
        .collect()
}

/// The node's chains: mangle marks the packets, nat keeps kube-proxy's DNAT off captured ones.
pub fn node_chains(p: &Params) -> Vec<Chain> {
    let c = "-A ztunnel-PREROUTING";
    let port = p.tunnel_port;
    let skip_return = format!("{c} {} -j RETURN", has_mark(MARK_SKIP));
    let mut prerouting = vec![
        // Beyond the article: an ambient pod's veth carries that pod's own source or nothing
        // (capture keys on the interface, so no pod can pass for another or around ztunnel).
        format!(
            "{c} -m set --match-set {IPSET_IFACES} src,src -m set ! --match-set {IPSET_SOURCES} src,src -j DROP"
        ),
        mark(&format!("{c} -i {NODE_INBOUND}"), MARK_SKIP),
        format!("{c} -i {NODE_INBOUND} -j RETURN"),
        mark(&format!("{c} -i {NODE_OUTBOUND}"), MARK_SKIP),
        format!("{c} -i {NODE_OUTBOUND} -j RETURN"),
        format!("{c} -p udp -m udp --dport {port} -j RETURN"),
        mark(
            &format!("{c} -m connmark --mark {MARK_CONN_SKIP:#x}/{MARK_CONN_SKIP:#x}"),
            MARK_SKIP,
        ),
        skip_return.clone(),
    ];
    // What comes from ztunnel's veth: its own traffic, or its spoofed connections to pods.
    if let Some(z) = &p.ztunnel {
        let (zip, zveth) = (z.ip, &z.veth);
        prerouting.extend([
            mark(
                &format!(
                    "{c} ! -i {zveth} -m connmark --mark {MARK_CONN_SPOOFED:#x}/{MARK_CONN_SPOOFED:#x}"
                ),
                MARK_SPOOFED_REPLY,
            ),
            format!("{c} {} -j RETURN", has_mark(MARK_SPOOFED_REPLY)),
            mark(&format!("{c} ! -s {zip}/32 -i {zveth}"), MARK_CONN_SPOOFED),
            skip_return.clone(),
            mark(&format!("{c} -i {zveth}"), MARK_CONN_SKIP),
        ]);
    }
    prerouting.extend([
        mark(&format!("{c} -p udp"), MARK_CONN_SKIP),
        // Beyond the article: ping to and from ambient pods is not captured (ztunnel's netns
        // would swallow it). ICMP errors of ztunnel's connections matched 0x210 above.
        mark(&format!("{c} -p icmp"), MARK_CONN_SKIP),
        skip_return,
        mark(
            &format!("{c} -p tcp -m set --match-set {IPSET} src"),
            MARK_OUTBOUND,
        ),
    ]);
    let accept = |chain: &str| vec![format!("-A {chain} {} -j ACCEPT", has_mark(MARK_OUTBOUND))];
    vec![
        Chain {
            table: "mangle",
            name: "ztunnel-PREROUTING",
            from: "PREROUTING",
            rules: prerouting,
        },
        Chain {
            table: "mangle",
            name: "ztunnel-FORWARD",
            from: "FORWARD",
            rules: save_mark("ztunnel-FORWARD"),
        },
        Chain {
            table: "mangle",
            name: "ztunnel-INPUT",
            from: "INPUT",
            rules: save_mark("ztunnel-INPUT"),
        },
        Chain {
            table: "mangle",
            name: "ztunnel-OUTPUT",
            from: "OUTPUT",
            // Host-originated traffic (kubelet probes) is never captured.
            rules: vec![format!(
                "-A ztunnel-OUTPUT -s {}/32 -j MARK --set-xmark {MARK_CONN_SKIP:#x}/0xffffffff",
                p.host_ip
            )],
        },
        Chain {
            table: "mangle",
            name: "ztunnel-POSTROUTING",
            from: "POSTROUTING",
            rules: vec![],
        },
        Chain {
            table: "nat",
            name: "ztunnel-PREROUTING",
            from: "PREROUTING",
            rules: accept("ztunnel-PREROUTING"),
        },
        Chain {
            table: "nat",
            name: "ztunnel-POSTROUTING",
            from: "POSTROUTING",
            rules: accept("ztunnel-POSTROUTING"),
        },
    ]
}

/// The node's IPv6 chain. The article's layout is IPv4 only, so ambient pods' IPv6 TCP is
/// dropped both ways rather than passed around ztunnel; forged IPv6 sources are dropped too.
/// Traffic with the node itself (probes and their replies) is exempt.
pub fn node_chains6() -> Vec<Chain> {
    let c = "-A ztunnel-PREROUTING";
    vec![Chain {
        table: "mangle",
        name: "ztunnel-PREROUTING",
        from: "PREROUTING",
        rules: vec![
            format!(
                "{c} -m set --match-set {IPSET6_IFACES} src,src -m set ! --match-set {IPSET6_SOURCES} src,src -j DROP"
            ),
            format!(
                "{c} -p tcp -m set --match-set {IPSET6_IFACES} src,src -m addrtype ! --dst-type LOCAL -j DROP"
            ),
            format!("{c} -p tcp -m set --match-set {IPSET6} dst -j DROP"),
        ],
    }]
}

/// The rules in ztunnel's netns, in the built-in mangle PREROUTING chain as the article shows
/// them (order matters: HBONE's 15008 before the catch-all 15006).
pub fn ztunnel_rules(z: &Ztunnel) -> Vec<String> {
    let tproxy = |iface: &str, extra: &str, port: u16| {
        format!(
            "-A PREROUTING -i {iface} -p tcp {extra}-j TPROXY --on-port {port} --on-ip 127.0.0.1 \
             --tproxy-mark 0x400/0xfff"
        )
    };
    vec![
        tproxy(ZTUNNEL_INBOUND, "-m tcp --dport 15008 ", 15008),
        tproxy(ZTUNNEL_OUTBOUND, "", 15001),
        tproxy(ZTUNNEL_INBOUND, "", 15006),
        format!(
            "-A PREROUTING ! -d {}/32 -i {} -p tcp -j MARK --set-xmark 0x4d3/0xfff",
            z.ip, z.eth0
        ),
    ]
}

pub fn node_rules() -> Vec<PolicyRule> {
    vec![
        PolicyRule::fwmark(100, MARK_SKIP, MARK_SKIP, RuleTarget::Goto(32766)),
        PolicyRule::fwmark(
            101,
            MARK_OUTBOUND,
            MARK_OUTBOUND,
            RuleTarget::Table(TABLE_OUTBOUND),
        ),
        PolicyRule::fwmark(
            102,
            MARK_SPOOFED_REPLY,
            MARK_SPOOFED_REPLY,
            RuleTarget::Table(TABLE_SPOOFED_REPLY),
        ),
        PolicyRule {
            priority: 103,
            fwmark: None,
            target: RuleTarget::Table(TABLE_INBOUND),
        },
    ]
}

pub fn ztunnel_policy_rules() -> Vec<PolicyRule> {
    vec![
        crate::dataplane::ebpf::TPROXY_RULE,
        PolicyRule::fwmark(20003, 0x4d3, 0xfff, RuleTarget::Table(100)),
    ]
}

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

fn link_route(table: u32, dst: Ipv4Addr, oif: u32) -> Route {
    let mut r = Route::to(table, v4(dst), 32);
    r.oif = Some(oif);
    r.scope_link = true;
    r
}

fn default_via(table: u32, gw: Ipv4Addr, oif: u32) -> Route {
    let mut r = Route::to(table, v4(Ipv4Addr::UNSPECIFIED), 0);
    r.gateway = Some(v4(gw));
    r.oif = Some(oif);
    r
}

/// Indexes of the node's tunnel devices, known once they exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelIndexes {
    pub inbound: u32,
    pub outbound: u32,
}

/// The node's tables 100/101/102. `pods` are the ambient pods' IPv4 addresses.
pub fn node_routes(
    p: &Params,
    z: &Ztunnel,
    t: TunnelIndexes,
    pods: &[Ipv4Addr],
) -> Vec<(u32, Vec<Route>)> {
    let zroute = |table| link_route(table, z.ip, z.veth_index);
    let mut inbound: Vec<Route> = pods
        .iter()
        .map(|ip| {
            let mut r = Route::to(TABLE_INBOUND, v4(*ip), 32);
            r.gateway = Some(v4(tunnel_addr(INBOUND_NET, 2)));
            r.oif = Some(t.inbound);
            r.prefsrc = Some(v4(p.host_ip));
            r
        })
        .collect();
    inbound.push(zroute(TABLE_INBOUND));
    let mut spoofed = default_via(TABLE_SPOOFED_REPLY, z.ip, z.veth_index);
    spoofed.onlink = true;
    vec![
        (TABLE_INBOUND, inbound),
        (
            TABLE_OUTBOUND,
            vec![
                default_via(TABLE_OUTBOUND, tunnel_addr(OUTBOUND_NET, 2), t.outbound),
                zroute(TABLE_OUTBOUND),
            ],
        ),
        (
            TABLE_SPOOFED_REPLY,
            vec![spoofed, zroute(TABLE_SPOOFED_REPLY)],
        ),
    ]
}

/// Without a ztunnel, the tables fail closed: ambient pods' captured traffic is dropped instead
/// of falling through to the main table, around ztunnel.
pub fn node_routes_closed(pods: &[Ipv4Addr]) -> Vec<(u32, Vec<Route>)> {
    let blackhole = |table, dst, prefix| {
        let mut r = Route::to(table, v4(dst), prefix);
        r.kind = crate::nl::RouteKind::Blackhole;
        r
    };
    vec![
        (
            TABLE_INBOUND,
            pods.iter()
                .map(|ip| blackhole(TABLE_INBOUND, *ip, 32))
                .collect(),
        ),
        (
            TABLE_OUTBOUND,
            vec![blackhole(TABLE_OUTBOUND, Ipv4Addr::UNSPECIFIED, 0)],
        ),
        (TABLE_SPOOFED_REPLY, vec![]),
    ]
}

/// ztunnel's tables: 100 delivers tproxied packets locally; 101/102 as the article lists them.
pub fn ztunnel_routes(
    p: &Params,
    z: &Ztunnel,
    t: TunnelIndexes,
    lo: u32,
) -> Vec<(u32, Vec<Route>)> {
    let mut local = Route::to(100, v4(Ipv4Addr::UNSPECIFIED), 0);
    local.kind = crate::nl::RouteKind::Local;
    local.oif = Some(lo);
    let host = |table| link_route(table, p.host_ip, z.eth0_index);
    vec![
        (100, vec![local]),
        (
            101,
            vec![
                default_via(101, tunnel_addr(OUTBOUND_NET, 1), t.outbound),
                host(101),
            ],
        ),
        (
            102,
            vec![
                default_via(102, tunnel_addr(INBOUND_NET, 1), t.inbound),
                host(102),
            ],
        ),
    ]
}

/// The tunnels on the node (`side_node`) or in ztunnel's netns.
pub fn tunnels(p: &Params, z: &Ztunnel, side_node: bool) -> Vec<crate::nl::Tunnel> {
    let (names, remote, host, dev) = if side_node {
        ([NODE_INBOUND, NODE_OUTBOUND], z.ip, 1, z.veth_index)
    } else {
        (
            [ZTUNNEL_INBOUND, ZTUNNEL_OUTBOUND],
            p.host_ip,
            2,
            z.eth0_index,
        )
    };
    [(INBOUND_VNI, INBOUND_NET), (OUTBOUND_VNI, OUTBOUND_NET)]
        .into_iter()
        .zip(names)
        .map(|((vni, net), name)| crate::nl::Tunnel {
            name: name.into(),
            kind: p.tunnel,
            vni,
            remote,
            port: p.tunnel_port,
            dev: (p.tunnel == TunnelKind::Vxlan).then_some(dev),
            address: tunnel_addr(net, host),
            broadcast: side_node,
        })
        .collect()
}

/// `net.ipv4.conf.<iface>.<key> = <value>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysctl {
    pub iface: String,
    pub key: &'static str,
    pub value: &'static str,
}

impl Sysctl {
    fn new(iface: &str, key: &'static str, value: &'static str) -> Self {
        Sysctl {
            iface: iface.into(),
            key,
            value,
        }
    }

    pub fn path(&self) -> String {
        format!("/proc/sys/net/ipv4/conf/{}/{}", self.iface, self.key)
    }
}

/// The node's sysctls. Interfaces we create ourselves are included; their original values need
/// no restoring since they go away with the link.
pub fn node_sysctls<'a>(p: &'a Params, pod_veths: impl Iterator<Item = &'a str>) -> Vec<Sysctl> {
    let zveth = p.ztunnel.as_ref().map(|z| z.veth.as_str());
    let tunnels = zveth.map(|_| [NODE_INBOUND, NODE_OUTBOUND]);
    let mut v: Vec<Sysctl> = ["all", "default"]
        .into_iter()
        .chain(zveth)
        .chain(tunnels.into_iter().flatten())
        .chain(pod_veths)
        .map(|i| Sysctl::new(i, "rp_filter", "0"))
        .collect();
    for i in zveth.into_iter().chain(tunnels.into_iter().flatten()) {
        v.push(Sysctl::new(i, "accept_local", "1"));
    }
    v
}

pub fn ztunnel_sysctls(z: &Ztunnel) -> Vec<Sysctl> {
    ["all", "default", &z.eth0, ZTUNNEL_INBOUND, ZTUNNEL_OUTBOUND]
        .into_iter()
        .map(|i| Sysctl::new(i, "rp_filter", "0"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn article() -> Params {
        Params {
            host_ip: Ipv4Addr::new(10, 244, 2, 1),
            tunnel: TunnelKind::Geneve,
            tunnel_port: 6081,
            ztunnel: Some(Ztunnel {
                ip: Ipv4Addr::new(10, 244, 2, 10),
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
        let node = tunnels(&p, &z, true);
        assert_eq!(
            (node[0].name.as_str(), node[0].vni, node[0].remote),
            ("istioin", 1000, z.ip)
        );
        assert_eq!(node[1].address, Ipv4Addr::new(192, 168, 127, 1));
        assert_eq!(node[0].dev, None, "geneve has no underlay device");
        let zt = tunnels(
            &Params {
                tunnel: TunnelKind::Vxlan,
                ..p.clone()
            },
            &z,
            false,
        );
        assert_eq!(
            (zt[1].name.as_str(), zt[1].remote, zt[1].dev),
            ("pistioout", p.host_ip, Some(2))
        );
        assert!(!zt[1].broadcast);
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
        let t = node_routes_closed(&[Ipv4Addr::new(10, 244, 2, 3)]);
        assert!(
            t.iter()
                .take(2)
                .all(|(_, rs)| rs.iter().all(|r| r.kind == crate::nl::RouteKind::Blackhole))
        );
        assert_eq!(t[1].1[0].prefix, 0);
    }
}
