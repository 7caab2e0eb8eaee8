//! Socket lookups by a packet's TCP 4-tuple, for the programs that must tell whose connection a
//! segment belongs to (ztunnel's, or the node's own).
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};

use zdivert_common::{IpKey, ZtunnelEntry};

use crate::{
    maps::draining,
    packet::{Ip, LOOPBACK_V4, LOOPBACK_V6, Tcp},
};

const V4_TUPLE_LEN: u32 = 12;
const V6_TUPLE_LEN: u32 = 36;
const NETNS: u64 = BPF_F_CURRENT_NETNS as u64;

pub struct Tuple {
    raw: bpf_sock_tuple,
    v6: bool,
}

#[derive(Clone, Copy)]
pub enum Lookup {
    /// `bpf_skc_lookup_tcp`: also request (SYN_RECV) and TIME_WAIT sockets.
    AnyState,
    /// `bpf_sk_lookup_tcp`: full sockets, listeners included.
    FullSocket,
}

impl Tuple {
    #[inline(always)]
    pub fn new(ip: &Ip, seg: &Tcp) -> Self {
        // SAFETY: bpf_sock_tuple is a C union of integer arrays; all-zero is valid.
        let mut raw: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        if ip.v6 {
            let t = unsafe { &mut raw.__bindgen_anon_1.ipv6 };
            t.saddr = ip.src.words();
            t.daddr = ip.dst.words();
            t.sport = seg.sport_be;
            t.dport = seg.dport_be;
        } else {
            let t = unsafe { &mut raw.__bindgen_anon_1.ipv4 };
            t.saddr = ip.src.v4_word();
            t.daddr = ip.dst.v4_word();
            t.sport = seg.sport_be;
            t.dport = seg.dport_be;
        }
        Tuple { raw, v6: ip.v6 }
    }

    #[inline(always)]
    pub fn set_dport(&mut self, port: u16) {
        // Writing a union field is safe; `new` chose the member by family.
        if self.v6 {
            self.raw.__bindgen_anon_1.ipv6.dport = port.to_be();
        } else {
            self.raw.__bindgen_anon_1.ipv4.dport = port.to_be();
        }
    }

    #[inline(always)]
    pub fn set_loopback_dst(&mut self, v6: bool) {
        if v6 {
            self.raw.__bindgen_anon_1.ipv6.daddr = IpKey::from_v6(LOOPBACK_V6).words();
        } else {
            self.raw.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(LOOPBACK_V4);
        }
    }

    /// The socket for this tuple, with a reference the caller must release. The tuple's size
    /// must be a constant for the verifier, hence one call per family.
    #[inline(always)]
    pub fn lookup(&mut self, ctx: &TcContext, how: Lookup) -> *mut bpf_sock {
        self.lookup_in(ctx, how, NETNS)
    }

    /// As `lookup`, in the netns the current one numbers `netns` (an nsid), or in the current
    /// one for `BPF_F_CURRENT_NETNS`.
    #[inline(always)]
    pub fn lookup_in(&mut self, ctx: &TcContext, how: Lookup, netns: u64) -> *mut bpf_sock {
        let skb = ctx.skb.skb as *mut c_void;
        let t: *mut bpf_sock_tuple = &mut self.raw;
        // SAFETY: `t` points to a live tuple of the size passed.
        unsafe {
            match (how, self.v6) {
                (Lookup::AnyState, false) => bpf_skc_lookup_tcp(skb, t, V4_TUPLE_LEN, netns, 0),
                (Lookup::AnyState, true) => bpf_skc_lookup_tcp(skb, t, V6_TUPLE_LEN, netns, 0),
                (Lookup::FullSocket, false) => bpf_sk_lookup_tcp(skb, t, V4_TUPLE_LEN, netns, 0),
                (Lookup::FullSocket, true) => bpf_sk_lookup_tcp(skb, t, V6_TUPLE_LEN, netns, 0),
            }
        }
    }
}

const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;

/// Whether a connection of the netns numbered `netns_id` (a replaced ztunnel's) owns this
/// segment, seen from the receiving end. Listeners and closing sockets do not count: a new
/// connection's segment matches a listener, or a TIME_WAIT socket of an old one that used the
/// same ports, and belongs to the current ztunnel.
#[inline(always)]
pub fn connected_in(ctx: &TcContext, ip: &Ip, seg: &Tcp, netns_id: u32) -> bool {
    let mut tuple = Tuple::new(ip, seg);
    let sk = tuple.lookup_in(ctx, Lookup::AnyState, netns_id as u64);
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket reference from the lookup helper: its state is readable; released once.
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk as *mut c_void) };
    !matches!(state, TCP_LISTEN | TCP_TIME_WAIT | TCP_CLOSE)
}

/// The replaced ztunnel, if it holds this segment's connection. SYNs always belong to the
/// current one, and without a replaced ztunnel nothing is looked up.
#[inline(always)]
pub fn draining_owner(ctx: &TcContext, ip: &Ip, seg: &Tcp) -> Option<ZtunnelEntry> {
    if seg.is_syn() {
        return None;
    }
    let old = draining()?;
    connected_in(ctx, ip, seg, old.netns_id).then_some(old.ztunnel)
}

/// Whether a socket of the current netns (any state, listeners included) owns this segment's
/// connection, seen from the receiving end: the tuple's source is the remote side.
#[inline(always)]
pub fn owned_here(ctx: &TcContext, ip: &Ip, seg: &Tcp) -> bool {
    let mut tuple = Tuple::new(ip, seg);
    let sk = tuple.lookup(ctx, Lookup::AnyState);
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket reference from the lookup helper, released once.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    true
}

/// Whether a connection of the current netns owns this segment, seen from the receiving end:
/// a listener that would take it (the tuple's destination port on a wildcard address) does not
/// count, nor does a closed socket.
#[inline(always)]
pub fn connected_here(ctx: &TcContext, ip: &Ip, seg: &Tcp) -> bool {
    let mut tuple = Tuple::new(ip, seg);
    let sk = tuple.lookup(ctx, Lookup::AnyState);
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket reference from the lookup helper: its state is readable; released once.
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk as *mut c_void) };
    !matches!(state, TCP_LISTEN | TCP_CLOSE)
}

/// Assigns `sk` to the packet (it will skip the kernel's socket lookup) and releases the
/// lookup's reference. False if the kernel refused.
///
/// # Safety
/// `sk` must be a non-null socket returned by a lookup helper and not yet released.
#[inline(always)]
pub unsafe fn assign(ctx: &TcContext, sk: *mut bpf_sock) -> bool {
    let ret = unsafe { bpf_sk_assign(ctx.skb.skb as *mut c_void, sk as *mut c_void, 0) };
    unsafe { bpf_sk_release(sk as *mut c_void) };
    ret == 0
}

/// The listener on `port` (wildcard, else loopback as the original TPROXY rules' `--on-ip
/// 127.0.0.1` expected), with a reference the caller must release; null if there is none.
#[inline(always)]
pub fn listener(ctx: &TcContext, tuple: &mut Tuple, port: u16, v6: bool) -> *mut bpf_sock {
    tuple.set_dport(port);
    let sk = tuple.lookup(ctx, Lookup::FullSocket);
    if !sk.is_null() {
        return sk;
    }
    tuple.set_loopback_dst(v6);
    tuple.lookup(ctx, Lookup::FullSocket)
}
