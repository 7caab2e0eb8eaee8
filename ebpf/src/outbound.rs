//! Outbound capture: TC ingress of an ambient pod's host veth, i.e. packets the pod sends.
//!
//! Every TCP segment the pod sends to anything but the node itself or ztunnel goes straight into
//! ztunnel's netns with `bpf_redirect_peer`: it never reaches the node's stack, so kube-proxy
//! cannot DNAT it (ztunnel sees the Service VIP) and the node's conntrack never sees it.
use aya_ebpf::{helpers::bpf_redirect_peer, macros::classifier, programs::TcContext};
use zdivert_common::{MARK_OUTBOUND, ZTUNNEL_F_V4, ZtunnelEntry, counter::*};

use crate::{
    dns,
    maps::{count, dns_capture, is_node_ip, is_ztunnel_ip, pod, ztunnel},
    packet::{Frame, IPPROTO_TCP, Ip, ifindex, mark, parse, set_dst_mac, tcp},
    socket::{connected_here, draining_owner},
    verdict::{drop, pass},
};

const IPPROTO_ICMPV6: u8 = 58;

#[classifier]
pub fn zd_outbound(ctx: TcContext) -> i32 {
    let ip = match parse(&ctx) {
        Frame::NotIp => return pass(OUT_PASSED),
        Frame::Malformed => return drop(OUT_DROP_MALFORMED),
        Frame::Ip(ip) => ip,
    };
    // Capture keys on the interface, not only on the address: the source must be one of the
    // addresses of the pod behind this very veth, or the packet is a forgery (it would otherwise
    // be proxied as another pod, or reach non-ambient pods around ztunnel).
    match pod(&ip.src) {
        Some(p) if p.host_ifindex == ifindex(&ctx) => {}
        _ if is_neighbour_discovery(&ip) => return pass(OUT_PASSED),
        _ => return drop(OUT_DROP_FORGED),
    }
    // DNS is no authorization matter: without a ztunnel it goes where the pod sent it.
    if dns_capture()
        && dns::is_dns(&ctx, &ip)
        && let Some(z) = ztunnel()
    {
        return dns_query(&ctx, &ip, &z);
    }
    if ip.proto != IPPROTO_TCP {
        return pass(OUT_PASSED);
    }
    // Fragments carry no (trustworthy) ports; pods do not fragment TCP (DF, PMTU), so a TCP
    // fragment is either broken or an evasion attempt.
    if ip.fragment {
        return drop(OUT_DROP_MALFORMED);
    }
    let Some(seg) = tcp(&ctx, &ip) else {
        return drop(OUT_DROP_MALFORMED);
    };
    // The pod's own connections to the node, and its answers on the node's connections (kubelet
    // probes), are not captured. An answer to the node's address on a connection the node does
    // not hold is one ztunnel made in a NodePort client's name (masqueraded to the node's
    // address): it goes back to ztunnel. A node listener on the client's port (a client port
    // 22 meets sshd) is no connection of the node's.
    if is_node_ip(&ip.dst) && (seg.is_syn() || connected_here(&ctx, &ip, &seg)) {
        return pass(OUT_PASSED);
    }
    // A connection the replaced ztunnel still holds stays with it (rolling update).
    let z = match draining_owner(&ctx, &ip, &seg) {
        Some(old) => {
            count(OUT_TO_DRAINING);
            old
        }
        None => match ztunnel() {
            Some(z) => z,
            None => return drop(OUT_DROP_NO_ZTUNNEL),
        },
    };
    if is_ztunnel_ip(&z, &ip.dst, ip.v6) {
        return pass(OUT_PASSED);
    }
    if !set_dst_mac(&ctx, &z.mac) {
        return drop(OUT_DROP_MALFORMED);
    }
    // The mark survives bpf_redirect_peer (same-host scrub keeps it) and tells ztunnel's tproxy
    // program that this is outbound traffic (:15001).
    ctx.skb.set_mark(mark(&ctx) | MARK_OUTBOUND);
    count(OUT_REDIRECTED);
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT if the peer is gone.
    unsafe { bpf_redirect_peer(z.host_ifindex, 0) as i32 }
}

/// A DNS query, to ztunnel's DNS proxy (see `dns.rs`).
#[inline(always)]
fn dns_query(ctx: &TcContext, ip: &Ip, z: &ZtunnelEntry) -> i32 {
    if z.flags & ZTUNNEL_F_V4 == 0
        || dns::to_proxy(ctx, ip, z.ipv4).is_none()
        || !set_dst_mac(ctx, &z.mac)
    {
        return drop(OUT_DROP_MALFORMED);
    }
    count(OUT_DNS);
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT if the peer is gone.
    unsafe { bpf_redirect_peer(z.host_ifindex, 0) as i32 }
}

/// IPv6 neighbour discovery and MLD use link-local or unspecified sources, which are not pod
/// addresses; without them the pod's IPv6 would not work at all.
#[inline(always)]
fn is_neighbour_discovery(ip: &Ip) -> bool {
    let a = &ip.src.addr;
    let link_local = a[0] == 0xfe && a[1] & 0xc0 == 0x80;
    let unspecified = ip.src.words() == [0; 4];
    ip.v6 && ip.proto == IPPROTO_ICMPV6 && (link_local || unspecified)
}
