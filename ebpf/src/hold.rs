//! The start window: a new pod veth the agent has not yet classified (ambient or not). Its TCP is
//! dropped both ways until the agent replaces this program with capture or removes it, so a pod
//! that starts sending before the agent knows it cannot reach anything around ztunnel. The
//! node's own connections (kubelet probes) and everything that is not TCP pass.
use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};
use zdivert_common::{TCX_NEXT, counter::*};

use crate::{
    maps::count,
    packet::{Frame, IPPROTO_TCP, ifindex, parse, tcp},
    socket::owned_here,
};

#[classifier]
pub fn zd_hold(ctx: TcContext) -> i32 {
    let ip = match parse(&ctx) {
        Frame::NotIp => return pass(),
        Frame::Malformed => return drop(),
        Frame::Ip(ip) => ip,
    };
    if ip.proto != IPPROTO_TCP {
        return pass();
    }
    // SAFETY: reading a scalar field of the context.
    let came_in_on = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // Egress, sent by the node's own stack: a probe to the pod.
    if came_in_on == 0 {
        return pass();
    }
    // Ingress from the pod: only its side of a connection a node socket holds (a probe's answer).
    if came_in_on == ifindex(&ctx)
        && !ip.fragment
        && let Some(seg) = tcp(&ctx, &ip)
        && !seg.is_syn()
        && owned_here(&ctx, &ip, &seg)
    {
        return pass();
    }
    drop()
}

#[inline(always)]
fn pass() -> i32 {
    count(HOLD_PASSED);
    TCX_NEXT
}

#[inline(always)]
fn drop() -> i32 {
    count(HOLD_DROPPED);
    TC_ACT_SHOT as i32
}
