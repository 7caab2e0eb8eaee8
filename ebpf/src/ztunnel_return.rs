//! ztunnel return: TC ingress of ztunnel's host veth, i.e. packets ztunnel sends.
//!
//! TCP for an ambient pod on this node (ztunnel's connections, often with the original client's
//! address as source) is handed straight to the pod with `bpf_redirect_peer`: it bypasses the
//! node's stack, so inbound capture does not loop it back and the node's conntrack never sees the
//! spoofed flow next to the client's own (the collisions that stall the iptables layout).
//!
//! HBONE between two ambient pods of this node is the exception. ztunnel dials
//! `<destination pod>:15008` from the source pod's address and expects a ztunnel, this very one,
//! to answer; the pod has nothing on :15008. So a segment to an ambient pod's :15008, and the
//! answer of ztunnel's :15008 socket to it (source port 15008), go back into ztunnel's netns,
//! where the tproxy program hands each to its socket or to the :15008 listener.
use aya_ebpf::{helpers::bpf_redirect_peer, macros::classifier, programs::TcContext};
use zdivert_common::{Counter, PORT_INBOUND_HBONE, PodEntry, ZTUNNEL_F_V4, counter::*};

use crate::{
    dns,
    maps::{count, dns_capture, draining, pod, ztunnel},
    packet::{Frame, IPPROTO_TCP, ifindex, parse, set_dst_mac, set_src_mac, tcp},
    verdict::{drop, pass},
};

#[classifier]
pub fn zd_zt_return(ctx: TcContext) -> i32 {
    let Frame::Ip(ip) = parse(&ctx) else {
        return pass(RET_PASSED);
    };
    if ip.proto != IPPROTO_TCP && ip.proto != dns::IPPROTO_UDP {
        return pass(RET_PASSED);
    }
    let Some(p) = pod(&ip.dst) else {
        return pass(RET_PASSED);
    };
    if dns_capture()
        && let Some(z) = ztunnel()
        && z.flags & ZTUNNEL_F_V4 != 0
        && dns::answer_from_server(&ctx, &ip, z.ipv4).is_some()
    {
        return deliver(&ctx, &p, RET_DNS);
    }
    if ip.proto != IPPROTO_TCP || ip.fragment {
        return pass(RET_PASSED);
    }
    let Some(seg) = tcp(&ctx, &ip) else {
        return pass(RET_PASSED);
    };
    if seg.dport() == PORT_INBOUND_HBONE || seg.sport() == PORT_INBOUND_HBONE {
        return back_to_ztunnel(&ctx);
    }
    deliver(&ctx, &p, RET_DELIVERED)
}

/// Into the pod, which sees the frame as coming from its gateway, as routed traffic would; the
/// peer redirect marks it for the host, whatever its destination MAC.
#[inline(always)]
fn deliver(ctx: &TcContext, p: &PodEntry, counter: Counter) -> i32 {
    if !set_src_mac(ctx, &p.host_mac) {
        return pass(RET_PASSED);
    }
    count(counter);
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT if the pod is gone.
    unsafe { bpf_redirect_peer(p.host_ifindex, 0) as i32 }
}

/// Same-node HBONE: into the eth0 of the ztunnel that sent it, addressed to it (both ends of
/// the connection are that ztunnel's, the replaced one's during a rolling update included).
/// Without a ztunnel there is no one to send it back to, and the pod must not get it.
#[inline(always)]
fn back_to_ztunnel(ctx: &TcContext) -> i32 {
    let (z, counter) = match draining() {
        Some(old) if old.ztunnel.host_ifindex == ifindex(ctx) => (old.ztunnel, RET_HBONE_DRAINING),
        _ => match ztunnel() {
            Some(z) => (z, RET_HBONE_LOOPED),
            None => {
                return drop(RET_DROP_NO_ZTUNNEL);
            }
        },
    };
    if !set_dst_mac(ctx, &z.mac) {
        return drop(RET_DROP_NO_ZTUNNEL);
    }
    count(counter);
    // SAFETY: plain helper call; the peer of ztunnel's host veth is its eth0.
    unsafe { bpf_redirect_peer(z.host_ifindex, 0) as i32 }
}
