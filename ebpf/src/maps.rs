//! The maps, as BTF maps: the object carries their key and value types, so `bpftool map dump`
//! prints named fields. The agent pins each under `<PIN_ROOT>/<node>/maps/<name>`
//! (`zdivert_common::map`), so that a restarted agent finds the very maps the attached programs
//! use.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash, SockMap},
    macros::btf_map,
};
use zdivert_common::{
    CONFIG_DNS_CAPTURE, Counter, DNS_FLOWS_MAX_ENTRIES, DnsFlow, DnsFlow6, DnsFlowKey, DnsFlowKey6,
    DrainingZtunnel, INPOD_SENDERS_MAX_ENTRIES, IpKey, LISTENER_SLOTS, ListenerKey,
    NODE_IP_FILTER_WORDS, NODE_IPS_MAX_ENTRIES, PACKET_STATS_SLOTS, PODS_MAX_ENTRIES, PodEntry,
    PodMac, SynKey, TIME_WAIT_SYNS_MAX_ENTRIES, ZTUNNEL_F_PRESENT, ZTUNNEL_F_V4, ZTUNNEL_F_V6,
    ZTUNNEL_NEWEST_MAX_ENTRIES, ZtunnelEntry,
};

/// Ambient pods on this node: pod IP (each of its addresses) → its host veth.
#[btf_map]
pub static PODS: HashMap<IpKey, PodEntry, { PODS_MAX_ENTRIES as usize }> = HashMap::new();

/// The node's own addresses: traffic between them and pods (kubelet probes) is not captured.
#[btf_map]
pub static NODE_IPS: HashMap<IpKey, u32, { NODE_IPS_MAX_ENTRIES as usize }> = HashMap::new();

/// A filter over `NODE_IPS`, a bit per address folded (`IpKey::node_filter_bit`): a clear bit
/// says "not the node's" without the hash lookup every captured segment would otherwise pay.
/// The agent sets bits after it adds addresses and clears them after it removes them, so a
/// clear bit is never wrong; a set bit only sends to the lookup.
#[btf_map]
pub static NODE_IP_FILTER: Array<u64, { NODE_IP_FILTER_WORDS as usize }> = Array::new();

/// The node's ztunnel, slot 0.
#[btf_map]
pub static ZTUNNEL: Array<ZtunnelEntry, 1> = Array::new();

/// A replaced ztunnel that may still hold connections, slot 0 (`DrainingZtunnel`).
#[btf_map]
pub static ZTUNNEL_DRAINING: Array<DrainingZtunnel, 1> = Array::new();

/// Per-CPU packet counters of every program, by `Counter` slot (`zdivert_common::counter`,
/// `pod_counter`).
#[btf_map]
pub static PACKET_STATS: PerCpuArray<u64, { PACKET_STATS_SLOTS as usize }> = PerCpuArray::new();

/// ztunnel's listeners by `listener_slot`, written by the tproxy program when a SYN meets a
/// TIME_WAIT socket, read by the sk_lookup program that answers the kernel's listener lookup.
#[btf_map]
pub static LISTENERS: SockMap<{ LISTENER_SLOTS as usize }> = SockMap::new();

/// Settings the agent writes once at load, slot 0: `CONFIG_*` bits.
#[btf_map]
pub static CONFIG: Array<u32, 1> = Array::new();

/// The original DNS server of each captured DNS flow, to answer from it (`dns.rs`).
#[btf_map]
pub static DNS_FLOW_SLOTS: LruHashMap<DnsFlowKey, DnsFlow, { DNS_FLOWS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// In-pod mode: ztunnel's listener for a SYN that met one of its TIME_WAIT sockets, keyed by
/// the SYN, written by `pod_ingress` and taken by `pod_lookup` (see there).
#[btf_map]
pub static TIME_WAIT_SYNS: SockHash<SynKey, { TIME_WAIT_SYNS_MAX_ENTRIES as usize }> =
    SockHash::new();

/// In-pod mode: each ambient pod's addresses, to its eth0's MAC (see `PodMac`).
#[btf_map]
pub static INPOD_SENDERS: HashMap<IpKey, PodMac, { INPOD_SENDERS_MAX_ENTRIES as usize }> =
    HashMap::new();

/// In-pod mode: the original DNS server of each captured IPv6 DNS flow (`dns6.rs`).
#[btf_map]
pub static DNS_FLOW_SLOTS6: LruHashMap<DnsFlowKey6, DnsFlow6, { DNS_FLOWS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// In-pod mode: the listener of the newest ztunnel that acked each pod, by pod address and
/// port (`inpod/newest.rs`). A sockhash, not a reuseport array: a socket there may also be in
/// `TIME_WAIT_SYNS` (an array slot claims the socket's user data, which a sockhash's entry
/// shares). The kernel removes a listener that closes.
#[btf_map]
pub static ZTUNNEL_NEWEST: SockHash<ListenerKey, { ZTUNNEL_NEWEST_MAX_ENTRIES as usize }> =
    SockHash::new();

#[inline(always)]
pub fn dns_capture() -> bool {
    CONFIG.get(0).is_some_and(|c| c & CONFIG_DNS_CAPTURE != 0)
}

/// Adds one to `counter`'s slot (a constant where it is counted).
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = PACKET_STATS.get_ptr_mut(counter.0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 }
    }
}

#[inline(always)]
pub fn pod(ip: &IpKey) -> Option<PodEntry> {
    // SAFETY: the value is copied out before the map can change under it.
    unsafe { PODS.get(ip).copied() }
}

#[inline(always)]
pub fn is_node_ip(ip: &IpKey) -> bool {
    let bit = ip.node_filter_bit();
    let maybe = NODE_IP_FILTER
        .get(bit / 64)
        .is_none_or(|word| word & (1 << (bit % 64)) != 0);
    // SAFETY: only presence is read.
    maybe && unsafe { NODE_IPS.get(ip).is_some() }
}

/// The ztunnel entry, if one is known. `None` means captured traffic must be dropped.
#[inline(always)]
pub fn ztunnel() -> Option<ZtunnelEntry> {
    match ZTUNNEL.get(0) {
        Some(z) if z.flags & ZTUNNEL_F_PRESENT != 0 => Some(*z),
        _ => None,
    }
}

/// The replaced ztunnel, while one may still hold connections.
#[inline(always)]
pub fn draining() -> Option<DrainingZtunnel> {
    match ZTUNNEL_DRAINING.get(0) {
        Some(d) if d.ztunnel.flags & ZTUNNEL_F_PRESENT != 0 => Some(*d),
        _ => None,
    }
}

/// Whether `ip` is one of ztunnel's own addresses.
#[inline(always)]
pub fn is_ztunnel_ip(z: &ZtunnelEntry, ip: &IpKey, v6: bool) -> bool {
    if v6 {
        z.flags & ZTUNNEL_F_V6 != 0 && IpKey::from_v6(z.ipv6).words() == ip.words()
    } else {
        z.flags & ZTUNNEL_F_V4 != 0 && u32::from_ne_bytes(z.ipv4) == ip.v4_word()
    }
}

/// Whether the pod that holds `ip` sent this frame (see `PodMac`): its source MAC is that pod's
/// eth0's, and no packet socket wrote it.
#[inline(always)]
pub fn sent_by_holder(ctx: &aya_ebpf::programs::TcContext, ip: &IpKey) -> bool {
    // SAFETY: the value is copied out before the map can change under it.
    let Some(holder) = (unsafe { INPOD_SENDERS.get(ip) }).copied() else {
        return false;
    };
    crate::packet::src_mac(ctx) == Some(holder.mac) && !crate::packet::from_packet_socket(ctx)
}
