//! DNS capture (`--dns-capture`): an ambient pod's DNS (UDP and TCP port 53, IPv4) goes to
//! ztunnel's DNS proxy, and the answers come back from the server the pod asked.
//!
//! ztunnel 1.22.8 serves DNS from ordinary sockets on `[::]:15053`: it answers from its own
//! address. So the outbound program readdresses a query to ztunnel's address and :15053 and
//! notes the server the pod asked in `DNS_FLOW_SLOTS` (keyed by the pod's address, the slot of
//! its port and the protocol); the return program puts that server back as the answer's source.
//! No conntrack and no NAT table are involved: the note is the whole state, bounded per pod by
//! its slots and per node by an LRU map.
//!
//! In-pod ztunnel listens on `127.0.0.1:15053` in the pod's own netns: the same rewrite, with
//! loopback as the proxy (`pod_egress`, `pod_ingress`).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use zdivert_common::{DnsFlow, DnsFlowKey, IpKey, PORT_DNS, PORT_DNS_PROXY, dns_slot};

use crate::{
    maps::DNS_FLOW_SLOTS,
    packet::{ETH_HLEN, IPPROTO_TCP, Ip, read},
};

pub const IPPROTO_UDP: u8 = 17;
pub const IPV4_CSUM_OFF: usize = ETH_HLEN + 10;
const IPV4_SRC_OFF: usize = ETH_HLEN + 12;
const IPV4_DST_OFF: usize = ETH_HLEN + 16;

/// The L4 checksum's offset and the flags its updates need (a UDP checksum of 0 means none).
#[inline(always)]
pub fn l4_csum(ip: &Ip) -> (usize, u64) {
    if ip.proto == IPPROTO_TCP {
        (ip.l4_off + 16, 0)
    } else {
        (ip.l4_off + 6, BPF_F_MARK_MANGLED_0 as u64)
    }
}

/// The ports of a TCP or UDP header, network byte order.
#[inline(always)]
pub fn ports(ctx: &TcContext, ip: &Ip) -> Option<(u16, u16)> {
    let p: [u8; 4] = read(ctx, ip.l4_off)?;
    Some((
        u16::from_ne_bytes([p[0], p[1]]),
        u16::from_ne_bytes([p[2], p[3]]),
    ))
}

/// Rewrites the IPv4 address at `addr_off` and the port at `port_off`, checksums included.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    ip: &Ip,
    (addr_off, from_addr, to_addr): (usize, [u8; 4], [u8; 4]),
    (port_off, from_port, to_port): (usize, u16, u16),
) -> Option<()> {
    let (csum_off, mangled) = l4_csum(ip);
    let (from_a, to_a) = (
        u32::from_ne_bytes(from_addr) as u64,
        u32::from_ne_bytes(to_addr) as u64,
    );
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    ctx.l4_csum_replace(csum_off, from_a, to_a, pseudo).ok()?;
    ctx.l3_csum_replace(IPV4_CSUM_OFF, from_a, to_a, 4).ok()?;
    ctx.store(addr_off, &to_addr, 0).ok()?;
    ctx.l4_csum_replace(csum_off, from_port as u64, to_port as u64, mangled | 2)
        .ok()?;
    ctx.store(port_off, &to_port, 0).ok()
}

/// Whether the pod's packet is DNS this capture takes: IPv4, UDP or TCP to port 53.
#[inline(always)]
pub fn is_dns(ctx: &TcContext, ip: &Ip) -> bool {
    !ip.v6 && is_dns_any(ctx, ip)
}

/// UDP or TCP to port 53, either family.
#[inline(always)]
pub fn is_dns_any(ctx: &TcContext, ip: &Ip) -> bool {
    !ip.fragment
        && (ip.proto == IPPROTO_UDP || ip.proto == IPPROTO_TCP)
        && ports(ctx, ip).is_some_and(|(_, dport)| u16::from_be(dport) == PORT_DNS)
}

/// Readdresses a pod's DNS packet to the DNS proxy at `proxy`, :15053, noting the server it
/// asked. `None` if the packet could not be rewritten (then it must not pass).
#[inline(always)]
pub fn to_proxy(ctx: &TcContext, ip: &Ip, proxy: [u8; 4]) -> Option<()> {
    let (sport, dport) = ports(ctx, ip)?;
    let (pod, server) = (v4(&ip.src), v4(&ip.dst));
    let key = DnsFlowKey {
        pod,
        slot: dns_slot(sport),
        proto: ip.proto,
        _reserved: 0,
    };
    let flow = DnsFlow {
        server,
        port_be: sport,
        _reserved: 0,
    };
    DNS_FLOW_SLOTS.insert(&key, &flow, 0).ok()?;
    rewrite(
        ctx,
        ip,
        (IPV4_DST_OFF, server, proxy),
        (ip.l4_off + 2, dport, PORT_DNS_PROXY.to_be()),
    )
}

/// An answer of the DNS proxy at `proxy` to a pod: its source becomes the server the pod
/// asked. `None` if it is no such answer.
#[inline(always)]
pub fn answer_from_server(ctx: &TcContext, ip: &Ip, proxy: [u8; 4]) -> Option<()> {
    if ip.v6 || ip.fragment || v4(&ip.src) != proxy {
        return None;
    }
    let (sport, dport) = ports(ctx, ip)?;
    if u16::from_be(sport) != PORT_DNS_PROXY {
        return None;
    }
    let key = DnsFlowKey {
        pod: v4(&ip.dst),
        slot: dns_slot(dport),
        proto: ip.proto,
        _reserved: 0,
    };
    // SAFETY: the value is copied out before the map can change under it.
    let flow = unsafe { DNS_FLOW_SLOTS.get(&key) }.copied()?;
    if flow.port_be != dport {
        return None;
    }
    let server = flow.server;
    rewrite(
        ctx,
        ip,
        (IPV4_SRC_OFF, proxy, server),
        (ip.l4_off, sport, PORT_DNS.to_be()),
    )
}

#[inline(always)]
fn v4(a: &IpKey) -> [u8; 4] {
    a.v4_word().to_ne_bytes()
}
