//! The odd-packet suites' machinery: probes crafted with raw sockets inside the pods, and
//! sniffers in every namespace that record where each one was delivered.
use std::{net::IpAddr, time::Duration};

use crate::{
    packets::{SYN, V4, eth, tcp, v6},
    raw::{self, Sniffer},
    topology::Pod,
};

pub const RST: u8 = 0x04;
const IPPROTO_TCP: u8 = 6;

pub struct Probe {
    pub what: &'static str,
    pub from: &'static str,
    pub src: Option<IpAddr>,
    pub dst: IpAddr,
    /// IPv6 extension headers (type, bytes).
    pub exts: Vec<(u8, Vec<u8>)>,
    pub dport: u16,
    pub flags: u8,
    pub options: Vec<u8>,
    pub frag: u16,
    /// Bytes of the TCP header sent (20 = whole).
    pub tcp_len: usize,
    /// Where it may be delivered (sniffer names); nowhere else.
    pub may_land: &'static [&'static str],
    /// Where it must be delivered.
    pub must_land: &'static [&'static str],
    /// IPv6 that must reach ztunnel, in every mode.
    pub v6_captured: bool,
    /// Sent as a frame through a packet socket instead of a raw IP socket.
    pub frame: Option<Frame>,
}

/// How a probe sent as a frame is framed.
#[derive(Clone, Copy)]
pub struct Frame {
    /// The next hop's MAC address (the pod's gateway's).
    pub to: [u8; 6],
    /// VLAN-0 (802.1p priority) tags in front of the IP header: the kernel strips them on
    /// receipt and delivers what they carry.
    pub vlan0_tags: usize,
    /// PACKET_QDISC_BYPASS: past the sender's TC egress hook.
    pub qdisc_bypass: bool,
}

impl Frame {
    /// `packet` behind an Ethernet header (and the tags) from the pod's eth0.
    fn wrap(&self, from: &Pod, packet: &[u8]) -> anyhow::Result<Vec<u8>> {
        let v6 = packet.first().is_some_and(|b| b >> 4 == 6);
        let mut inner = Vec::new();
        for _ in 0..self.vlan0_tags {
            inner.extend_from_slice(&[0, 0]); // PCP 0, DEI 0, VID 0
            inner.extend_from_slice(&0x8100u16.to_be_bytes());
        }
        inner.extend_from_slice(packet);
        let ethertype: u16 = if v6 { 0x86dd } else { 0x0800 };
        // With tags, the Ethernet header's type is the first tag's and each tag names the next.
        let (outer_type, body) = if self.vlan0_tags == 0 {
            (ethertype, inner)
        } else {
            let last = self.vlan0_tags * 4 - 2;
            inner[last..last + 2].copy_from_slice(&ethertype.to_be_bytes());
            (0x8100, inner)
        };
        Ok(eth(self.to, from.mac()?, outer_type, &body))
    }
}

impl Probe {
    fn send(&self, from: &Pod, src: IpAddr, segment: &[u8]) -> anyhow::Result<()> {
        let packet = match (src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut v4 = V4::new(s, d, IPPROTO_TCP);
                v4.options = self.options.clone();
                v4.frag = self.frag;
                let mut packet = v4.packet(segment);
                raw::ipv4_checksum(&mut packet);
                packet
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => v6(s, d, &self.exts, IPPROTO_TCP, segment),
            _ => anyhow::bail!("{}: mixed families", self.what),
        };
        match (self.frame, self.dst) {
            (Some(f), _) => {
                raw::send_frame(&from.ns, "eth0", f.wrap(from, &packet)?, f.qdisc_bypass)
            }
            (None, IpAddr::V4(d)) => raw::send(&from.ns, d, packet),
            (None, IpAddr::V6(d)) => raw::send6(&from.ns, d, packet),
        }
    }
}

pub fn probe(what: &'static str, from: &'static str, dst: impl Into<IpAddr>, dport: u16) -> Probe {
    Probe {
        what,
        from,
        src: None,
        dst: dst.into(),
        exts: vec![],
        v6_captured: false,
        frame: None,
        dport,
        flags: SYN,
        options: vec![],
        frag: 0x4000,
        tcp_len: 20,
        may_land: &[],
        must_land: &[],
    }
}

/// Sends each probe from its pod and checks where the sniffers saw it delivered: the failures,
/// one line each.
pub fn deliver<'a>(
    mode: impl std::fmt::Debug + Copy,
    probes: &[Probe],
    sniffers: &[Sniffer],
    pod: impl Fn(&str) -> &'a Pod,
) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        let sport = 40000 + i as u16;
        let from = pod(p.from);
        let src = p.src.unwrap_or(match p.dst {
            IpAddr::V4(_) => from.ip.into(),
            IpAddr::V6(_) => from.ip6.into(),
        });
        let mut segment = tcp(sport, p.dport, p.flags);
        raw::tcp_checksum(src, p.dst, &mut segment);
        segment.truncate(p.tcp_len);
        p.send(from, src, &segment)?;
        let must_land: &[&str] = if p.v6_captured {
            &["ztunnel"]
        } else {
            p.must_land
        };
        // The probe itself, not what it provoked: a RST that a forged source's own stack sends
        // back on a SYN-ACK it never asked for carries the probe's port too.
        let landed_now = || -> Vec<&str> {
            sniffers
                .iter()
                .filter(|s| {
                    s.with_sport(sport)
                        .iter()
                        .any(|seen| seen.flags.is_none_or(|f| f == p.flags))
                })
                .map(|s| s.name.as_str())
                .collect()
        };
        // Until what must land has; a packet that must land nowhere gets the time a landing
        // one takes (the absence of a packet cannot be awaited).
        let _ = crate::eventually(p.what, Duration::from_secs(2), || {
            Ok(must_land.iter().all(|m| landed_now().contains(m)))
        });
        if must_land.is_empty() {
            std::thread::sleep(Duration::from_millis(250));
        }
        let landed = landed_now();
        let may_land = p.may_land;
        let wrong: Vec<&&str> = landed.iter().filter(|l| !may_land.contains(l)).collect();
        let missed: Vec<&&str> = must_land.iter().filter(|m| !landed.contains(m)).collect();
        println!("{mode:?}: {:<50} landed in {landed:?}", p.what);
        if !wrong.is_empty() || !missed.is_empty() {
            failures.push(format!(
                "{}: landed in {landed:?}, allowed {:?}, required {:?}",
                p.what, may_land, must_land
            ));
        }
    }
    Ok(failures)
}

/// A hop-by-hop or destination-options header holding only padding.
pub fn hop_by_hop() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// A routing header with no segments left (nothing to route through), of type 0: every
/// kernel skips it. Type 2 (Mobile IPv6) with no segments left is discarded by the stack of
/// kernels built with CONFIG_IPV6_MIP6 (Debian's), whatever the redirection does: found when
/// this probe landed nowhere on Debian's 6.1 and in ztunnel on this machine's kernel.
pub fn routing() -> Vec<u8> {
    vec![0, 0, 0, 0, 0, 0, 0, 0]
}
