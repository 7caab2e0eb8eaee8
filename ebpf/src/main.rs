//! zdivert's TC programs: one module per packet path (docs/design.md).
//!
//! Every program returns a verdict that means what it says: `TCX_NEXT` for traffic zdivert does
//! not own (so the cluster CNI's programs still see it), `TC_ACT_REDIRECT` from the redirect
//! helpers, `TC_ACT_OK` only after a socket was assigned, `TC_ACT_SHOT` for what must not pass.
#![no_std]
#![no_main]

mod dns;
mod maps;
mod packet;
mod socket;

mod hold;
mod inbound;
mod outbound;
mod ztunnel_lookup;
mod ztunnel_return;
mod ztunnel_tproxy;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction (no indexing or unwrap on packet data); the verifier would
    // reject a program that could get here with an unbounded loop anyway.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Does nothing: the floor `cargo xtask bench` measures the other programs' per-packet cost
/// against (the cost of running any TC program at all). Never attached.
#[aya_ebpf::macros::classifier]
pub fn zd_floor(_ctx: aya_ebpf::programs::TcContext) -> i32 {
    zdivert_common::TCX_NEXT
}
