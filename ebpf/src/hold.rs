//! The start window: a new pod veth the agent has not yet classified (ambient or not). Its TCP is
//! dropped both ways until the agent replaces this program with capture or removes it, so a pod
//! that starts sending before the agent knows it cannot reach anything around ztunnel. The
//! node's own connections (kubelet probes) and everything that is not TCP pass.
use aya_ebpf::{macros::classifier, programs::TcContext};
use zdivert_common::counter::*;

use crate::{
    packet::{Frame, IPPROTO_TCP, ifindex, parse, tcp},
    socket::connected_here,
    verdict::{drop, pass},
};

#[classifier]
pub fn zd_hold(ctx: TcContext) -> i32 {
    let ip = match parse(&ctx) {
        Frame::NotIp => return pass(HOLD_PASSED),
        Frame::Malformed => return drop(HOLD_DROPPED),
        Frame::Ip(ip) => ip,
    };
    if ip.proto != IPPROTO_TCP {
        return pass(HOLD_PASSED);
    }
    // SAFETY: reading a scalar field of the context.
    let came_in_on = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // Egress, sent by the node's own stack: a probe to the pod.
    if came_in_on == 0 {
        return pass(HOLD_PASSED);
    }
    // Ingress from the pod: only its side of a connection a node socket holds (a probe's
    // answer); a node listener on the port is no such connection.
    if came_in_on == ifindex(&ctx)
        && !ip.fragment
        && let Some(seg) = tcp(&ctx, &ip)
        && !seg.is_syn()
        && connected_here(&ctx, &ip, &seg)
    {
        return pass(HOLD_PASSED);
    }
    drop(HOLD_DROPPED)
}
