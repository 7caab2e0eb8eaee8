//! IPv6 DNS capture for in-pod mode: as `dns.rs` does for IPv4, a pod's query is readdressed to
//! ztunnel's DNS proxy on `[::1]:15053` and the answer gets the queried server back as its
//! source, with `DNS_FLOW_SLOTS6` as the only state. IPv6 has no header checksum; the L4 checksum
//! covers the addresses through the pseudo-header.
use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use zdivert_common::{DnsFlow6, DnsFlowKey6, PORT_DNS, PORT_DNS_PROXY, dns_slot};

use crate::{
    dns::{l4_csum, ports},
    maps::DNS_FLOW_SLOTS6,
    packet::{ETH_HLEN, Ip, LOOPBACK_V6},
};

const IPV6_SRC_OFF: usize = ETH_HLEN + 8;
const IPV6_DST_OFF: usize = ETH_HLEN + 24;

/// Rewrites the IPv6 address at `addr_off` and the port at `port_off`, the L4 checksum included.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    ip: &Ip,
    (addr_off, from_addr, to_addr): (usize, [u8; 16], [u8; 16]),
    (port_off, from_port, to_port): (usize, u16, u16),
) -> Option<()> {
    let (csum_off, mangled) = l4_csum(ip);
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    let mut i = 0;
    while i < 4 {
        let w = |a: &[u8; 16]| {
            u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]) as u64
        };
        ctx.l4_csum_replace(csum_off, w(&from_addr), w(&to_addr), pseudo)
            .ok()?;
        i += 1;
    }
    ctx.store(addr_off, &to_addr, 0).ok()?;
    ctx.l4_csum_replace(csum_off, from_port as u64, to_port as u64, mangled | 2)
        .ok()?;
    ctx.store(port_off, &to_port, 0).ok()
}

/// Readdresses a pod's IPv6 DNS packet to `[::1]:15053`, noting the server it asked.
#[inline(always)]
pub fn to_proxy(ctx: &TcContext, ip: &Ip) -> Option<()> {
    let (sport, dport) = ports(ctx, ip)?;
    let key = DnsFlowKey6 {
        pod: ip.src.addr,
        slot: dns_slot(sport),
        proto: ip.proto,
        _reserved: 0,
    };
    let flow = DnsFlow6 {
        server: ip.dst.addr,
        port_be: sport,
        _reserved: 0,
    };
    DNS_FLOW_SLOTS6.insert(&key, &flow, 0).ok()?;
    rewrite(
        ctx,
        ip,
        (IPV6_DST_OFF, ip.dst.addr, LOOPBACK_V6),
        (ip.l4_off + 2, dport, PORT_DNS_PROXY.to_be()),
    )
}

/// An answer of the proxy on `[::1]:15053` to a pod: its source becomes the server the pod
/// asked. `None` if it is no such answer.
#[inline(always)]
pub fn answer_from_server(ctx: &TcContext, ip: &Ip) -> Option<()> {
    if !ip.v6 || ip.fragment || ip.src.addr != LOOPBACK_V6 {
        return None;
    }
    let (sport, dport) = ports(ctx, ip)?;
    if u16::from_be(sport) != PORT_DNS_PROXY {
        return None;
    }
    let key = DnsFlowKey6 {
        pod: ip.dst.addr,
        slot: dns_slot(dport),
        proto: ip.proto,
        _reserved: 0,
    };
    // SAFETY: the value is copied out before the map can change under it.
    let flow = unsafe { DNS_FLOW_SLOTS6.get(&key) }.copied()?;
    if flow.port_be != dport {
        return None;
    }
    let server = flow.server;
    rewrite(
        ctx,
        ip,
        (IPV6_SRC_OFF, LOOPBACK_V6, server),
        (ip.l4_off, sport, PORT_DNS.to_be()),
    )
}
