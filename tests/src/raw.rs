//! Crafted IPv4 packets sent from inside a pod with a raw socket (`IP_HDRINCL`: any source, any
//! options, fragments), and sniffers that record which namespaces a packet was *delivered* to.
//! A raw `IPPROTO_TCP` socket gets a copy of every TCP packet the IP layer of its netns accepts
//! for local delivery (after reassembly, before TCP): where it shows up is where it landed,
//! whether a socket then accepts it or not.
use std::{
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddr},
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

/// One delivered packet: IPv4 source, destination and TCP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

/// Records every TCP packet delivered in one netns.
pub struct Sniffer {
    pub name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    socket: Arc<Socket>,
}

impl Sniffer {
    pub fn start(name: &str, ns: &Netns) -> Result<Sniffer> {
        let socket = Arc::new(ns.exec(|| -> Result<Socket> {
            let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        })?);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (sock, out) = (socket.clone(), seen.clone());
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
                if let Some(s) = parse(&b) {
                    out.lock().unwrap().push(s);
                }
            }
        });
        Ok(Sniffer {
            name: name.into(),
            seen,
            socket,
        })
    }

    /// Packets from source port `sport` (each probe uses its own).
    pub fn with_sport(&self, sport: u16) -> Vec<Seen> {
        let _ = &self.socket;
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
    let t = b.get(ihl..ihl + 4)?;
    Some(Seen {
        src: Ipv4Addr::new(b[12], b[13], b[14], b[15]),
        dst: Ipv4Addr::new(b[16], b[17], b[18], b[19]),
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
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

/// Fills in the TCP checksum of `segment` for the given IPv4 addresses, so that only what the
/// test means to be odd about a packet is odd.
pub fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &mut [u8]) {
    if segment.len() < 18 {
        return;
    }
    segment[16] = 0;
    segment[17] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    let c = fold(sum16(&pseudo) + sum16(segment));
    segment[16..18].copy_from_slice(&c.to_be_bytes());
}
