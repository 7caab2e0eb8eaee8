//! ztunnel listener lookup: an sk_lookup program attached to ztunnel's netns.
//!
//! The kernel asks for a listener on its own only when a SYN retires a TIME_WAIT socket (see
//! `ztunnel_tproxy::syn_to_time_wait`): every other captured segment already carries the socket
//! the tproxy program assigned. The lookup is for the original destination, where nothing
//! listens; the answer is ztunnel's listener for the connection, chosen as the tproxy program
//! chooses it. Lookups for ztunnel's own addresses are left to the kernel.
use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use zdivert_common::{
    IpKey, PORT_INBOUND_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND, counter::*, listener_slot,
};

use crate::{
    maps::{LISTENERS, count, is_ztunnel_ip, pod, ztunnel},
    packet::IPPROTO_TCP,
};

const AF_INET6: u32 = 10;

/// Reads one field of the kernel's context. The verifier only accepts context loads at a
/// constant offset from the context pointer, so each field is read on its own, volatile, where
/// the compiler cannot merge two of them into one pointer that differs by branch.
macro_rules! field {
    ($ctx:expr, $($f:tt)+) => {
        // SAFETY: the context is the kernel's bpf_sk_lookup, valid while the program runs.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx.lookup).$($f)+)) }
    };
}

#[sk_lookup]
pub fn zd_zt_lookup(ctx: SkLookupContext) -> u32 {
    if field!(ctx, protocol) != IPPROTO_TCP as u32 {
        return SK_PASS;
    }
    // Every address field, read before any branch on the family (see `field!`).
    let v6 = field!(ctx, family) == AF_INET6;
    let (local4, remote4) = (field!(ctx, local_ip4), field!(ctx, remote_ip4));
    let local6 = [
        field!(ctx, local_ip6[0]),
        field!(ctx, local_ip6[1]),
        field!(ctx, local_ip6[2]),
        field!(ctx, local_ip6[3]),
    ];
    let remote6 = [
        field!(ctx, remote_ip6[0]),
        field!(ctx, remote_ip6[1]),
        field!(ctx, remote_ip6[2]),
        field!(ctx, remote_ip6[3]),
    ];
    let local_port = field!(ctx, local_port);
    let (local, remote) = if v6 {
        (addr6(&local6), addr6(&remote6))
    } else {
        (addr4(local4), addr4(remote4))
    };
    // ztunnel's own addresses and loopback are local lookups like any other; only a captured
    // connection carries someone else's address.
    match ztunnel() {
        Some(z) if !is_ztunnel_ip(&z, &local, v6) && !is_loopback(&local, v6) => {}
        _ => return SK_PASS,
    }
    // Outbound segments carry an ambient pod of this node as their source; no other captured
    // segment does (that pod's own TCP is always captured as outbound first).
    let port = if local_port == PORT_INBOUND_HBONE as u32 {
        PORT_INBOUND_HBONE
    } else if pod(&remote).is_some() {
        PORT_OUTBOUND
    } else {
        PORT_INBOUND_PLAIN
    };
    match LISTENERS.redirect_sk_lookup(&ctx, listener_slot(v6, port), 0) {
        Ok(()) => count(LOOKUP_ASSIGNED),
        Err(_) => count(LOOKUP_NO_LISTENER),
    }
    SK_PASS
}

#[inline(always)]
fn addr4(be: u32) -> IpKey {
    IpKey::from_v4(be.to_ne_bytes())
}

#[inline(always)]
fn addr6(words: &[u32; 4]) -> IpKey {
    let [a, b, c, d] = *words;
    let ([a0, a1, a2, a3], [b0, b1, b2, b3]) = (a.to_ne_bytes(), b.to_ne_bytes());
    let ([c0, c1, c2, c3], [d0, d1, d2, d3]) = (c.to_ne_bytes(), d.to_ne_bytes());
    IpKey::from_v6([
        a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3,
    ])
}

#[inline(always)]
fn is_loopback(ip: &IpKey, v6: bool) -> bool {
    let a = &ip.addr;
    if v6 {
        a[..15].iter().all(|b| *b == 0) && a[15] == 1
    } else {
        a[12] == 127
    }
}
