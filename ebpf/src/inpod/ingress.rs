//! In-pod capture, the half that hands segments to ztunnel: TC ingress of an ambient pod's eth0
//! (what arrives from the wire) and of its `lo` (what `egress.rs` turned back).
//!
//! Captured segments are assigned to a socket of ztunnel's in the pod with `bpf_sk_assign`: their
//! connection's socket if there is one, else ztunnel's listener, :15001 for what the pod sends,
//! :15006 for what it is sent. (Turned-back segments without SYN are left to the stack's own
//! lookup: `egress.rs` turned them back because their socket is here.) This is istio-cni's
//! contract without netfilter:
//! - ztunnel's own packets (mark 0x539) and loopback traffic are not captured;
//! - inbound TCP is captured except from the kubelet probe address (HBONE to ztunnel's :15008,
//!   the rest to :15006);
//! - only ztunnel's sockets (mark 0x539, a full socket's own or a request socket's listener's)
//!   are given what was captured: a listener a process in the pod bound on the pod's address,
//!   or a connection of its own, gets nothing (dropped, counted `dropped_not_ztunnels`);
//! - turned-back segments carry mark 0x111, which `ip rule fwmark 0x111/0xfff lookup 100` routes
//!   to `local default dev lo`: their destination is not this netns's own.
//!
//! A SYN that meets one of ztunnel's TIME_WAIT sockets goes to that socket, which the kernel
//! retires and replaces by asking for a listener; `lookup.rs` answers that lookup with the
//! listener recorded here (`TIME_WAIT_SYNS`). Without the answer the kernel would find the
//! pod's own listener on the original port: a way around ztunnel.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock},
    helpers::bpf_map_update_elem,
    macros::classifier,
    programs::TcContext,
};
use zdivert_common::{
    IpKey, LOOPBACK_IFINDEX, MARK_INPOD_CONN, MARK_INPOD_ZTUNNEL, MARK_MASK, PORT_INBOUND_HBONE,
    PORT_INBOUND_PLAIN, PORT_OUTBOUND, PROBE_SOURCE_V4, PROBE_SOURCE_V6, SynKey, TCX_NEXT,
    pod_counter::*,
};

use crate::{
    dns, dns6,
    maps::{TIME_WAIT_SYNS, count, dns_capture},
    packet::{Frame, IPPROTO_TCP, Ip, LOOPBACK_V4, Tcp, ifindex, is_loopback, mark, parse, tcp},
    socket::{self, Assigned, NotAssigned},
    verdict::{assigned, drop, pass},
};

#[classifier]
pub fn zd_pod_ingress(ctx: TcContext) -> i32 {
    if ifindex(&ctx) == LOOPBACK_IFINDEX {
        turned_back(&ctx)
    } else {
        from_the_wire(&ctx)
    }
}

/// `lo`: the pod's own traffic, ztunnel's included. Only what `egress.rs` turned back (0x111)
/// and, with DNS capture, ztunnel's DNS answers (0x539) are looked at.
#[inline(always)]
fn turned_back(ctx: &TcContext) -> i32 {
    let m = mark(ctx) & MARK_MASK;
    if m != MARK_INPOD_CONN && !(m == MARK_INPOD_ZTUNNEL && dns_capture()) {
        return TCX_NEXT;
    }
    let Frame::Ip(ip) = parse(ctx) else {
        return TCX_NEXT;
    };
    if m == MARK_INPOD_ZTUNNEL {
        let answered = if ip.v6 {
            dns6::answer_from_server(ctx, &ip)
        } else {
            dns::answer_from_server(ctx, &ip, LOOPBACK_V4)
        };
        if answered.is_some() {
            count(INGRESS_DNS);
        }
        return TCX_NEXT;
    }
    // A DNS query readdressed to the proxy on loopback: the stack delivers it as it is.
    if ip.proto != IPPROTO_TCP || is_loopback(&ip.dst, ip.v6) {
        return pass(INGRESS_PASSED);
    }
    let Some(seg) = tcp(ctx, &ip).filter(|_| !ip.fragment) else {
        return drop(INGRESS_DROP_MALFORMED);
    };
    // A segment without SYN was turned back because a socket here is its other end: the
    // stack's own lookup finds it (0x111 routes it to the local table), a second one here
    // would only cost.
    if !seg.is_syn() {
        return pass(INGRESS_PASSED);
    }
    to_ztunnel(ctx, &ip, &seg, PORT_OUTBOUND)
}

/// eth0: traffic to the pod. Not IP, not TCP: passes (ICMP, UDP, neighbour discovery).
#[inline(always)]
fn from_the_wire(ctx: &TcContext) -> i32 {
    let ip = match parse(ctx) {
        Frame::NotIp => return pass(INGRESS_PASSED),
        Frame::Malformed => return drop(INGRESS_DROP_MALFORMED),
        Frame::Ip(ip) => ip,
    };
    if ip.proto != IPPROTO_TCP {
        return pass(INGRESS_PASSED);
    }
    if ip.fragment {
        return drop(INGRESS_DROP_MALFORMED);
    }
    let Some(seg) = tcp(ctx, &ip) else {
        return drop(INGRESS_DROP_MALFORMED);
    };
    if is_probe(&ip) {
        return pass(INGRESS_PASSED);
    }
    // HBONE goes to ztunnel's own :15008, the rest to :15006; either only to ztunnel's socket
    // (a process in the pod may bind the pod's address on either port).
    let port = if seg.dport() == PORT_INBOUND_HBONE {
        PORT_INBOUND_HBONE
    } else {
        PORT_INBOUND_PLAIN
    };
    to_ztunnel(ctx, &ip, &seg, port)
}

/// Assigns the segment to its connection's socket, or to ztunnel's listener on `port`. A SYN
/// that meets one of ztunnel's TIME_WAIT sockets goes to that socket once its listener is in
/// `TIME_WAIT_SYNS` for `lookup.rs`; if it cannot be recorded, the SYN is dropped: the client
/// retransmits, and nothing reaches the pod's own listener.
#[inline(always)]
fn to_ztunnel(ctx: &TcContext, ip: &Ip, seg: &Tcp, port: u16) -> i32 {
    let record = |l: *mut bpf_sock| {
        let key = SynKey {
            remote: ip.src,
            local: ip.dst,
            remote_port_be: seg.sport_be,
            local_port_be: seg.dport_be,
        };
        // The pod's own address: the source of what it sends, the destination of what it is
        // sent.
        let pod = if port == PORT_OUTBOUND {
            ip.src
        } else {
            ip.dst
        };
        // SAFETY: `l` is a live listener reference for both calls.
        unsafe { record(&anchor(pod, port), l) && record(&key, l) }
    };
    let ztunnels = socket::Owner::Marked(MARK_INPOD_ZTUNNEL);
    match socket::to_ztunnel(ctx, ip, seg, port, ztunnels, record) {
        Ok(Assigned::Established) => assigned(INGRESS_ESTABLISHED),
        Ok(Assigned::Listener) => assigned(INGRESS_LISTENER),
        Ok(Assigned::TimeWait) => assigned(INGRESS_TIME_WAIT),
        Ok(Assigned::ListenerAfterTimeWait) => assigned(INGRESS_TIME_WAIT_GONE),
        // ztunnel is not listening in this pod (yet, or any more): nothing gets around it.
        Err(NotAssigned::NoListener) => drop(INGRESS_DROP_NO_LISTENER),
        Err(NotAssigned::Unrecorded) => drop(INGRESS_DROP_UNRECORDED),
        Err(NotAssigned::Refused) => drop(INGRESS_DROP_ASSIGN_REFUSED),
        Err(NotAssigned::NotTheOwners) => drop(INGRESS_DROP_NOT_ZTUNNELS),
    }
}

/// A key no lookup asks for (no remote address, no remote port), under which each listener
/// stays in `TIME_WAIT_SYNS` while it serves the pod. A socket leaves a sock hash for good with
/// its last entry, and an update racing that departure fails (`EBUSY`): without the anchor, the
/// lookup program's delete of one SYN's entry could make the next SYN's update fail.
#[inline(always)]
fn anchor(pod: IpKey, port: u16) -> SynKey {
    SynKey {
        remote: IpKey { addr: [0; 16] },
        local: pod,
        remote_port_be: 0,
        local_port_be: port.to_be(),
    }
}

/// `TIME_WAIT_SYNS[key] = listener`; false if the kernel refused.
///
/// # Safety
/// `listener` must be a live socket reference from a lookup helper.
#[inline(always)]
unsafe fn record(key: &SynKey, listener: *mut bpf_sock) -> bool {
    let map = &TIME_WAIT_SYNS as *const _ as *mut c_void;
    unsafe {
        bpf_map_update_elem(
            map,
            key as *const SynKey as *const c_void,
            listener as *const c_void,
            BPF_ANY as u64,
        ) == 0
    }
}

#[inline(always)]
fn is_probe(ip: &Ip) -> bool {
    if ip.v6 {
        ip.src.words() == IpKey::from_v6(PROBE_SOURCE_V6).words()
    } else {
        ip.src.v4_word() == u32::from_ne_bytes(PROBE_SOURCE_V4)
    }
}
