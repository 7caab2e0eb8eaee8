//! ztunnel return: TC ingress of ztunnel's host veth, i.e. packets ztunnel sends.
//!
//! TCP for an ambient pod on this node (ztunnel's connections, often with the original client's
//! address as source) is handed straight to the pod with `bpf_redirect_peer`: it bypasses the
//! node's stack, so inbound capture does not loop it back and the node's conntrack never sees the
//! spoofed flow next to the client's own (the collisions that stall the iptables layout).
use aya_ebpf::{helpers::bpf_redirect_peer, macros::classifier, programs::TcContext};
use zdivert_common::{TCX_NEXT, counter::*};

use crate::{
    maps::{count, pod},
    packet::{Frame, IPPROTO_TCP, parse, set_dst_mac, set_src_mac},
};

#[classifier]
pub fn zd_zt_return(ctx: TcContext) -> i32 {
    let Frame::Ip(ip) = parse(&ctx) else {
        return pass();
    };
    if ip.proto != IPPROTO_TCP {
        return pass();
    }
    let Some(p) = pod(&ip.dst) else {
        return pass();
    };
    // The pod sees the frame as coming from its gateway, as routed traffic would. Its own MAC is
    // written when known; delivery does not depend on it (the peer redirect marks it for host).
    let known_pod_mac = p.pod_mac != [0; 6];
    if (known_pod_mac && !set_dst_mac(&ctx, &p.pod_mac)) || !set_src_mac(&ctx, &p.host_mac) {
        return pass();
    }
    count(RET_DELIVERED);
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT if the pod is gone.
    unsafe { bpf_redirect_peer(p.host_ifindex, 0) as i32 }
}

#[inline(always)]
fn pass() -> i32 {
    count(RET_PASSED);
    TCX_NEXT
}
