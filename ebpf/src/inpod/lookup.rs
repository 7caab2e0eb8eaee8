//! In-pod capture: an sk_lookup program attached to each ambient pod's netns.
//!
//! The kernel asks for a listener on its own for a segment `ingress.rs` did not assign (the
//! pod's local connections, ztunnel's connections to the pod) and when a SYN retires one of
//! ztunnel's TIME_WAIT sockets. Only the last is answered: with the listener `ingress.rs`
//! recorded for that very SYN, taken out of the map as it is used. Everything else is left to
//! the kernel.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::sk_action::SK_PASS, helpers::bpf_map_delete_elem, macros::sk_lookup,
    programs::SkLookupContext,
};
use zdivert_common::{SynKey, pod_counter::*};

use crate::{
    lookup_ctx::wanted,
    maps::{TIME_WAIT_SYNS, count},
    packet::IPPROTO_TCP,
};

#[sk_lookup]
pub fn zd_pod_lookup(ctx: SkLookupContext) -> u32 {
    let w = wanted(&ctx);
    if w.protocol != IPPROTO_TCP as u32 {
        return SK_PASS;
    }
    let key = SynKey {
        remote: w.remote,
        local: w.local,
        remote_port_be: w.remote_port_be,
        local_port_be: (w.local_port as u16).to_be(),
    };
    if TIME_WAIT_SYNS.redirect_sk_lookup(&ctx, &key, 0).is_ok() {
        count(LOOKUP_ASSIGNED);
        let map = &TIME_WAIT_SYNS as *const _ as *mut c_void;
        // SAFETY: the key lives on the stack for the call. A failed delete leaves an entry
        // that only this exact 4-tuple's next TIME_WAIT SYN would meet, and it overwrites it.
        let _ = unsafe { bpf_map_delete_elem(map, &key as *const SynKey as *const c_void) };
    }
    SK_PASS
}
