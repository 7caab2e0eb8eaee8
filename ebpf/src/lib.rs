//! What both objects of this crate need once: the panic handler and the license. The agent's
//! object (`main.rs`) and the bench's floor (`floor.rs`) link it.
#![no_std]

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
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
