//! Inbound capture: TC egress of an ambient pod's host veth, i.e. packets the node routes to the
//! pod. TCP from anywhere but the node's own stack (kubelet probes) and ztunnel goes to ztunnel.
//!
//! ztunnel's own deliveries to the pod never come through here: the return program hands them to
//! the pod with `bpf_redirect_peer`, so no "skip" mark is needed or honoured on this path.
use aya_ebpf::{helpers::bpf_redirect, macros::classifier, programs::TcContext};
use zdivert_common::{ZtunnelEntry, counter::*};

use crate::{
    maps::{count, draining, is_node_ip, is_ztunnel_ip, ztunnel},
    packet::{Frame, IPPROTO_TCP, Ip, Quoted, icmp_error_quote, parse, set_dst_mac, tcp},
    socket::draining_owner,
    verdict::{drop, pass},
};

#[classifier]
pub fn zd_inbound(ctx: TcContext) -> i32 {
    let ip = match parse(&ctx) {
        Frame::NotIp => return pass(IN_PASSED),
        Frame::Malformed => return drop(IN_DROP_MALFORMED),
        Frame::Ip(ip) => ip,
    };
    if let Some(quoted) = icmp_error_quote(&ctx, &ip) {
        return icmp_error(&ctx, &ip, &quoted);
    }
    // The node's own connections (kubelet probes) are not captured. What the node only
    // forwards is, a NodePort client's connection masqueraded to the node's address included:
    // the exemption is for what the node sends, not for its source address (as
    // istio/istio#46936 narrowed it).
    if ip.proto != IPPROTO_TCP || from_the_node(&ctx, &ip) {
        return pass(IN_PASSED);
    }
    if ip.fragment {
        return drop(IN_DROP_MALFORMED);
    }
    let Some(seg) = tcp(&ctx, &ip) else {
        return drop(IN_DROP_MALFORMED);
    };
    // A connection the replaced ztunnel still holds stays with it (rolling update).
    let z = match draining_owner(&ctx, &ip, &seg) {
        Some(old) => {
            count(IN_TO_DRAINING);
            old
        }
        None => {
            let Some(z) = ztunnel() else {
                return drop(IN_DROP_NO_ZTUNNEL);
            };
            let from_old = draining().is_some_and(|d| from_ztunnel(&ctx, &ip, &d.ztunnel));
            if from_ztunnel(&ctx, &ip, &z) || from_old {
                return pass(IN_PASSED);
            }
            z
        }
    };
    // ztunnel's eth0 must accept the frame as addressed to it.
    if !set_dst_mac(&ctx, &z.mac) {
        return drop(IN_DROP_MALFORMED);
    }
    count(IN_REDIRECTED);
    // Egress cannot use bpf_redirect_peer; transmitting on ztunnel's host veth delivers the frame
    // to ztunnel's eth0. Crossing netns clears the mark, so ztunnel's tproxy program treats an
    // unmarked captured packet as inbound (:15006, or :15008 for HBONE).
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT on a bad ifindex.
    unsafe { bpf_redirect(z.host_ifindex, 0) as i32 }
}

/// An ICMP error about TCP "from" this pod that comes from outside concerns a connection
/// ztunnel made in the pod's name (the pod's own TCP never leaves the node uncaptured): it goes
/// to ztunnel, whose socket needs it (path MTU, unreachable); the pod has no such connection.
/// Errors from ztunnel itself, or about the pod's direct traffic with the node, are the pod's.
#[inline(always)]
fn icmp_error(ctx: &TcContext, ip: &Ip, quoted: &Quoted) -> i32 {
    if quoted.proto != IPPROTO_TCP || quoted.src != ip.dst || is_node_ip(&quoted.dst) {
        return pass(IN_PASSED);
    }
    let Some(z) = ztunnel() else {
        return pass(IN_PASSED);
    };
    if is_ztunnel_ip(&z, &ip.src, ip.v6) || !set_dst_mac(ctx, &z.mac) {
        return pass(IN_PASSED);
    }
    count(IN_REDIRECTED);
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT on a bad ifindex.
    unsafe { bpf_redirect(z.host_ifindex, 0) as i32 }
}

/// Whether the node's own stack sent the packet: it arrived on no device, from a node address.
/// What the node forwards (from another node, another pod, or a NodePort after DNAT) arrived
/// on one; a local process that binds a foreign source (IP_FREEBIND, IP_TRANSPARENT) speaks
/// for no one but the node.
#[inline(always)]
fn from_the_node(ctx: &TcContext, ip: &Ip) -> bool {
    came_in_on(ctx) == 0 && is_node_ip(&ip.src)
}

/// Whether `z` sent the packet: its address, in through its veth. The address alone is no
/// proof: another node's pod may forge it, and a replaced ztunnel's address may go to a pod.
#[inline(always)]
fn from_ztunnel(ctx: &TcContext, ip: &Ip, z: &ZtunnelEntry) -> bool {
    came_in_on(ctx) == z.host_ifindex && is_ztunnel_ip(z, &ip.src, ip.v6)
}

#[inline(always)]
fn came_in_on(ctx: &TcContext) -> u32 {
    // SAFETY: reading a scalar field of the context.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}
