//! The iptables rules (as `iptables-save` prints them) and ipsets of the layout.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use zdivert_common::{
    MARK_MASK, MARK_TPROXY, PORT_DNS, PORT_DNS_PROXY, PORT_INBOUND_HBONE, PORT_INBOUND_PLAIN,
    PORT_OUTBOUND,
};

use super::*;

pub const IPSET: &str = "ztunnel-pods-ips";
/// `<pod IP>,<its host veth>`: the only source each ambient pod's veth may carry.
pub const IPSET_SOURCES: &str = "ztunnel-pods-srcs";
/// `0.0.0.0/0,<host veth>`: the interfaces of ambient pods.
pub const IPSET_IFACES: &str = "ztunnel-pods-ifaces";

/// The IPv6 sets, for the same layout in ip6tables.
pub const IPSET6: &str = "ztunnel-pods-ips6";
pub const IPSET6_SOURCES: &str = "ztunnel-pods-srcs6";
pub const IPSET6_IFACES: &str = "ztunnel-pods-ifaces6";

type IpSet = (&'static str, &'static str, BTreeSet<String>);

/// What the rules of one family spell differently.
struct Spelling {
    ips: &'static str,
    sources: &'static str,
    ifaces: &'static str,
    icmp: &'static str,
    loopback: &'static str,
}

fn spelling(v6: bool) -> Spelling {
    if v6 {
        Spelling {
            ips: IPSET6,
            sources: IPSET6_SOURCES,
            ifaces: IPSET6_IFACES,
            icmp: "ipv6-icmp",
            loopback: "::1",
        }
    } else {
        Spelling {
            ips: IPSET,
            sources: IPSET_SOURCES,
            ifaces: IPSET_IFACES,
            icmp: "icmp",
            loopback: "127.0.0.1",
        }
    }
}

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
    [MARK_CONN_SKIP, MARK_CONN_SPOOFED, MARK_CONN_HBONE_LOOP]
        .iter()
        .map(|b| {
            format!(
                "-A {chain} {} -j CONNMARK --save-mark --nfmask {b:#x} --ctmask {b:#x}",
                has_mark(*b)
            )
        })
        .collect()
}

/// The node's chains for `p`'s family: mangle marks the packets, nat keeps kube-proxy's DNAT
/// off captured ones.
pub fn node_chains(p: &Params) -> Vec<Chain> {
    let Spelling {
        ips,
        sources,
        ifaces,
        icmp,
        ..
    } = spelling(p.v6());
    let c = "-A ztunnel-PREROUTING";
    let port = p.tunnel_port;
    let skip_return = format!("{c} {} -j RETURN", has_mark(MARK_SKIP));
    let mut prerouting = vec![
        // Beyond the article: an ambient pod's veth carries that pod's own source or nothing
        // (capture keys on the interface, so no pod can pass for another or around ztunnel).
        format!(
            "{c} -m set --match-set {ifaces} src,src -m set ! --match-set {sources} src,src -j DROP"
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
        let (zip, zveth, len) = (z.ip, &z.veth, host_prefix(z.ip));
        // Beyond the article: ztunnel (1.22) speaks HBONE to same-node pods too, dialling
        // `<pod>:15008` from the source pod's address. That connection, both ways, must end on
        // ztunnel's sockets, not the pod's: left unmarked, rule 103 sends it back through
        // istioin, where TPROXY finds ztunnel's socket or its :15008 listener.
        let hbone = |port: &str| {
            mark(
                &format!(
                    "{c} -i {zveth} -p tcp -m tcp --{port} {PORT_INBOUND_HBONE} -m set --match-set {ips} dst"
                ),
                MARK_CONN_HBONE_LOOP,
            )
        };
        prerouting.extend([
            hbone("dport"),
            hbone("sport"),
            format!("{c} {} -j RETURN", has_mark(MARK_CONN_HBONE_LOOP)),
        ]);
        prerouting.extend([
            mark(
                &format!(
                    "{c} ! -i {zveth} -m connmark --mark {MARK_CONN_SPOOFED:#x}/{MARK_CONN_SPOOFED:#x}"
                ),
                MARK_SPOOFED_REPLY,
            ),
            format!("{c} {} -j RETURN", has_mark(MARK_SPOOFED_REPLY)),
            mark(&format!("{c} ! -s {zip}/{len} -i {zveth}"), MARK_CONN_SPOOFED),
            skip_return.clone(),
            mark(&format!("{c} -i {zveth}"), MARK_CONN_SKIP),
        ]);
    }
    prerouting.extend([
        mark(&format!("{c} -p udp"), MARK_CONN_SKIP),
        // Beyond the article: ping to and from ambient pods is not captured (ztunnel's netns
        // would swallow it). ICMP errors of ztunnel's connections matched 0x210 above.
        mark(&format!("{c} -p {icmp}"), MARK_CONN_SKIP),
        skip_return,
        mark(
            &format!("{c} -p tcp -m set --match-set {ips} src"),
            MARK_OUTBOUND,
        ),
    ]);
    let accept = |chain: &str| vec![format!("-A {chain} {} -j ACCEPT", has_mark(MARK_OUTBOUND))];
    // istio-cni's DNS capture: ambient pods' DNS to ztunnel's DNS proxy, before the ACCEPT that
    // keeps kube-proxy off captured TCP; conntrack answers from the server the pod asked.
    // IPv4 only, as in eBPF mode.
    let mut nat_prerouting = vec![];
    if let (true, false, Some(z)) = (p.dns_capture, p.v6(), &p.ztunnel) {
        for proto in ["udp", "tcp"] {
            nat_prerouting.push(format!(
                "-A ztunnel-PREROUTING -p {proto} -m set --match-set {ips} src -m {proto} --dport {PORT_DNS} -j DNAT --to-destination {}:{PORT_DNS_PROXY}",
                z.ip
            ));
        }
    }
    nat_prerouting.extend(accept("ztunnel-PREROUTING"));
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
            rules: save_mark("ztunnel-FORWARD")
                .into_iter()
                .chain(clamp_mss_into_tunnels())
                .collect(),
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
            rules: vec![
                // The node's "fragmentation needed" (the tunnels are smaller) about a same-node
                // HBONE connection is for ztunnel's socket, not the pod whose address it carries.
                mark(
                    &format!(
                        "-A ztunnel-OUTPUT -p {icmp} -m connmark --mark {MARK_CONN_HBONE_LOOP:#x}/{MARK_CONN_HBONE_LOOP:#x}"
                    ),
                    MARK_SPOOFED_REPLY,
                ),
                format!(
                    "-A ztunnel-OUTPUT {} -j RETURN",
                    has_mark(MARK_SPOOFED_REPLY)
                ),
                // Host-originated traffic (kubelet probes) is never captured.
                format!(
                    "-A ztunnel-OUTPUT -s {}/{} -j MARK --set-xmark {MARK_CONN_SKIP:#x}/0xffffffff",
                    p.host_ip,
                    host_prefix(p.host_ip)
                ),
            ],
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
            rules: nat_prerouting,
        },
        Chain {
            table: "nat",
            name: "ztunnel-POSTROUTING",
            from: "POSTROUTING",
            rules: accept("ztunnel-POSTROUTING"),
        },
    ]
}

/// Beyond the article: the tunnels carry 50 bytes of encapsulation, and the pods and ztunnel
/// size their segments for 1500-byte links. A pod learns the tunnel's MTU from the node's
/// "fragmentation needed", but ztunnel's same-node HBONE connections carry a pod's address, so
/// that error goes to the pod and ztunnel's big segments are lost for good. Every connection
/// that enters a tunnel agrees on segments that fit it from the start.
fn clamp_mss_into_tunnels() -> Vec<String> {
    [NODE_INBOUND, NODE_OUTBOUND]
        .iter()
        .map(|t| {
            format!(
                "-A ztunnel-FORWARD -o {t} -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu"
            )
        })
        .collect()
}

/// The node's IPv6 chain where there is no IPv6 to capture (neither ztunnel nor any ambient pod
/// has an IPv6 address): ambient pods' IPv6 TCP is dropped both ways rather than passed around
/// ztunnel, and forged IPv6 sources too. Traffic with the node itself is exempt.
pub fn node_chains6_closed() -> Vec<Chain> {
    let c = "-A ztunnel-PREROUTING";
    let drops = vec![
        format!(
            "{c} -m set --match-set {IPSET6_IFACES} src,src -m set ! --match-set {IPSET6_SOURCES} src,src -j DROP"
        ),
        format!(
            "{c} -p tcp -m set --match-set {IPSET6_IFACES} src,src -m addrtype ! --dst-type LOCAL -j DROP"
        ),
        format!("{c} -p tcp -m set --match-set {IPSET6} dst -j DROP"),
    ];
    // The same chains as the layout, the others empty: a switch either way is one sync.
    let model = Params {
        host_ip: std::net::Ipv6Addr::LOCALHOST.into(),
        tunnel: TunnelKind::Vxlan,
        tunnel_port: DEFAULT_TUNNEL_PORT,
        dns_capture: false,
        ztunnel: None,
    };
    node_chains(&model)
        .into_iter()
        .map(|mut chain| {
            chain.rules = match (chain.table, chain.name) {
                ("mangle", "ztunnel-PREROUTING") => drops.clone(),
                _ => vec![],
            };
            chain
        })
        .collect()
}

/// Beyond the article, the pod start window: TCP to and from a new veth that is not classified
/// yet is dropped. The rules are always in place and match sets of held interfaces, so holding
/// a veth is one `ipset add`, fast enough to come before the pod can talk. The pod's answers to
/// the node's own connections (kubelet probes, the REPLY direction) pass; so does what the node
/// sends it (OUTPUT, not FORWARD).
pub fn hold_chains(v6: bool) -> Vec<Chain> {
    let set = if v6 { HOLD_SET6 } else { HOLD_SET };
    vec![
        Chain {
            table: "mangle",
            name: HOLD_FROM_POD,
            from: "PREROUTING",
            rules: vec![
                format!(
                    "-A {HOLD_FROM_POD} -p tcp -m set --match-set {set} src,src -m conntrack --ctdir REPLY -j RETURN"
                ),
                format!("-A {HOLD_FROM_POD} -p tcp -m set --match-set {set} src,src -j DROP"),
            ],
        },
        Chain {
            table: "mangle",
            name: HOLD_TO_POD,
            from: "FORWARD",
            rules: vec![format!(
                "-A {HOLD_TO_POD} -p tcp -m set --match-set {set} dst,dst -j DROP"
            )],
        },
    ]
}

/// The hold sets' members for these veths: any address, on the veth.
pub fn hold_members(names: &[String]) -> [(&'static str, &'static str, BTreeSet<String>); 2] {
    [
        (
            HOLD_SET,
            "hash:net,iface family inet",
            names.iter().map(|n| format!("0.0.0.0/0,{n}")).collect(),
        ),
        (
            HOLD_SET6,
            "hash:net,iface family inet6",
            names.iter().map(|n| format!("::/0,{n}")).collect(),
        ),
    ]
}

/// The veth of a hold set member.
pub fn held_name(member: &str) -> Option<&str> {
    member.split_once(',').map(|(_, n)| n)
}

pub const HOLD_FROM_POD: &str = "zdivert-HOLD";
pub const HOLD_TO_POD: &str = "zdivert-HOLD-FWD";
pub const HOLD_SET: &str = "zdivert-held";
pub const HOLD_SET6: &str = "zdivert-held6";

/// The rules in ztunnel's netns, in the built-in mangle PREROUTING chain as the article shows
/// them (order matters: HBONE's 15008 before the catch-all 15006).
pub fn ztunnel_rules(z: &Ztunnel) -> Vec<String> {
    let Spelling { icmp, loopback, .. } = spelling(z.ip.is_ipv6());
    let len = host_prefix(z.ip);
    let tproxy = |iface: &str, extra: &str, port: u16| {
        format!(
            "-A PREROUTING -i {iface} -p tcp {extra}-j TPROXY --on-port {port} --on-ip {loopback} \
             --tproxy-mark {MARK_TPROXY:#x}/{MARK_MASK:#x}"
        )
    };
    let hbone = format!("-m tcp --dport {PORT_INBOUND_HBONE} ");
    let local = format!("-j MARK --set-xmark {MARK_ZTUNNEL_LOCAL:#x}/{MARK_MASK:#x}");
    vec![
        tproxy(ZTUNNEL_INBOUND, &hbone, PORT_INBOUND_HBONE),
        tproxy(ZTUNNEL_OUTBOUND, "", PORT_OUTBOUND),
        tproxy(ZTUNNEL_INBOUND, "", PORT_INBOUND_PLAIN),
        format!(
            "-A PREROUTING ! -d {}/{len} -i {} -p tcp {local}",
            z.ip, z.eth0
        ),
        // Beyond the article: ICMP errors the node sends back about ztunnel's connections in a
        // pod's name (0x40 on the node) are delivered here, to ztunnel's socket.
        format!(
            "-A PREROUTING ! -d {}/{len} -i {} -p {icmp} {local}",
            z.ip, z.eth0
        ),
    ]
}
