//! ztunnel tproxy: TC ingress of ztunnel's eth0, inside ztunnel's netns.
//!
//! Captured segments arrive here addressed to someone else (the original destination). The
//! 0x400 mark routes each to `local 0.0.0.0/0 dev lo` (ip rule 20000, table 100), where the
//! stack's own lookup finds the socket of a connection (including half-open request sockets and
//! ztunnel's spoofed upstream sockets). A SYN is assigned with `bpf_sk_assign`: to its
//! connection's socket if there is one (TIME_WAIT, a simultaneous open), else to the listener:
//! :15001 for outbound, :15008 for HBONE, :15006 for other inbound. This replaces TPROXY: there
//! is no iptables in ztunnel's netns in eBPF mode.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock},
    helpers::bpf_map_update_elem,
    macros::classifier,
    programs::TcContext,
};
use zdivert_common::{
    MARK_MASK, MARK_OUTBOUND, MARK_TPROXY, PORT_INBOUND_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND,
    counter::*, listener_slot,
};

use crate::{
    maps::{LISTENERS, is_ztunnel_ip, ztunnel},
    packet::{Frame, IPPROTO_TCP, Ip, Tcp, icmp_error_quote, mark, parse, tcp},
    socket::{self, Assigned, NotAssigned},
    verdict::{assigned, drop, local, pass},
};

#[classifier]
pub fn zd_zt_tproxy(ctx: TcContext) -> i32 {
    let Frame::Ip(ip) = parse(&ctx) else {
        return pass(TP_PASSED);
    };
    if ip.proto != IPPROTO_TCP {
        return icmp_error(&ctx, &ip);
    }
    // Traffic addressed to ztunnel itself (its own connections' replies, direct clients) is
    // ordinary local traffic; only captured segments carry someone else's address.
    match ztunnel() {
        Some(z) if !is_ztunnel_ip(&z, &ip.dst, ip.v6) => {}
        _ => return pass(TP_PASSED),
    }
    if ip.fragment {
        return drop(TP_DROP_MALFORMED);
    }
    let Some(seg) = tcp(&ctx, &ip) else {
        return drop(TP_DROP_MALFORMED);
    };

    // A segment of a connection (anything but a SYN) is left to the stack's own socket lookup,
    // the one it would make anyway: marked, it is routed to the local table, where the stack
    // finds ztunnel's socket, be it established, a request or TIME_WAIT (as the rules'
    // `-m socket --transparent` mark did). Every socket of this netns is ztunnel's, so none
    // needs an owner check (in-pod, where that is not so, every segment is looked up). A
    // segment of no connection finds no socket, or the listener `ztunnel_lookup.rs` answers
    // with, and is reset, as the listener would have reset it.
    if !seg.is_syn() {
        ctx.skb.set_mark((mark(&ctx) & !MARK_MASK) | MARK_TPROXY);
        return local(TP_TO_STACK);
    }
    let port = listener_port(&ctx, &seg);
    // A SYN that meets a TIME_WAIT socket (ztunnel closed first, and the client reuses its
    // port) goes to that socket: given to the listener, it would be dropped, its request
    // unhashable beside the TIME_WAIT socket, and the client would wait for a retransmission.
    // The kernel retires the socket when the SYN is acceptable and asks for a listener, which
    // `ztunnel_lookup.rs` answers with the one recorded here.
    let record = |l: *mut bpf_sock| {
        // SAFETY: `l` is a live listener reference.
        unsafe { record_listener(l, listener_slot(ip.v6, port)) };
        true
    };
    let counter = match socket::to_ztunnel(&ctx, &ip, &seg, port, socket::Owner::Any, record) {
        Ok(Assigned::Established) => TP_ESTABLISHED,
        Ok(Assigned::Listener | Assigned::ListenerAfterTimeWait) => TP_LISTENER,
        Ok(Assigned::TimeWait) => TP_TIME_WAIT_REUSED,
        // ztunnel is not listening: nothing may pass around it.
        // (Owner::Any: every socket of ztunnel's netns is ztunnel's, none is `NotTheOwners`.)
        Err(NotAssigned::NoListener | NotAssigned::Unrecorded | NotAssigned::NotTheOwners) => {
            return drop(TP_DROP_NO_LISTENER);
        }
        Err(NotAssigned::Refused) => return drop(TP_DROP_ASSIGN_REFUSED),
    };
    ctx.skb.set_mark((mark(&ctx) & !MARK_MASK) | MARK_TPROXY);
    assigned(counter)
}

/// ztunnel's listener for a captured connection: :15001 for outbound (the outbound program
/// marked it), :15008 for HBONE, :15006 for other inbound.
#[inline(always)]
fn listener_port(ctx: &TcContext, seg: &Tcp) -> u16 {
    if mark(ctx) & MARK_OUTBOUND != 0 {
        PORT_OUTBOUND
    } else if seg.dport() == PORT_INBOUND_HBONE {
        PORT_INBOUND_HBONE
    } else {
        PORT_INBOUND_PLAIN
    }
}

/// Keeps `LISTENERS[slot]` on the listener the sk_lookup program must answer with. Done only
/// for a SYN that meets a TIME_WAIT socket, so always current (a restarted ztunnel's old
/// listeners leave the map when they close) and never on the common path.
///
/// # Safety
/// `listener` must be a live socket reference from a lookup helper.
#[inline(always)]
unsafe fn record_listener(listener: *mut bpf_sock, slot: u32) {
    let map = &LISTENERS as *const _ as *mut c_void;
    // A failed update leaves the slot as it was; the kernel then answers the SYN with a
    // challenge ACK, as it would without zdivert.
    let _ = unsafe {
        bpf_map_update_elem(
            map,
            &slot as *const u32 as *const c_void,
            listener as *const c_void,
            BPF_ANY as u64,
        )
    };
}

/// An ICMP error the inbound program handed over, addressed to a pod in whose name ztunnel
/// connected: delivered locally (mark 0x400), where the stack gives it to the socket the quoted
/// tuple names, ztunnel's.
#[inline(always)]
fn icmp_error(ctx: &TcContext, ip: &Ip) -> i32 {
    let Some(quoted) = icmp_error_quote(ctx, ip) else {
        return pass(TP_PASSED);
    };
    match ztunnel() {
        Some(z) if quoted.proto == IPPROTO_TCP && !is_ztunnel_ip(&z, &ip.dst, ip.v6) => {
            ctx.skb.set_mark((mark(ctx) & !MARK_MASK) | MARK_TPROXY);
            pass(TP_PASSED)
        }
        _ => pass(TP_PASSED),
    }
}
