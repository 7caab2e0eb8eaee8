//! zdivert's TC programs: one module per packet path (docs/design.md).
//!
//! Every program returns a verdict that means what it says: `TCX_NEXT` for traffic zdivert does
//! not own (so the cluster CNI's programs still see it), `TC_ACT_REDIRECT` from the redirect
//! helpers, `TC_ACT_OK` only after a socket was assigned, `TC_ACT_SHOT` for what must not pass.
#![no_std]
#![no_main]

mod dns;
mod dns6;
mod lookup_ctx;
mod maps;
mod packet;
mod socket;

mod hold;
mod inbound;
mod outbound;
mod ztunnel_lookup;
mod ztunnel_return;
mod ztunnel_tproxy;

mod pod_egress;
mod pod_ingress;
mod pod_lookup;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction (no indexing or unwrap on packet data); the verifier would
    // reject a program that could get here with an unbounded loop anyway.
    loop {}
}

/// The kernel's spelling of this crate's license (`MIT OR GPL-2.0-only`, see its Cargo.toml):
/// the verifier offers GPL-only helpers only to programs that declare a GPL-compatible
/// license, and the kernel has no spelling for the workspace's Apache-2.0.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
