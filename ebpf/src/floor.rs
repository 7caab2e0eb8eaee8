//! A program that does nothing, in an object of its own: the floor `cargo xtask bench` measures
//! the other programs' per-packet cost against (the cost of running any TC program at all).
//! Kept out of the agent's object, which holds only what a node runs.
#![no_std]
#![no_main]

// The panic handler and the license.
use zdivert_ebpf as _;

#[aya_ebpf::macros::classifier]
pub fn zd_floor(_ctx: aya_ebpf::programs::TcContext) -> i32 {
    zdivert_common::TCX_NEXT
}
