//! Socket lookups by a packet's TCP 4-tuple, for the programs that must tell whose connection a
//! segment belongs to (ztunnel's, or the node's own).
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_CLOSE, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, bpf_sock,
        bpf_sock_tuple,
    },
    helpers::{
        bpf_get_listener_sock, bpf_sk_assign, bpf_sk_fullsock, bpf_sk_lookup_tcp, bpf_sk_release,
        bpf_skc_lookup_tcp,
    },
    programs::TcContext,
};

use zdivert_common::{IpKey, MARK_MASK, ZtunnelEntry};

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
    !matches!(state, BPF_TCP_LISTEN | BPF_TCP_TIME_WAIT | BPF_TCP_CLOSE)
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
    !matches!(state, BPF_TCP_LISTEN | BPF_TCP_CLOSE)
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

/// Whose sockets redirected traffic may be given to.
#[derive(Clone, Copy)]
pub enum Owner {
    /// Any socket: ztunnel's netns holds only ztunnel's (node level).
    Any,
    /// Only sockets carrying this mark (in-pod: ztunnel marks every socket it makes in a pod
    /// 0x539, which a pod's own process cannot set without NET_ADMIN; accepted sockets inherit
    /// their listener's).
    Marked(u32),
}

impl Owner {
    /// Whether `sk` is the owner's: a full socket by its own mark, a request socket (SYN_RECV)
    /// by its listener's. TIME_WAIT sockets are nobody's to check, and inert: they deliver no
    /// data, so they pass (a SYN that meets one is handled apart).
    ///
    /// # Safety
    /// `sk` must be a live socket reference from a lookup helper.
    #[inline(always)]
    unsafe fn owns(self, sk: *mut bpf_sock) -> bool {
        let Owner::Marked(mark) = self else {
            return true;
        };
        // SAFETY: the helpers take any live socket pointer; what they return is readable and
        // needs no release (it is `sk` itself or its listener, held under RCU).
        unsafe {
            if (*sk).state == BPF_TCP_TIME_WAIT {
                return true;
            }
            let full = bpf_sk_fullsock(sk);
            if !full.is_null() {
                return (*full).mark & MARK_MASK == mark;
            }
            let listener = bpf_get_listener_sock(sk);
            !listener.is_null() && (*listener).mark & MARK_MASK == mark
        }
    }

    /// As `owns`, for a socket from a full-socket lookup: the verifier lets its mark be read
    /// directly, which spares a helper call on every SYN.
    ///
    /// # Safety
    /// `sk` must be a live socket reference from `Lookup::FullSocket`.
    #[inline(always)]
    unsafe fn owns_full(self, sk: *mut bpf_sock) -> bool {
        match self {
            Owner::Any => true,
            // SAFETY: a full socket's fields are readable.
            Owner::Marked(mark) => (unsafe { (*sk).mark } & MARK_MASK) == mark,
        }
    }
}

/// The owner's listener on `port`: on the segment's own destination address, else on loopback
/// (as the original TPROXY rules' `--on-ip 127.0.0.1` expected); with a reference the caller
/// must release. A listener that is not the owner's (a process in the pod bound the port on
/// the pod's address) is passed over for the loopback lookup, which only a wildcard or
/// loopback listener answers: ztunnel's.
#[inline(always)]
pub fn listener(
    ctx: &TcContext,
    tuple: &mut Tuple,
    port: u16,
    v6: bool,
    owner: Owner,
) -> Result<*mut bpf_sock, NotAssigned> {
    tuple.set_dport(port);
    let sk = tuple.lookup(ctx, Lookup::FullSocket);
    let mut squatted = false;
    if !sk.is_null() {
        // SAFETY: a live reference from the lookup, kept or released here.
        if unsafe { owner.owns_full(sk) } {
            return Ok(sk);
        }
        unsafe { bpf_sk_release(sk as *mut c_void) };
        squatted = true;
    }
    tuple.set_loopback_dst(v6);
    let sk = tuple.lookup(ctx, Lookup::FullSocket);
    if sk.is_null() {
        return Err(if squatted {
            NotAssigned::NotTheOwners
        } else {
            NotAssigned::NoListener
        });
    }
    // SAFETY: as above.
    if unsafe { owner.owns_full(sk) } {
        return Ok(sk);
    }
    unsafe { bpf_sk_release(sk as *mut c_void) };
    Err(NotAssigned::NotTheOwners)
}

/// Which socket of ztunnel's took a captured segment.
#[derive(Clone, Copy)]
pub enum Assigned {
    /// Its connection's (request sockets in SYN_RECV included).
    Established,
    /// ztunnel's listener for the segment's direction.
    Listener,
    /// A SYN given to the TIME_WAIT socket that holds its 4-tuple, the listener recorded for
    /// the sk_lookup program that answers the kernel's lookup when it retires that socket.
    TimeWait,
    /// As `TimeWait`, but the TIME_WAIT socket went while we looked: the listener took it.
    ListenerAfterTimeWait,
}

/// Why a captured segment was not assigned (it must then be dropped: nothing gets around
/// ztunnel).
#[derive(Clone, Copy)]
pub enum NotAssigned {
    /// ztunnel has no listener for it (not yet, or not any more).
    NoListener,
    /// A SYN met a TIME_WAIT socket and its listener could not be recorded: the client
    /// retransmits.
    Unrecorded,
    /// The kernel refused the assignment.
    Refused,
    /// The segment's socket, or the listener, is not ztunnel's (a process in the pod holds
    /// it): it would get traffic meant for ztunnel.
    NotTheOwners,
}

/// The socket-assignment steps of both tproxy programs (ztunnel's netns, and in-pod): the
/// segment's connection's socket if there is one; a SYN that meets a TIME_WAIT socket goes to
/// it once `record` kept the listener for the sk_lookup program; anything else to ztunnel's
/// listener on `port`. A listener on the segment's own port is never its connection's.
#[inline(always)]
pub fn to_ztunnel(
    ctx: &TcContext,
    ip: &Ip,
    seg: &Tcp,
    port: u16,
    owner: Owner,
    record: impl FnOnce(*mut bpf_sock) -> bool,
) -> Result<Assigned, NotAssigned> {
    let mut tuple = Tuple::new(ip, seg);
    let sk = tuple.lookup(ctx, Lookup::AnyState);
    if !sk.is_null() {
        // SAFETY: a socket reference from the lookup helper: its state is readable; it is
        // assigned or released once on every path.
        let state = unsafe { (*sk).state };
        if state == BPF_TCP_TIME_WAIT && seg.is_syn() {
            return unsafe { syn_to_time_wait(ctx, sk, &mut tuple, port, ip.v6, owner, record) };
        }
        if state != BPF_TCP_LISTEN {
            // A connection of a process in the pod (a simultaneous open, a connection made
            // while ztunnel was away) never gets what was captured for ztunnel.
            if !unsafe { owner.owns(sk) } {
                unsafe { bpf_sk_release(sk as *mut c_void) };
                return Err(NotAssigned::NotTheOwners);
            }
            return unsafe { assign_or(ctx, sk, Assigned::Established) };
        }
        // HBONE arrives on ztunnel's own port: the lookup already found the listener that
        // `listener` would look up first (the same tuple), so it is not looked up twice.
        if seg.dport() == port && unsafe { owner.owns(sk) } {
            return unsafe { assign_or(ctx, sk, Assigned::Listener) };
        }
        unsafe { bpf_sk_release(sk as *mut c_void) };
    }
    let l = listener(ctx, &mut tuple, port, ip.v6, owner)?;
    // SAFETY: a live reference from the lookup helper.
    unsafe { assign_or(ctx, l, Assigned::Listener) }
}

/// # Safety
/// `tw` must be a TIME_WAIT socket reference from a lookup helper, not yet released.
#[inline(always)]
unsafe fn syn_to_time_wait(
    ctx: &TcContext,
    tw: *mut bpf_sock,
    tuple: &mut Tuple,
    port: u16,
    v6: bool,
    owner: Owner,
    record: impl FnOnce(*mut bpf_sock) -> bool,
) -> Result<Assigned, NotAssigned> {
    let l = match listener(ctx, tuple, port, v6, owner) {
        Ok(l) => l,
        Err(e) => {
            // SAFETY: the TIME_WAIT reference, released once.
            unsafe { bpf_sk_release(tw as *mut c_void) };
            return Err(e);
        }
    };
    // SAFETY: references from the lookup helpers, each released or assigned once below.
    unsafe {
        if !record(l) {
            bpf_sk_release(l as *mut c_void);
            bpf_sk_release(tw as *mut c_void);
            return Err(NotAssigned::Unrecorded);
        }
        if assign(ctx, tw) {
            bpf_sk_release(l as *mut c_void);
            return Ok(Assigned::TimeWait);
        }
        // The TIME_WAIT socket is on its way out (its last reference went while we looked):
        // the listener takes the SYN, as it would a moment later.
        assign_or(ctx, l, Assigned::ListenerAfterTimeWait)
    }
}

/// # Safety
/// As `assign`.
#[inline(always)]
unsafe fn assign_or(
    ctx: &TcContext,
    sk: *mut bpf_sock,
    assigned: Assigned,
) -> Result<Assigned, NotAssigned> {
    if unsafe { assign(ctx, sk) } {
        Ok(assigned)
    } else {
        Err(NotAssigned::Refused)
    }
}
