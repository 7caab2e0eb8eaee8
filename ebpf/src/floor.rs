//! A program that does nothing, in an object of its own: the floor `cargo xtask bench` measures
//! the other programs' per-packet cost against (the cost of running any TC program at all).
//! Kept out of the agent's object, which holds only what a node runs.
#![no_std]
#![no_main]

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[aya_ebpf::macros::classifier]
pub fn zd_floor(_ctx: aya_ebpf::programs::TcContext) -> i32 {
    zdivert_common::TCX_NEXT
}
