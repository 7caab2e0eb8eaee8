//! Header parsing shared by all paths. Headers are read straight from the packet's linear part
//! after a bounds check the verifier sees (`read`); a header that is not all there (a short
//! packet, or one whose headers lie in fragments) is read through `bpf_skb_load_bytes`, which
//! checks the bounds itself. A helper call costs about 25 ns here, a direct read about nothing
//! (docs/benchmarks.md), and a packet's headers are read several times on every path.
use aya_ebpf::programs::TcContext;
use zdivert_common::IpKey;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// The pre-standard QinQ tag.
const ETH_P_QINQ: u16 = 0x9100;
pub const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers walked before giving up (and calling the packet malformed).
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// The loopback addresses, as the programs write them into headers and lookups.
pub const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];
pub const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

pub struct Ip {
    pub v6: bool,
    pub src: IpKey,
    pub dst: IpKey,
    /// The upper-layer protocol, after any IPv6 extension headers.
    pub proto: u8,
    /// Offset of the upper-layer header from the start of the frame.
    pub l4_off: usize,
    /// Part of a fragmented datagram (first or later): ports are absent or not to be trusted.
    pub fragment: bool,
}

pub enum Frame {
    /// ARP, LLDP, a runt frame…: nothing zdivert decides about.
    NotIp,
    /// Says it is IP but the header cannot be read as one.
    Malformed,
    Ip(Ip),
}

pub struct Tcp {
    /// Network byte order, as the socket lookup helpers want them.
    pub sport_be: u16,
    pub dport_be: u16,
    pub flags: u8,
}

impl Tcp {
    pub fn dport(&self) -> u16 {
        u16::from_be(self.dport_be)
    }
    pub fn sport(&self) -> u16 {
        u16::from_be(self.sport_be)
    }
    /// A connection request: SYN without ACK.
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// The `T` at `off` in the frame: straight from the linear part when it is all there, else
/// through the helper. `None` past the packet's end.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data() + off;
    if start + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: within the linear part, as checked just above (and by the verifier).
        return Some(unsafe { core::ptr::read_unaligned(start as *const T) });
    }
    ctx.load::<T>(off).ok()
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Frame {
    let Some(ethertype) = read::<u16>(ctx, 12) else {
        return Frame::NotIp;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        // A tag still in the frame's data: at egress, what the sender wrote; at ingress, the
        // inner of two tags (the kernel took the outer one out of the data before TC). After TC
        // the stack strips VLAN-0 (priority) tags and delivers what they carry as untagged, so a
        // tagged frame is IP in disguise: no pod or node of ours tags its frames, and the
        // programs do not walk tags, so it is malformed (dropped where capture decides).
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ => Frame::Malformed,
        _ => Frame::NotIp,
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Frame {
    // version/ihl, tos, total length, id, flags/fragment offset, ttl, protocol, checksum, src, dst
    let Some(hdr) = read::<[u8; 20]>(ctx, ETH_HLEN) else {
        return Frame::Malformed;
    };
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if hdr[0] >> 4 != 4 || ihl < 20 {
        return Frame::Malformed;
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    // More-fragments set, or a non-zero offset.
    let fragment = frag & 0x3fff != 0;
    Frame::Ip(Ip {
        v6: false,
        src: IpKey::from_v4_word(u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]])),
        dst: IpKey::from_v4_word(u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]])),
        proto: hdr[9],
        l4_off: ETH_HLEN + ihl,
        fragment,
    })
}

#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Frame {
    let Some(fixed) = read::<[u8; 8]>(ctx, ETH_HLEN) else {
        return Frame::Malformed;
    };
    if fixed[0] >> 4 != 6 {
        return Frame::Malformed;
    }
    // One read, one test, in turn: with both reads tested at once, LLVM stores the first
    // address's registers on the path where only the second read failed, registers that path
    // never wrote, and every verifier refuses that.
    let Some(src) = read::<IpKey>(ctx, ETH_HLEN + 8) else {
        return Frame::Malformed;
    };
    let Some(dst) = read::<IpKey>(ctx, ETH_HLEN + 24) else {
        return Frame::Malformed;
    };
    let mut next = fixed[6];
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut fragment = false;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        match next {
            // hop-by-hop, routing, destination options: length in 8-octet units, minus the first
            0 | 43 | 60 => {
                let Ok(ext) = ctx.load::<[u8; 2]>(off) else {
                    return Frame::Malformed;
                };
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            // authentication header: length in 4-octet units, minus two
            51 => {
                let Ok(ext) = ctx.load::<[u8; 2]>(off) else {
                    return Frame::Malformed;
                };
                next = ext[0];
                off += (ext[1] as usize + 2) * 4;
            }
            // fragment header: an atomic fragment (offset 0, no M flag) is a whole packet
            44 => {
                let Ok(ext) = ctx.load::<[u8; 4]>(off) else {
                    return Frame::Malformed;
                };
                next = ext[0];
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff9 != 0 {
                    fragment = true;
                }
                off += 8;
            }
            _ => break,
        }
        i += 1;
    }
    if matches!(next, 0 | 43 | 60 | 51 | 44) {
        // More extension headers than we walk: not something we can classify.
        return Frame::Malformed;
    }
    Frame::Ip(Ip {
        v6: true,
        src,
        dst,
        proto: next,
        l4_off: off,
        fragment,
    })
}

/// The packet an ICMP error quotes (after the 8-byte ICMP header, RFC 792 / RFC 4443).
pub struct Quoted {
    pub proto: u8,
    pub src: IpKey,
    pub dst: IpKey,
}

/// If `ip` is an ICMP error (destination unreachable, time exceeded, parameter problem, and for
/// IPv6 packet too big), the header of the packet it is about.
#[inline(always)]
pub fn icmp_error_quote(ctx: &TcContext, ip: &Ip) -> Option<Quoted> {
    if ip.fragment {
        return None;
    }
    let icmp_type = read::<u8>(ctx, ip.l4_off)?;
    let inner = ip.l4_off + 8;
    if !ip.v6 && ip.proto == IPPROTO_ICMP && matches!(icmp_type, 3 | 11 | 12) {
        let h = read::<[u8; 20]>(ctx, inner)?;
        if h[0] >> 4 != 4 {
            return None;
        }
        return Some(Quoted {
            proto: h[9],
            src: IpKey::from_v4_word(u32::from_ne_bytes([h[12], h[13], h[14], h[15]])),
            dst: IpKey::from_v4_word(u32::from_ne_bytes([h[16], h[17], h[18], h[19]])),
        });
    }
    if ip.v6 && ip.proto == IPPROTO_ICMPV6 && matches!(icmp_type, 1..=4) {
        let h = read::<[u8; 40]>(ctx, inner)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
        src.copy_from_slice(&h[8..24]);
        dst.copy_from_slice(&h[24..40]);
        // The quoted next header; a quote behind extension headers is not looked into.
        return Some(Quoted {
            proto: h[6],
            src: IpKey::from_v6(src),
            dst: IpKey::from_v6(dst),
        });
    }
    None
}

/// The TCP ports and flags, if the header is all there (20 bytes at least).
#[inline(always)]
pub fn tcp(ctx: &TcContext, ip: &Ip) -> Option<Tcp> {
    let hdr = read::<[u8; 20]>(ctx, ip.l4_off)?;
    Some(Tcp {
        sport_be: u16::from_ne_bytes([hdr[0], hdr[1]]),
        dport_be: u16::from_ne_bytes([hdr[2], hdr[3]]),
        flags: hdr[13],
    })
}

#[inline(always)]
pub fn set_dst_mac(ctx: &TcContext, mac: &[u8; 6]) -> bool {
    write(ctx, 0, mac)
}

#[inline(always)]
pub fn src_mac(ctx: &TcContext) -> Option<[u8; 6]> {
    read(ctx, 6)
}

/// Whether a packet socket made the frame (and so wrote its Ethernet header itself); any
/// other socket's frame got its source address from the device.
#[inline(always)]
pub fn from_packet_socket(ctx: &TcContext) -> bool {
    const AF_PACKET: u32 = 17;
    // SAFETY: `sk` of the context is the sending socket or null; the verifier allows its
    // family to be read once it is checked for null.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    !sk.is_null() && unsafe { (*sk).family } == AF_PACKET
}

#[inline(always)]
pub fn set_src_mac(ctx: &TcContext, mac: &[u8; 6]) -> bool {
    write(ctx, 6, mac)
}

/// Writes `bytes` at `off`: straight into the linear part when it holds them (the verifier
/// has the kernel unclone a shared packet first), else through `bpf_skb_store_bytes`.
#[inline(always)]
fn write(ctx: &TcContext, off: usize, bytes: &[u8; 6]) -> bool {
    let start = ctx.data() + off;
    if start + bytes.len() <= ctx.data_end() {
        // SAFETY: within the linear part, as checked just above (and by the verifier).
        unsafe { core::ptr::write_unaligned(start as *mut [u8; 6], *bytes) };
        return true;
    }
    ctx.store(off, bytes, 0).is_ok()
}

#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is the kernel's __sk_buff for this invocation.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
pub fn tc_index(ctx: &TcContext) -> u32 {
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).tc_index }
}

/// `skb->tc_index`, which tc programs may write.
#[inline(always)]
pub fn set_tc_index(ctx: &TcContext, index: u32) {
    // SAFETY: the context pointer is the kernel's __sk_buff, whose tc_index field tc programs
    // may write.
    unsafe { (*ctx.skb.skb).tc_index = index };
}

/// Whether `ip` is a loopback address of its family (127/8, ::1).
#[inline(always)]
pub fn is_loopback(ip: &IpKey, v6: bool) -> bool {
    let w = ip.words();
    if v6 {
        w == IpKey::from_v6(LOOPBACK_V6).words()
    } else {
        ip.addr[12] == 127
    }
}
