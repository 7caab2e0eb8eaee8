//! ztunnel tproxy: TC ingress of ztunnel's eth0, inside ztunnel's netns.
//!
//! Captured segments arrive here addressed to someone else (the original destination). Each is
//! assigned to a ztunnel socket with `bpf_sk_assign`: the connection's own socket if there is one
//! (including half-open request sockets and ztunnel's spoofed upstream sockets), else the
//! listener: :15001 for outbound, :15008 for HBONE, :15006 for other inbound. The 0x400 mark then
//! routes it to `local 0.0.0.0/0 dev lo` (ip rule 20000, table 100). This replaces TPROXY: there is
//! no iptables in ztunnel's netns in eBPF mode.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, TC_ACT_OK, TC_ACT_SHOT, bpf_sock},
    helpers::{bpf_map_update_elem, bpf_sk_release},
    macros::classifier,
    programs::TcContext,
};
use zdivert_common::{
    MARK_MASK, MARK_OUTBOUND, MARK_TPROXY, PORT_INBOUND_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND,
    TCX_NEXT, counter::*, listener_slot,
};

use crate::{
    maps::{LISTENERS, count, is_ztunnel_ip, ztunnel},
    packet::{Frame, IPPROTO_TCP, Ip, Tcp, icmp_error_quote, mark, parse, tcp},
    socket::{self, Lookup, Tuple, listener},
};

#[classifier]
pub fn zd_zt_tproxy(ctx: TcContext) -> i32 {
    let Frame::Ip(ip) = parse(&ctx) else {
        return pass();
    };
    if ip.proto != IPPROTO_TCP {
        return icmp_error(&ctx, &ip);
    }
    // Traffic addressed to ztunnel itself (its own connections' replies, direct clients) is
    // ordinary local traffic; only captured segments carry someone else's address.
    match ztunnel() {
        Some(z) if !is_ztunnel_ip(&z, &ip.dst, ip.v6) => {}
        _ => return pass(),
    }
    if ip.fragment {
        return drop(TP_DROP_MALFORMED);
    }
    let Some(seg) = tcp(&ctx, &ip) else {
        return drop(TP_DROP_MALFORMED);
    };

    let mut tuple = Tuple::new(&ip, &seg);
    // SAFETY: helper contract: tuple points to a live stack buffer of the given length; every
    // socket returned is released on every path below.
    unsafe {
        let sk = tuple.lookup(&ctx, Lookup::AnyState);
        if !sk.is_null() {
            let state = (*sk).state;
            if state == BPF_TCP_TIME_WAIT && seg.is_syn() {
                return syn_to_time_wait(&ctx, sk, &mut tuple, &ip, &seg);
            }
            // A listener on the original port is not this connection's socket.
            if state != BPF_TCP_LISTEN {
                return assign(&ctx, sk, TP_ESTABLISHED);
            }
            bpf_sk_release(sk as *mut c_void);
        }
        let listener = listener(&ctx, &mut tuple, listener_port(&ctx, &seg), ip.v6);
        if listener.is_null() {
            // ztunnel is not listening: nothing may pass around it.
            return drop(TP_DROP_NO_LISTENER);
        }
        assign(&ctx, listener, TP_LISTENER)
    }
}

/// A SYN whose 4-tuple a TIME_WAIT socket still holds (ztunnel closed first, and the client
/// reuses its port). Given to the listener, it would be dropped: its request cannot be hashed
/// beside the TIME_WAIT socket, and the client would wait for a retransmission. Given to the
/// TIME_WAIT socket, the kernel retires it when the SYN is acceptable and asks for a listener,
/// a lookup the sk_lookup program answers with the listener recorded here.
///
/// # Safety
/// `tw` must be a TIME_WAIT socket reference from a lookup helper, not yet released.
#[inline(always)]
unsafe fn syn_to_time_wait(
    ctx: &TcContext,
    tw: *mut bpf_sock,
    tuple: &mut Tuple,
    ip: &Ip,
    seg: &Tcp,
) -> i32 {
    let port = listener_port(ctx, seg);
    let listener = listener(ctx, tuple, port, ip.v6);
    if listener.is_null() {
        unsafe { bpf_sk_release(tw as *mut c_void) };
        return drop(TP_DROP_NO_LISTENER);
    }
    unsafe {
        record_listener(listener, listener_slot(ip.v6, port));
        bpf_sk_release(listener as *mut c_void);
        assign(ctx, tw, TP_TIME_WAIT_REUSED)
    }
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
        return pass();
    };
    match ztunnel() {
        Some(z) if quoted.proto == IPPROTO_TCP && !is_ztunnel_ip(&z, &ip.dst, ip.v6) => {
            ctx.skb.set_mark((mark(ctx) & !MARK_MASK) | MARK_TPROXY);
            pass()
        }
        _ => pass(),
    }
}

/// Assigns `sk` to the packet and releases the lookup's reference.
///
/// # Safety
/// `sk` must be a non-null socket returned by a lookup helper and not yet released.
#[inline(always)]
unsafe fn assign(ctx: &TcContext, sk: *mut bpf_sock, counter: u32) -> i32 {
    if !unsafe { socket::assign(ctx, sk) } {
        return drop(TP_DROP_NO_LISTENER);
    }
    ctx.skb.set_mark((mark(ctx) & !MARK_MASK) | MARK_TPROXY);
    count(counter);
    TC_ACT_OK as i32
}

#[inline(always)]
fn pass() -> i32 {
    count(TP_PASSED);
    TCX_NEXT
}

#[inline(always)]
fn drop(counter: u32) -> i32 {
    count(counter);
    TC_ACT_SHOT as i32
}
