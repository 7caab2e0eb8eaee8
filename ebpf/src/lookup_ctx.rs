//! The fields of an sk_lookup context, read the one way the verifier accepts.
use aya_ebpf::programs::SkLookupContext;
use zdivert_common::IpKey;

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

/// The lookup the kernel is making: for which connection it wants a listening socket.
pub struct Wanted {
    pub protocol: u32,
    pub v6: bool,
    pub local: IpKey,
    pub remote: IpKey,
    /// Host byte order, as the kernel gives it.
    pub local_port: u32,
    /// Network byte order, as the kernel gives it.
    pub remote_port_be: u16,
}

#[inline(always)]
pub fn wanted(ctx: &SkLookupContext) -> Wanted {
    // Every field, read before any branch on the family (see `field!`).
    let protocol = field!(ctx, protocol);
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
    let remote_port = field!(ctx, remote_port);
    let (local, remote) = if v6 {
        (addr6(&local6), addr6(&remote6))
    } else {
        (addr4(local4), addr4(remote4))
    };
    Wanted {
        protocol,
        v6,
        local,
        remote,
        local_port,
        remote_port_be: remote_port,
    }
}

#[inline(always)]
fn addr4(be: u32) -> IpKey {
    IpKey::from_v4_word(be)
}

#[inline(always)]
fn addr6(words: &[u32; 4]) -> IpKey {
    IpKey::from_words(*words)
}
