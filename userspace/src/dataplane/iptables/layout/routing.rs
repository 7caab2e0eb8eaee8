//! Policy rules, routes and tunnels of the layout, on the node and in ztunnel's netns.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;
use crate::nl::{PolicyRule, Route, RuleTarget};
use zdivert_common::{MARK_MASK, ZTUNNEL_TPROXY_TABLE};

/// The kernel's own first rule, `0: from all lookup local`.
pub const LOCAL_RULE_AT_0: PolicyRule = PolicyRule {
    priority: 0,
    fwmark: None,
    target: RuleTarget::Table(TABLE_LOCAL),
};
const TABLE_LOCAL: u32 = 255;

/// Beyond the article: ztunnel's connection in a NodePort client's name carries the address
/// the node masqueraded the client to, one of the node's own. The pod's answers (0x40) must go
/// to ztunnel before the local table would deliver them to the node, which has no such
/// connection. So the local rule moves from 0 to 99, after rule 98 for 0x40 (Cilium moves it
/// the same way for its proxy); cleanup puts it back at 0 first.
pub fn local_rule_move() -> [PolicyRule; 2] {
    [
        PolicyRule::fwmark(
            98,
            MARK_SPOOFED_REPLY,
            MARK_SPOOFED_REPLY,
            RuleTarget::Table(TABLE_SPOOFED_REPLY),
        ),
        PolicyRule {
            priority: 99,
            ..LOCAL_RULE_AT_0
        },
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
        PolicyRule::fwmark(
            20003,
            MARK_ZTUNNEL_LOCAL,
            MARK_MASK,
            RuleTarget::Table(ZTUNNEL_TPROXY_TABLE),
        ),
    ]
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

fn link_route(table: u32, dst: IpAddr, oif: u32) -> Route {
    let mut r = Route::to(table, dst, host_prefix(dst));
    r.oif = Some(oif);
    r.scope_link = true;
    r
}

fn default_via(table: u32, gw: IpAddr, oif: u32) -> Route {
    let mut r = Route::to(table, unspecified_like(gw), 0);
    r.gateway = Some(gw);
    r.oif = Some(oif);
    r
}

/// Indexes of the node's tunnel devices, known once they exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelIndexes {
    pub inbound: u32,
    pub outbound: u32,
}

/// The node's tables 100/101/102 for `p`'s family. `pods` are the ambient pods' addresses of
/// that family.
pub fn node_routes(
    p: &Params,
    z: &Ztunnel,
    t: TunnelIndexes,
    pods: &[IpAddr],
) -> Vec<(u32, Vec<Route>)> {
    let zroute = |table| link_route(table, z.ip, z.veth_index);
    let mut inbound: Vec<Route> = pods
        .iter()
        .map(|ip| {
            let mut r = Route::to(TABLE_INBOUND, *ip, host_prefix(*ip));
            r.gateway = Some(tunnel_addr_like(p.host_ip, INBOUND_NET, 2));
            r.oif = Some(t.inbound);
            r.prefsrc = Some(p.host_ip);
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
                default_via(
                    TABLE_OUTBOUND,
                    tunnel_addr_like(p.host_ip, OUTBOUND_NET, 2),
                    t.outbound,
                ),
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
/// of falling through to the main table, around ztunnel. `any` is the family's `0.0.0.0`/`::`.
pub fn node_routes_closed(any: IpAddr, pods: &[IpAddr]) -> Vec<(u32, Vec<Route>)> {
    let blackhole = |table, dst: IpAddr, prefix| {
        let mut r = Route::to(table, dst, prefix);
        r.kind = crate::nl::RouteKind::Blackhole;
        r
    };
    vec![
        (
            TABLE_INBOUND,
            pods.iter()
                .map(|ip| blackhole(TABLE_INBOUND, *ip, host_prefix(*ip)))
                .collect(),
        ),
        (TABLE_OUTBOUND, vec![blackhole(TABLE_OUTBOUND, any, 0)]),
        (TABLE_SPOOFED_REPLY, vec![]),
    ]
}

/// ztunnel's tables for `p`'s family: 100 delivers tproxied packets locally; 101/102 as the
/// article lists them.
pub fn ztunnel_routes(
    p: &Params,
    z: &Ztunnel,
    t: TunnelIndexes,
    lo: u32,
) -> Vec<(u32, Vec<Route>)> {
    let mut local = Route::to(100, unspecified_like(z.ip), 0);
    local.kind = crate::nl::RouteKind::Local;
    local.oif = Some(lo);
    let host = |table| link_route(table, p.host_ip, z.eth0_index);
    vec![
        (100, vec![local]),
        (
            101,
            vec![
                default_via(
                    101,
                    tunnel_addr_like(p.host_ip, OUTBOUND_NET, 1),
                    t.outbound,
                ),
                host(101),
            ],
        ),
        (
            102,
            vec![
                default_via(102, tunnel_addr_like(p.host_ip, INBOUND_NET, 1), t.inbound),
                host(102),
            ],
        ),
    ]
}

/// The tunnels on the node (`side_node`) or in ztunnel's netns. The IPv4 `p` makes them; with
/// `v6` they carry IPv6 too, and get the IPv6 addresses.
pub fn tunnels(p: &Params, z: &Ztunnel, side_node: bool, v6: bool) -> Vec<crate::nl::Tunnel> {
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
    // Only the IPv4 layout makes the tunnels: their underlay is IPv4.
    let IpAddr::V4(remote) = remote else {
        return Vec::new();
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
            address6: v6.then(|| tunnel_addr6(net, host)),
            broadcast: side_node,
        })
        .collect()
}
