//! In-pod capture, outbound half: TC egress of an ambient pod's eth0, inside the pod's netns.
//!
//! In-pod ztunnel listens in the pod's own netns, so a captured segment never leaves it: the
//! pod's TCP is turned back into its own stack through `lo`'s ingress (`bpf_redirect` with
//! `BPF_F_INGRESS`), where `ingress.rs` assigns it to ztunnel's socket. Turned back:
//! - a new connection (SYN): it is ztunnel's, on :15001;
//! - any segment of a connection whose other end is a socket of this netns: ztunnel's accepted
//!   outbound connections, and ztunnel's original-source connections to the pod (their replies
//!   are what istio-cni's connmark 0x111 routes back to ztunnel).
//!
//! Left alone: ztunnel's own packets (mark 0x539), replies on connections the pod accepted
//! uncaptured (kubelet probes), and everything but TCP and DNS.
use aya_ebpf::{
    bindings::BPF_F_INGRESS, helpers::bpf_redirect, macros::classifier, programs::TcContext,
};
use zdivert_common::{
    LOOPBACK_IFINDEX, MARK_INPOD_CONN, MARK_INPOD_ZTUNNEL, MARK_MASK, TC_INDEX_POD_EGRESS_SEEN,
    pod_counter::*,
};

use crate::{
    dns, dns6,
    maps::{count, dns_capture, sent_by_holder},
    packet::{Frame, IPPROTO_TCP, Ip, LOOPBACK_V4, mark, parse, set_dst_mac, set_tc_index, tcp},
    socket::connected_here,
    verdict::{drop, pass},
};

/// `lo`'s address: a frame turned back through it must be addressed to it, or the stack takes it
/// for another host's.
const LOOPBACK_MAC: [u8; 6] = [0; 6];

#[classifier]
pub fn zd_pod_egress(ctx: TcContext) -> i32 {
    // Whatever leaves the pod crossed this hook: `guard.rs` on the host veth asks.
    set_tc_index(&ctx, TC_INDEX_POD_EGRESS_SEEN);
    if mark(&ctx) & MARK_MASK == MARK_INPOD_ZTUNNEL {
        return pass(EGRESS_PASSED);
    }
    // What is not IP (ARP, neighbour discovery) is nothing capture decides about. What says it
    // is IP but cannot be read as such (a VLAN tag, more IPv6 extension headers than are
    // walked) is a raw socket's craft that the next hop would deliver as IP: dropped.
    let ip = match parse(&ctx) {
        Frame::NotIp => return pass(EGRESS_PASSED),
        Frame::Malformed => return drop(EGRESS_DROP_MALFORMED),
        Frame::Ip(ip) => ip,
    };
    if dns_capture() && dns::is_dns_any(&ctx, &ip) {
        return dns_query(&ctx, &ip);
    }
    if ip.proto != IPPROTO_TCP {
        return pass(EGRESS_PASSED);
    }
    // The stack does not fragment TCP (DF, PMTU): a fragment is broken or crafted.
    if ip.fragment {
        return drop(EGRESS_DROP_MALFORMED);
    }
    let Some(seg) = tcp(&ctx, &ip) else {
        return drop(EGRESS_DROP_MALFORMED);
    };
    if !seg.is_syn() && !connected_here(&ctx, &ip, &seg) {
        return pass(EGRESS_PASSED);
    }
    count(EGRESS_TURNED_BACK);
    turn_back(&ctx)
}

/// A DNS query, readdressed to ztunnel's DNS proxy on 127.0.0.1:15053 or [::1]:15053 (see
/// `dns.rs`, `dns6.rs`).
#[inline(always)]
fn dns_query(ctx: &TcContext, ip: &Ip) -> i32 {
    // The flow is noted under the query's source address: only that address's pod may.
    if !sent_by_holder(ctx, &ip.src) {
        return drop(EGRESS_DROP_DNS_NOT_OWN);
    }
    let readdressed = if ip.v6 {
        dns6::to_proxy(ctx, ip)
    } else {
        dns::to_proxy(ctx, ip, LOOPBACK_V4)
    };
    if readdressed.is_none() {
        return drop(EGRESS_DROP_MALFORMED);
    }
    count(EGRESS_DNS);
    turn_back(ctx)
}

/// Into this netns's stack again, through `lo`: marked 0x111, which routes it to the local
/// table (istio-cni's `ip rule fwmark 0x111/0xfff lookup 100`).
#[inline(always)]
fn turn_back(ctx: &TcContext) -> i32 {
    if !set_dst_mac(ctx, &LOOPBACK_MAC) {
        return drop(EGRESS_DROP_MALFORMED);
    }
    ctx.skb.set_mark((mark(ctx) & !MARK_MASK) | MARK_INPOD_CONN);
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT if lo is gone.
    unsafe { bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS as u64) as i32 }
}
