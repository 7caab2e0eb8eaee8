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

use anyhow::Result;
use socket2::{Domain, Protocol, Socket, Type};

use crate::ns::Netns;

/// Sends `packet` (a whole IPv4 packet, header included) from `ns` towards `dst`.
pub fn send(ns: &Netns, dst: Ipv4Addr, packet: Vec<u8>) -> Result<()> {
    ns.exec(move || -> Result<()> {
        // IPPROTO_RAW: the header is ours (IP_HDRINCL).
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
        s.send_to(&packet, &SocketAddr::from((dst, 0)).into())?;
        Ok(())
    })
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
