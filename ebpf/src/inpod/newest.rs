//! In-pod mode, ztunnel rollouts: the SO_REUSEPORT program on ztunnel's listener groups in
//! each pod's netns.
//!
//! During a rollout two ztunnels listen side by side in every pod, and the kernel alone would
//! hash each new connection to either of them: the old one's connections then meet its
//! closing listeners, and the new one's HBONE connections meet the old one's draining server.
//! The agent records, for each pod address and ztunnel port, the listener of the newest
//! ztunnel that acked the pod (`ZTUNNEL_NEWEST`). Every new connection goes there, whatever
//! hash or assignment found the group; when a listener closes, the connections queued on it
//! move there instead of being reset (attached as `select_or_migrate`). Where nothing is
//! recorded (or the recorded listener closed), the kernel's own choice stands: this program
//! only ever chooses among ztunnel's listeners, and never drops.
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock, sk_action::SK_PASS},
    helpers::{bpf_sk_select_reuseport, bpf_skb_load_bytes_relative},
    macros::sk_reuseport,
    programs::SkReuseportContext,
};
use zdivert_common::{IpKey, ListenerKey, PORT_OUTBOUND, pod_counter::*};

use crate::maps::{ZTUNNEL_NEWEST, count};

const AF_INET6: u32 = 10;
const ETH_P_IPV6_BE: u32 = 0x86dd_u16.to_be() as u32;

#[sk_reuseport(migrate)]
pub fn zd_zt_newest(ctx: SkReuseportContext) -> u32 {
    // SAFETY: context fields, read at constant offsets; the socket is checked before use.
    let (listener, moved) = unsafe {
        (
            (*ctx.md).__bindgen_anon_3.sk,
            (*ctx.md).__bindgen_anon_4.migrating_sk,
        )
    };
    let key = match listener_key(&ctx, listener, moved) {
        Some(key) => key,
        None => return kernel_choice(),
    };
    let map = &ZTUNNEL_NEWEST as *const _ as *mut c_void;
    // SAFETY: the context is the kernel's, the map ours, the key on the stack for the call.
    let selected = unsafe {
        bpf_sk_select_reuseport(ctx.md, map, &key as *const ListenerKey as *mut c_void, 0)
    };
    if selected != 0 {
        // Nothing recorded (or that ztunnel's listener closed), or a listener of another group.
        return kernel_choice();
    }
    count(if !moved.is_null() {
        NEWEST_MIGRATED
    } else {
        NEWEST_SELECTED
    });
    SK_PASS
}

#[inline(always)]
fn kernel_choice() -> u32 {
    count(NEWEST_KERNEL_CHOICE);
    SK_PASS
}

/// The pod's address on this connection and ztunnel's port it is for. The pod is the client
/// of what goes to :15001, the server of the rest. A new connection is read from its packet's
/// IP header; a queued one being moved, from its socket (there may be no packet).
#[inline(always)]
fn listener_key(
    ctx: &SkReuseportContext,
    listener: *mut bpf_sock,
    moved: *mut bpf_sock,
) -> Option<ListenerKey> {
    // SAFETY: the verifier types `sk` as a socket, present whenever the program runs.
    let port = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*listener).src_port)) };
    let pod_is_client = port == PORT_OUTBOUND as u32;
    let addr = if moved.is_null() {
        from_packet(ctx, pod_is_client)?
    } else {
        // SAFETY: checked non-null above; the verifier allows these sock_common fields.
        unsafe { from_socket(moved, pod_is_client) }
    };
    Some(ListenerKey {
        addr,
        port: port as u16,
        _reserved: 0,
    })
}

#[inline(always)]
fn from_packet(ctx: &SkReuseportContext, pod_is_client: bool) -> Option<IpKey> {
    let v6 = ctx.eth_protocol() == ETH_P_IPV6_BE;
    // IPv4: source at 12, destination at 16; IPv6: source at 8, destination at 24.
    let offset = match (v6, pod_is_client) {
        (false, true) => 12,
        (false, false) => 16,
        (true, true) => 8,
        (true, false) => 24,
    };
    let len = if v6 { 16 } else { 4 };
    let mut words = [0u32; 4];
    // SAFETY: at most 16 bytes into a 16-byte buffer; the helper checks the packet's bounds.
    let read = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr() as *const c_void,
            offset,
            words.as_mut_ptr() as *mut c_void,
            len,
            BPF_HDR_START_NET,
        )
    };
    if read != 0 {
        return None;
    }
    Some(if v6 {
        IpKey::from_words(words)
    } else {
        IpKey::from_v4_word(words[0])
    })
}

/// Every field read before branching on the family: the verifier accepts a context field load
/// only at a constant offset.
#[inline(always)]
unsafe fn from_socket(sk: *mut bpf_sock, pod_is_client: bool) -> IpKey {
    macro_rules! field {
        ($($f:tt)+) => {
            // SAFETY: the caller's pointer, valid while the program runs.
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).$($f)+)) }
        };
    }
    let v6 = field!(family) == AF_INET6;
    let (local4, remote4) = (field!(src_ip4), field!(dst_ip4));
    let local6 = [
        field!(src_ip6[0]),
        field!(src_ip6[1]),
        field!(src_ip6[2]),
        field!(src_ip6[3]),
    ];
    let remote6 = [
        field!(dst_ip6[0]),
        field!(dst_ip6[1]),
        field!(dst_ip6[2]),
        field!(dst_ip6[3]),
    ];
    match (v6, pod_is_client) {
        (false, true) => IpKey::from_v4_word(remote4),
        (false, false) => IpKey::from_v4_word(local4),
        (true, true) => IpKey::from_words(remote6),
        (true, false) => IpKey::from_words(local6),
    }
}
