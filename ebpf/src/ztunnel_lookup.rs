//! ztunnel listener lookup: an sk_lookup program attached to ztunnel's netns.
//!
//! The kernel asks for a listener on its own when a SYN retires a TIME_WAIT socket (see
//! `socket::to_ztunnel`), and for a segment of no connection (the tproxy program leaves
//! segments without SYN to the stack's lookup): every other captured SYN already carries the
//! socket the tproxy program assigned. The lookup is for the original destination, where
//! nothing listens; the answer is ztunnel's listener for the connection, chosen as the tproxy
//! program chooses it. Lookups for ztunnel's own addresses are left to the kernel.
use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use zdivert_common::{
    PORT_INBOUND_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND, counter::*, listener_slot,
};

use crate::{
    lookup_ctx::{Wanted, wanted},
    maps::{LISTENERS, count, is_ztunnel_ip, pod, ztunnel},
    packet::{IPPROTO_TCP, is_loopback},
};

#[sk_lookup]
pub fn zd_zt_lookup(ctx: SkLookupContext) -> u32 {
    let Wanted {
        protocol,
        v6,
        local,
        remote,
        local_port,
        ..
    } = wanted(&ctx);
    if protocol != IPPROTO_TCP as u32 {
        return SK_PASS;
    }
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
