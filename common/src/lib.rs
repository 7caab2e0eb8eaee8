//! Types and constants shared by the zdivert eBPF programs and the agent.
//!
//! Every map key and value is `#[repr(C)]`, made only of byte arrays and `u32`s laid out so that
//! there is no padding: the kernel copies them byte for byte, and a padding hole would carry
//! garbage into hash keys. Sizes are asserted at compile time below.
#![no_std]

/// The pinned state lives under `<bpffs>/zdivert/<PIN_VERSION>/<node>`; a change to any map's
/// layout in this file must bump it, because aya reuses a pinned map without checking its
/// key/value sizes. The agent migrates a node from the previous version (`PIN_VERSION_BEFORE`).
macro_rules! pin_version {
    () => {
        "v3"
    };
}
macro_rules! bpffs {
    () => {
        "/sys/fs/bpf"
    };
}
pub const PIN_VERSION: &str = pin_version!();
/// The layout an agent of the previous version left: maps without BTF, `PodEntry` with a
/// `pod_mac` field.
pub const PIN_VERSION_BEFORE: &str = "v2";
/// Where bpffs is mounted on a node.
pub const BPFFS: &str = bpffs!();
/// Below bpffs: everything zdivert pins.
pub const PIN_BASE: &str = "zdivert";
/// `<bpffs>/zdivert/<PIN_VERSION>`: every node's pinned state lives in a directory below it.
pub const PIN_ROOT: &str = concat!(bpffs!(), "/zdivert/", pin_version!());

/// The names of the maps, as the object spells them and as they are pinned in
/// `<PIN_ROOT>/<node>/maps/`.
pub mod map {
    pub const PODS: &str = "PODS";
    pub const NODE_IPS: &str = "NODE_IPS";
    /// A filter over `NODE_IPS`: one bit per `IpKey::node_filter_bit`.
    pub const NODE_IP_FILTER: &str = "NODE_IP_FILTER";
    pub const ZTUNNEL: &str = "ZTUNNEL";
    pub const ZTUNNEL_DRAINING: &str = "ZTUNNEL_DRAINING";
    /// Per-CPU packet counters of every program, both modes (`Counter` slots).
    pub const PACKET_STATS: &str = "PACKET_STATS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const CONFIG: &str = "CONFIG";
    /// The original server of each captured DNS flow, by pod and slot (`DnsFlowKey`).
    pub const DNS_FLOW_SLOTS: &str = "DNS_FLOW_SLOTS";
    /// In-pod mode: ztunnel's listener for each SYN that met one of its TIME_WAIT sockets.
    pub const TIME_WAIT_SYNS: &str = "TIME_WAIT_SYNS";
    /// In-pod mode: the original DNS server of each captured IPv6 DNS flow.
    pub const DNS_FLOW_SLOTS6: &str = "DNS_FLOW_SLOTS6";
    /// In-pod mode: each ambient pod's addresses, to the MAC address of its eth0.
    pub const INPOD_SENDERS: &str = "INPOD_SENDERS";
    /// In-pod mode: the listener of the newest ztunnel that acked each pod, by pod address
    /// and port (`ListenerKey`).
    pub const ZTUNNEL_NEWEST: &str = "ZTUNNEL_NEWEST";
    /// Maps of this layout an earlier agent pinned and this one replaced under a new name (a
    /// pinned map keeps its layout under its name): their pins are removed at load. The old
    /// DNS flow maps were keyed by port, so one pod could evict every other pod's flows; each
    /// mode had its own counters (`STATS`, `POD_STATS`), now one map.
    pub const RETIRED: [&str; 4] = ["DNS_FLOWS", "DNS_FLOWS6", "STATS", "POD_STATS"];
    /// Every map of the object: all of them are pinned.
    pub const ALL: [&str; 13] = [
        PODS,
        NODE_IPS,
        NODE_IP_FILTER,
        ZTUNNEL,
        ZTUNNEL_DRAINING,
        PACKET_STATS,
        LISTENERS,
        CONFIG,
        DNS_FLOW_SLOTS,
        TIME_WAIT_SYNS,
        DNS_FLOW_SLOTS6,
        INPOD_SENDERS,
        ZTUNNEL_NEWEST,
    ];
}

/// The names of the programs, as the object spells them.
pub mod program {
    /// A pod's traffic to the node (ingress on its host veth).
    pub const OUTBOUND: &str = "zd_outbound";
    /// Traffic to a pod (egress on its host veth).
    pub const INBOUND: &str = "zd_inbound";
    /// What ztunnel sends (ingress on its host veth).
    pub const ZTUNNEL_RETURN: &str = "zd_zt_return";
    /// Captured segments arriving in ztunnel's netns (ingress on its eth0).
    pub const ZTUNNEL_TPROXY: &str = "zd_zt_tproxy";
    /// sk_lookup in ztunnel's netns: a SYN that retired a TIME_WAIT socket finds the listener.
    pub const ZTUNNEL_LOOKUP: &str = "zd_zt_lookup";
    /// A new veth the agent has not classified yet (both directions).
    pub const HOLD: &str = "zd_hold";
    /// In-pod mode, egress of the pod's eth0: its TCP turned back into its own netns.
    pub const POD_EGRESS: &str = "zd_pod_egress";
    /// In-pod mode, ingress of the pod's eth0 (from the wire) and lo (turned back): each
    /// captured segment assigned to ztunnel's socket in the pod.
    pub const POD_INGRESS: &str = "zd_pod_ingress";
    /// In-pod mode, sk_lookup in the pod's netns: a SYN that retired one of ztunnel's TIME_WAIT
    /// sockets finds ztunnel's listener.
    pub const POD_LOOKUP: &str = "zd_pod_lookup";
    /// In-pod mode, ingress of the pod's host veth (the node's netns): the pod's TCP that did
    /// not pass `POD_EGRESS` (a packet socket past the qdisc) goes no further.
    pub const POD_GUARD: &str = "zd_pod_guard";
    /// In-pod mode, on each of ztunnel's SO_REUSEPORT listener groups in a pod: new connections
    /// go to the newest ztunnel's listener, and a closing one's queue moves there.
    pub const ZTUNNEL_NEWEST: &str = "zd_zt_newest";
}

/// An IP address as a map key: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`) so that one map
/// serves both families without a format change. Aligned to 4 so that the programs copy and
/// compare it as four words: as sixteen bytes, a copy is sixteen loads and stores, and the
/// spilled bytes filled the 512-byte stack.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKey {
    pub addr: [u8; 16],
}

/// `::ffff:0:0/96`'s third word, as the bytes lie in memory.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl IpKey {
    /// The address as four words in memory order (network byte order within each).
    #[inline(always)]
    pub const fn words(&self) -> [u32; 4] {
        // SAFETY: same size, every bit pattern valid for both.
        unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(self.addr) }
    }

    /// The address folded to 16 bits: its bit in `NODE_IP_FILTER`.
    #[inline(always)]
    pub const fn node_filter_bit(&self) -> u32 {
        let [a, b, c, d] = self.words();
        let x = a ^ b ^ c ^ d;
        (x ^ (x >> 16)) & (NODE_IP_FILTER_WORDS * 64 - 1)
    }

    /// An IPv4 address given as it lies in the header (network byte order), IPv4-mapped.
    #[inline(always)]
    pub const fn from_v4_word(addr: u32) -> Self {
        Self::from_words([0, 0, V4_MAPPED_WORD, addr])
    }

    #[inline(always)]
    pub const fn from_words(w: [u32; 4]) -> Self {
        IpKey {
            // SAFETY: same size, every bit pattern valid for both.
            addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) },
        }
    }

    /// The IPv4 address's word (network byte order), for an IPv4-mapped key.
    #[inline(always)]
    pub const fn v4_word(&self) -> u32 {
        self.words()[3]
    }

    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let [a, b, c, d] = octets;
        IpKey {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        }
    }

    pub const fn from_v6(octets: [u8; 16]) -> Self {
        IpKey { addr: octets }
    }

    /// The IPv4 address if this key is IPv4-mapped.
    pub fn v4(&self) -> Option<[u8; 4]> {
        let a = &self.addr;
        if a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff {
            Some([a[12], a[13], a[14], a[15]])
        } else {
            None
        }
    }
}

/// `PODS` value: where an ambient pod lives on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// ifindex of the pod's host-side veth in the node's netns.
    pub host_ifindex: u32,
    /// `POD_F_*` bits.
    pub flags: u32,
    /// MAC of the host-side veth: the pod's gateway, as the pod expects to see it.
    pub host_mac: [u8; 6],
    pub _reserved: [u8; 2],
}

/// `ZTUNNEL` value (single-slot array): the node's ztunnel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZtunnelEntry {
    /// ifindex of ztunnel's host-side veth in the node's netns.
    pub host_ifindex: u32,
    /// `ZTUNNEL_F_*` bits; without `ZTUNNEL_F_PRESENT` captured traffic is dropped.
    pub flags: u32,
    /// ztunnel's IPv4 address (`ZTUNNEL_F_V4`).
    pub ipv4: [u8; 4],
    /// MAC of ztunnel's eth0 inside its netns.
    pub mac: [u8; 6],
    pub _reserved: [u8; 2],
    /// ztunnel's IPv6 address (`ZTUNNEL_F_V6`).
    pub ipv6: [u8; 16],
}

/// `ZTUNNEL_DRAINING` value (single-slot array): a replaced ztunnel that may still hold
/// connections (a rolling update). Segments of those go to it; everything else to the current
/// one. `netns_id` is its netns as the node's netns numbers it (the nsid of its veth's peer),
/// where the pods' programs look the segment's socket up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainingZtunnel {
    pub ztunnel: ZtunnelEntry,
    pub netns_id: u32,
}

pub const ZTUNNEL_F_PRESENT: u32 = 1 << 0;
pub const ZTUNNEL_F_V4: u32 = 1 << 1;
pub const ZTUNNEL_F_V6: u32 = 1 << 2;

/// The pod's entry was written for this address family (kept for dual-stack bookkeeping).
pub const POD_F_V4: u32 = 1 << 0;
pub const POD_F_V6: u32 = 1 << 1;

/// `NODE_IPS` value: why an address is the node's.
pub const NODE_IP_LOCAL: u32 = 1;

/// Packet marks, the bits of the article's layout (`docs/layout.md`), so that both dataplanes and any
/// rule an operator wrote for the original keep meaning the same thing.
pub const MARK_OUTBOUND: u32 = 0x100;
pub const MARK_SKIP: u32 = 0x200;
/// Set on packets assigned to a ztunnel socket; `ip rule fwmark 0x400/0xfff lookup 100` in
/// ztunnel's netns routes them to `local 0.0.0.0/0 dev lo`.
pub const MARK_TPROXY: u32 = 0x400;
pub const MARK_MASK: u32 = 0xfff;

/// In-pod mode (istio-cni's contract): ztunnel marks its own sockets' packets 0x539, and
/// connections it accepted carry connmark 0x111 so their replies find its socket.
pub const MARK_INPOD_ZTUNNEL: u32 = 0x539;
pub const MARK_INPOD_CONN: u32 = 0x111;

/// In-pod mode: the `skb->tc_index` `zd_pod_egress` gives every packet it lets leave the pod,
/// which `zd_pod_guard` on the host veth requires of the pod's TCP (and resets to 0). Only tc
/// (CAP_NET_ADMIN) sets it, and it survives the veth's crossing into the node's netns, which
/// clears the mark and the priority. A 16-bit field.
pub const TC_INDEX_POD_EGRESS_SEEN: u32 = 0x0539;

/// istio-cni's addresses for kubelet probes (the node SNATs them to these, `--ambient-snat`):
/// in-pod redirection leaves TCP from them alone.
pub const PROBE_SOURCE_V4: [u8; 4] = [169, 254, 7, 127];
pub const PROBE_SOURCE_V6: [u8; 16] = [
    0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
];

/// `lo` is interface 1 in every netns: where in-pod capture turns a pod's packets back.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// `TIME_WAIT_SYNS` key: a SYN as the listener lookup it causes sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynKey {
    pub remote: IpKey,
    pub local: IpKey,
    /// Network byte order, both.
    pub remote_port_be: u16,
    pub local_port_be: u16,
}

pub const TIME_WAIT_SYNS_MAX_ENTRIES: u32 = 4096;

/// ztunnel's listeners, as in the article.
pub const PORT_OUTBOUND: u16 = 15001;
pub const PORT_INBOUND_PLAIN: u16 = 15006;
pub const PORT_INBOUND_HBONE: u16 = 15008;

/// DNS, and ztunnel's DNS proxy (`--dns-capture`).
pub const PORT_DNS: u16 = 53;
pub const PORT_DNS_PROXY: u16 = 15053;

/// `CONFIG` (single-slot array) bits, written by the agent when it loads the programs.
pub const CONFIG_DNS_CAPTURE: u32 = 1 << 0;

/// `DNS_FLOW_SLOTS` key: a slot of an ambient pod's DNS flows (IPv4). A flow takes the slot of
/// its port (`dns_slot`), so that a pod querying from every port holds at most
/// `DNS_SLOTS_PER_POD` entries per protocol and cannot evict another pod's flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsFlowKey {
    pub pod: [u8; 4],
    pub slot: u16,
    /// IPPROTO_UDP or IPPROTO_TCP.
    pub proto: u8,
    pub _reserved: u8,
}

/// `DNS_FLOW_SLOTS` value: the flow in the slot (its port) and the server it asked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsFlow {
    pub server: [u8; 4],
    /// The pod's port, network byte order: an answer to another port is not this flow's.
    pub port_be: u16,
    pub _reserved: u16,
}

/// `DNS_FLOW_SLOTS6` key, as `DnsFlowKey` (in-pod mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsFlowKey6 {
    pub pod: [u8; 16],
    pub slot: u16,
    pub proto: u8,
    pub _reserved: u8,
}

/// `DNS_FLOW_SLOTS6` value, as `DnsFlow`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsFlow6 {
    pub server: [u8; 16],
    pub port_be: u16,
    pub _reserved: u16,
}

/// `INPOD_SENDERS` value: the MAC address of the eth0 of the pod that holds an address. In-pod
/// DNS capture notes a flow for an address only from a frame with that source MAC that no
/// packet socket wrote: a pod's stack gives its frames its own eth0's address, so a pod that
/// claims another pod's address (IP_FREEBIND takes no capability) cannot take that pod's slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMac {
    pub mac: [u8; 6],
    pub _reserved: [u8; 2],
}

pub const INPOD_SENDERS_MAX_ENTRIES: u32 = 16384;

/// `ZTUNNEL_NEWEST` key: a pod's address (its side of the connection: the source of what
/// goes to :15001, the destination of what goes to :15006 and :15008) and ztunnel's port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub addr: IpKey,
    pub port: u16,
    pub _reserved: u16,
}

/// `ZTUNNEL_NEWEST` entries: one per pod address and ztunnel port.
pub const ZTUNNEL_NEWEST_MAX_ENTRIES: u32 = INPOD_SENDERS_MAX_ENTRIES * 3;

/// Slots per pod and protocol (a power of two). Two queries of one pod in flight at once
/// whose ports share a slot: the older one's answer is not readdressed, and the pod's resolver
/// asks again (one chance in 2048 per pair, and that pod's alone).
pub const DNS_SLOTS_PER_POD: u16 = 2048;
/// Room for eight pods filling all their slots, both protocols, before the LRU evicts.
pub const DNS_FLOWS_MAX_ENTRIES: u32 = 32768;

/// The slot of a pod's flow from port `port_be` (network byte order).
#[inline(always)]
pub fn dns_slot(port_be: u16) -> u16 {
    u16::from_be(port_be) & (DNS_SLOTS_PER_POD - 1)
}

/// The routing table and rule priority used in ztunnel's netns for assigned packets.
pub const ZTUNNEL_TPROXY_TABLE: u32 = 100;
pub const ZTUNNEL_TPROXY_RULE_PRIORITY: u32 = 20000;

/// `LISTENERS` sockmap slots: ztunnel's listener for each (family, port), recorded by the tproxy
/// program for the sk_lookup program (see `listener_slot`).
pub const LISTENER_SLOTS: u32 = 6;

/// The `LISTENERS` slot of ztunnel's listener on `port` for one address family.
pub const fn listener_slot(v6: bool, port: u16) -> u32 {
    let base = if v6 { 3 } else { 0 };
    base + match port {
        PORT_OUTBOUND => 0,
        PORT_INBOUND_PLAIN => 1,
        _ => 2,
    }
}

pub const PODS_MAX_ENTRIES: u32 = 65536;
pub const NODE_IPS_MAX_ENTRIES: u32 = 256;
/// `NODE_IP_FILTER`'s 64-bit words: 65,536 bits, so that with every node address set a
/// pod's destination meets a set bit by chance at most once in 256.
pub const NODE_IP_FILTER_WORDS: u32 = 1024;

/// TCX: "let the next program decide" (the cluster CNI's, if any). Equals TC_ACT_UNSPEC, which
/// under a netlink clsact filter also means "continue".
pub const TCX_NEXT: i32 = -1;

/// A packet counter: its slot in `PACKET_STATS`. The programs take counters as constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter(pub u32);

macro_rules! counters {
    ($(#[$doc:meta])* $module:ident, $all:ident, $base:expr; $($name:ident = $idx:literal, $path:literal, $what:literal;)*) => {
        $(#[$doc])*
        pub mod $module {
            $(pub const $name: super::Counter = super::Counter($base + $idx);)*
        }
        /// `(slot, path, outcome)` of every counter, for `zdivert status` and `/metrics`.
        pub const $all: &[(u32, &str, &str)] = &[$(($base + $idx, $path, $what)),*];
    };
}

counters! {
    /// The node-level programs' counters: one per packet path and outcome.
    counter, COUNTERS, 0;
    OUT_REDIRECTED = 0, "outbound", "redirected";
    OUT_PASSED = 1, "outbound", "passed";
    OUT_DROP_NO_ZTUNNEL = 2, "outbound", "dropped_no_ztunnel";
    OUT_DROP_FORGED = 3, "outbound", "dropped_forged_source";
    OUT_DROP_MALFORMED = 4, "outbound", "dropped_malformed";
    IN_REDIRECTED = 5, "inbound", "redirected";
    IN_PASSED = 6, "inbound", "passed";
    IN_DROP_NO_ZTUNNEL = 7, "inbound", "dropped_no_ztunnel";
    IN_DROP_MALFORMED = 8, "inbound", "dropped_malformed";
    RET_DELIVERED = 9, "ztunnel_return", "delivered";
    RET_PASSED = 10, "ztunnel_return", "passed";
    TP_ESTABLISHED = 11, "ztunnel_tproxy", "assigned_established";
    TP_LISTENER = 12, "ztunnel_tproxy", "assigned_listener";
    TP_PASSED = 13, "ztunnel_tproxy", "passed";
    TP_DROP_NO_LISTENER = 14, "ztunnel_tproxy", "dropped_no_listener";
    TP_DROP_MALFORMED = 15, "ztunnel_tproxy", "dropped_malformed";
    RET_HBONE_LOOPED = 16, "ztunnel_return", "hbone_to_ztunnel";
    RET_DROP_NO_ZTUNNEL = 17, "ztunnel_return", "dropped_no_ztunnel";
    TP_TIME_WAIT_REUSED = 18, "ztunnel_tproxy", "syn_to_time_wait";
    LOOKUP_ASSIGNED = 19, "ztunnel_sk_lookup", "assigned_listener";
    LOOKUP_NO_LISTENER = 20, "ztunnel_sk_lookup", "no_listener";
    OUT_DNS = 21, "outbound", "dns_to_ztunnel";
    RET_DNS = 22, "ztunnel_return", "dns_answer";
    HOLD_PASSED = 23, "hold", "passed";
    HOLD_DROPPED = 24, "hold", "dropped_unclassified";
    OUT_TO_DRAINING = 25, "outbound", "to_draining_ztunnel";
    IN_TO_DRAINING = 26, "inbound", "to_draining_ztunnel";
    RET_HBONE_DRAINING = 27, "ztunnel_return", "hbone_to_draining_ztunnel";
    TP_DROP_ASSIGN_REFUSED = 28, "ztunnel_tproxy", "dropped_assign_refused";
    TP_TO_STACK = 29, "ztunnel_tproxy", "to_local_sockets";
}

/// Slots of each mode in `PACKET_STATS`: node level first, in-pod after.
pub const COUNTER_SLOTS: u32 = 32;

counters! {
    /// The in-pod programs' counters, after the node-level ones.
    pod_counter, POD_COUNTERS, crate::COUNTER_SLOTS;
    EGRESS_TURNED_BACK = 0, "pod_egress", "turned_back";
    EGRESS_PASSED = 1, "pod_egress", "passed";
    EGRESS_DNS = 2, "pod_egress", "dns_to_ztunnel";
    EGRESS_DROP_MALFORMED = 3, "pod_egress", "dropped_malformed";
    INGRESS_ESTABLISHED = 4, "pod_ingress", "assigned_established";
    INGRESS_LISTENER = 5, "pod_ingress", "assigned_listener";
    INGRESS_TIME_WAIT = 6, "pod_ingress", "syn_to_time_wait";
    INGRESS_PASSED = 7, "pod_ingress", "passed";
    INGRESS_DROP_NO_LISTENER = 8, "pod_ingress", "dropped_no_listener";
    INGRESS_DROP_MALFORMED = 9, "pod_ingress", "dropped_malformed";
    INGRESS_DNS = 10, "pod_ingress", "dns_answer";
    LOOKUP_ASSIGNED = 11, "pod_sk_lookup", "assigned_listener";
    INGRESS_TIME_WAIT_GONE = 12, "pod_ingress", "time_wait_gone";
    INGRESS_DROP_ASSIGN_REFUSED = 13, "pod_ingress", "dropped_assign_refused";
    INGRESS_DROP_UNRECORDED = 14, "pod_ingress", "dropped_time_wait_unrecorded";
    INGRESS_DROP_NOT_ZTUNNELS = 15, "pod_ingress", "dropped_not_ztunnels";
    GUARD_PASSED = 16, "pod_guard", "passed";
    GUARD_DROP_UNSEEN = 17, "pod_guard", "dropped_past_egress";
    EGRESS_DROP_DNS_NOT_OWN = 18, "pod_egress", "dropped_dns_from_another_address";
    NEWEST_SELECTED = 19, "ztunnel_reuseport", "to_newest";
    NEWEST_MIGRATED = 20, "ztunnel_reuseport", "migrated_to_newest";
    NEWEST_KERNEL_CHOICE = 21, "ztunnel_reuseport", "kernel_choice";
}

pub const PACKET_STATS_SLOTS: u32 = 2 * COUNTER_SLOTS;

const _: () = {
    assert!(core::mem::size_of::<IpKey>() == 16);
    assert!(core::mem::align_of::<IpKey>() == 4);
    assert!(core::mem::size_of::<PodEntry>() == 16);
    assert!(core::mem::size_of::<ZtunnelEntry>() == 36);
    assert!(core::mem::size_of::<DrainingZtunnel>() == 40);
    assert!(core::mem::size_of::<DnsFlowKey>() == 8);
    assert!(COUNTERS.len() as u32 <= COUNTER_SLOTS);
    assert!(core::mem::size_of::<SynKey>() == 36);
    assert!(core::mem::size_of::<DnsFlowKey6>() == 20);
    assert!(core::mem::size_of::<DnsFlow>() == 8);
    assert!(core::mem::size_of::<DnsFlow6>() == 20);
    assert!(core::mem::size_of::<PodMac>() == 8);
    assert!(core::mem::size_of::<ListenerKey>() == 20);
    assert!(DNS_SLOTS_PER_POD.is_power_of_two());
    assert!(POD_COUNTERS.len() as u32 <= COUNTER_SLOTS);
};

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: plain-old-data, no padding (sizes asserted above), any bit pattern is valid.
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::PodEntry {}
    unsafe impl aya::Pod for super::ZtunnelEntry {}
    unsafe impl aya::Pod for super::DrainingZtunnel {}
    unsafe impl aya::Pod for super::DnsFlowKey {}
    unsafe impl aya::Pod for super::SynKey {}
    unsafe impl aya::Pod for super::DnsFlowKey6 {}
    unsafe impl aya::Pod for super::DnsFlow {}
    unsafe impl aya::Pod for super::DnsFlow6 {}
    unsafe impl aya::Pod for super::PodMac {}
    unsafe impl aya::Pod for super::ListenerKey {}
}
