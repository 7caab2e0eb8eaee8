//! Crafted IPv4 and IPv6 packets sent from inside a pod with a raw socket (header included: any
//! source, options, extension headers, fragments), and sniffers that record which namespaces a packet was *delivered* to.
//! A raw `IPPROTO_TCP` socket (one per family) gets a copy of every TCP packet the IP layer of its netns accepts
//! for local delivery (after reassembly, before TCP): where it shows up is where it landed,
//! whether a socket then accepts it or not.
use std::{
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use std::os::fd::{AsRawFd, FromRawFd};

use anyhow::Result;
use socket2::{Domain, Protocol, Socket, Type};

use crate::ns::Netns;

/// Sends `packet` (a whole IPv4 packet, header included) from `ns` towards `dst`.
pub fn send(ns: &Netns, dst: Ipv4Addr, packet: Vec<u8>) -> Result<()> {
    send_all(ns, vec![(dst, packet)])
}

/// `send` for many packets, through one socket.
pub fn send_all(ns: &Netns, packets: Vec<(Ipv4Addr, Vec<u8>)>) -> Result<()> {
    send_marked(ns, packets, None)
}

/// `send_all`, the packets shared out among threads pinned one to each CPU: what per-CPU
/// state the kernel keeps for them (an LRU map's local lists) is touched on every CPU.
pub fn send_from_every_cpu(ns: &Netns, packets: Vec<(Ipv4Addr, Vec<u8>)>) -> Result<()> {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = packets.len().div_ceil(cpus).max(1);
    let mut sent = Vec::new();
    for (cpu, part) in packets.chunks(chunk).enumerate() {
        let (path, part) = (ns.path(), part.to_vec());
        sent.push(thread::spawn(move || -> Result<()> {
            zdivert::netns::run_in(&path, move || {
                // SAFETY: a CPU set built with the libc macros, for this (short-lived) thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
                }
                send_each(part, None)
            })?
        }));
    }
    for t in sent {
        t.join()
            .map_err(|_| anyhow::anyhow!("a sending thread panicked"))??;
    }
    Ok(())
}

/// `send_all` from a socket with SO_MARK `mark` (which takes CAP_NET_ADMIN): as ztunnel's
/// sockets send in a pod's netns.
pub fn send_marked(ns: &Netns, packets: Vec<(Ipv4Addr, Vec<u8>)>, mark: Option<u32>) -> Result<()> {
    ns.exec(move || send_each(packets, mark))
}

/// Sends from the current thread's netns.
fn send_each(packets: Vec<(Ipv4Addr, Vec<u8>)>, mark: Option<u32>) -> Result<()> {
    // IPPROTO_RAW: the header is ours (IP_HDRINCL).
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
    if let Some(mark) = mark {
        s.set_mark(mark)?;
    }
    for (dst, packet) in packets {
        s.send_to(&packet, &SocketAddr::from((dst, 0)).into())?;
    }
    Ok(())
}

/// Sends `packet` (a whole IPv6 packet, header included) from `ns` towards `dst`.
pub fn send6(ns: &Netns, dst: Ipv6Addr, packet: Vec<u8>) -> Result<()> {
    ns.exec(move || -> Result<()> {
        // An IPv6 IPPROTO_RAW socket takes the whole packet, header included.
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(255)))?;
        s.send_to(&packet, &SocketAddr::from((dst, 0)).into())?;
        Ok(())
    })
}

/// Sends `frame` (a whole Ethernet frame) on `ifname` of `ns` through a packet socket, as a
/// root process in a pod may (CAP_NET_RAW is a default capability). With `qdisc_bypass`
/// (PACKET_QDISC_BYPASS) the frame goes straight to the driver, past the TC egress hook.
pub fn send_frame(ns: &Netns, ifname: &str, frame: Vec<u8>, qdisc_bypass: bool) -> Result<()> {
    let ifname = std::ffi::CString::new(ifname)?;
    ns.exec(move || -> Result<()> {
        // SAFETY: plain socket calls on a descriptor owned by `Socket` from here on.
        let s = unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            anyhow::ensure!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            Socket::from_raw_fd(fd)
        };
        if qdisc_bypass {
            let on: libc::c_int = 1;
            // SAFETY: a c_int option of the size passed.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    &on as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            anyhow::ensure!(
                r == 0,
                "PACKET_QDISC_BYPASS: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no interface {ifname:?}");
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the frame and the address live for the call.
        let sent = unsafe {
            libc::sendto(
                s.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &to as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        let err = std::io::Error::last_os_error();
        // ENOBUFS: the egress hook dropped it (NET_XMIT_DROP), which the sniffers see as well.
        if sent < 0 && err.raw_os_error() == Some(libc::ENOBUFS) {
            return Ok(());
        }
        anyhow::ensure!(sent == frame.len() as isize, "sendto: {err}");
        Ok(())
    })
}

/// Fills in an IPv4 header's checksum (the kernel does for a raw IP socket, not for a frame).
pub fn ipv4_checksum(packet: &mut [u8]) {
    let ihl = (packet[0] & 0x0f) as usize * 4;
    packet[10] = 0;
    packet[11] = 0;
    let c = fold(sum16(&packet[..ihl]));
    packet[10..12].copy_from_slice(&c.to_be_bytes());
}

/// One delivered packet: its TCP ports and flags (and, for IPv4, addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: Option<Ipv4Addr>,
    pub dst: Option<Ipv4Addr>,
    pub sport: u16,
    pub dport: u16,
    /// None for a header cut short before them.
    pub flags: Option<u8>,
}

/// Records every TCP packet, IPv4 or IPv6, delivered in one netns.
pub struct Sniffer {
    pub name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    sockets: Vec<Arc<Socket>>,
}

impl Sniffer {
    pub fn start(name: &str, ns: &Netns) -> Result<Sniffer> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut sockets = Vec::new();
        for v6 in [false, true] {
            let socket = Arc::new(ns.exec(move || -> Result<Socket> {
                let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
                let s = Socket::new(domain, Type::RAW, Some(Protocol::TCP))?;
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(s)
            })?);
            Self::collect(socket.clone(), seen.clone(), v6);
            sockets.push(socket);
        }
        Ok(Sniffer {
            name: name.into(),
            seen,
            sockets,
        })
    }

    fn collect(sock: Arc<Socket>, out: Arc<Mutex<Vec<Seen>>>, v6: bool) {
        thread::spawn(move || {
            let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
            // Ends when the test drops the sniffer (the Arc count falls to one).
            while Arc::strong_count(&sock) > 1 {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                // SAFETY: recv initialised the first n bytes.
                let b: Vec<u8> = buf[..n]
                    .iter()
                    .map(|x| unsafe { x.assume_init() })
                    .collect();
                // IPv6 raw sockets deliver the payload only, IPv4 ones the whole packet.
                if let Some(s) = if v6 { parse_tcp(&b, None) } else { parse(&b) } {
                    out.lock().unwrap().push(s);
                }
            }
        });
    }

    /// IPv4 packets from `src` to port `dport`.
    pub fn from_addr(&self, src: Ipv4Addr, dport: u16) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.src == Some(src) && s.dport == dport)
            .copied()
            .collect()
    }

    /// Packets from source port `sport` (each probe uses its own).
    pub fn with_sport(&self, sport: u16) -> Vec<Seen> {
        let _ = &self.sockets;
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.sport == sport)
            .copied()
            .collect()
    }
}

fn parse(b: &[u8]) -> Option<Seen> {
    let ihl = (*b.first()? & 0x0f) as usize * 4;
    let addrs = b.get(12..20)?;
    parse_tcp(
        b.get(ihl..)?,
        Some((
            Ipv4Addr::new(addrs[0], addrs[1], addrs[2], addrs[3]),
            Ipv4Addr::new(addrs[4], addrs[5], addrs[6], addrs[7]),
        )),
    )
}

fn parse_tcp(full: &[u8], addrs: Option<(Ipv4Addr, Ipv4Addr)>) -> Option<Seen> {
    let t = full.get(..4)?;
    Some(Seen {
        src: addrs.map(|a| a.0),
        dst: addrs.map(|a| a.1),
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        flags: full.get(13).copied(),
    })
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

/// Fills in the TCP checksum of `segment` for the given addresses (both of one family), so that
/// only what the test means to be odd about a packet is odd.
pub fn tcp_checksum(src: IpAddr, dst: IpAddr, segment: &mut [u8]) {
    if segment.len() < 18 {
        return;
    }
    segment[16] = 0;
    segment[17] = 0;
    let octets = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&octets(src));
    pseudo.extend_from_slice(&octets(dst));
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    let c = fold(sum16(&pseudo) + sum16(segment));
    segment[16..18].copy_from_slice(&c.to_be_bytes());
}
