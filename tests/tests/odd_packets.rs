//! Packets crafted with raw sockets inside the pods, in both modes: forged sources, IPv4 options,
//! fragments, TCP without SYN, RST, truncated headers, and packets for ztunnel's own ports and
//! the node. Each must land in ztunnel, be dropped, or (for what is not captured) reach its
//! destination: sniffers in every namespace record where each one was delivered. In-pod mode,
//! where ztunnel listens in the pods themselves, has a table of its own.
mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use common::{Lab, Mode};
use zdivert_tests::{
    apps::TcpServer,
    packets::{ACK, SYN, V4, tcp, v6},
    raw::{self, Sniffer},
    topology::Pod,
};

const RST: u8 = 0x04;
const IPPROTO_TCP: u8 = 6;

struct Probe {
    what: &'static str,
    from: &'static str,
    src: Option<IpAddr>,
    dst: IpAddr,
    /// IPv6 extension headers (type, bytes).
    exts: Vec<(u8, Vec<u8>)>,
    dport: u16,
    flags: u8,
    options: Vec<u8>,
    frag: u16,
    /// Bytes of the TCP header sent (20 = whole).
    tcp_len: usize,
    /// Where it may be delivered (sniffer names); nowhere else.
    may_land: &'static [&'static str],
    /// Where it must be delivered.
    must_land: &'static [&'static str],
    /// IPv6 that must reach ztunnel, in every mode.
    v6_captured: bool,
}

fn probe(what: &'static str, from: &'static str, dst: impl Into<IpAddr>, dport: u16) -> Probe {
    Probe {
        what,
        from,
        src: None,
        dst: dst.into(),
        exts: vec![],
        v6_captured: false,
        dport,
        flags: SYN,
        options: vec![],
        frag: 0x4000,
        tcp_len: 20,
        may_land: &[],
        must_land: &[],
    }
}

fn run(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| zdivert_tests::ztunnel::MeshConfig::default())?;
    let w2 = lab.w2();
    let pod = |n: &str| -> &Pod { w2.pod(n) };
    let (_pp, rv1, rv2, sleep) = (
        pod("productpage-v1"),
        pod("reviews-v1"),
        pod("reviews-v2"),
        pod("sleep"),
    );
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let sniffers = [
        Sniffer::start("reviews-v1", &rv1.ns)?,
        Sniffer::start("reviews-v2", &rv2.ns)?,
        Sniffer::start("sleep", &sleep.ns)?,
        Sniffer::start("ztunnel", &w2.ztunnel.ns)?,
        Sniffer::start("node", &w2.ns)?,
        Sniffer::start("curl", &lab.w1().pod("curl").ns)?,
    ];
    let curl_ip = lab.w1().pod("curl").ip;
    let ztunnel_ip = w2.ztunnel.ip;
    let probes = vec![
        Probe {
            may_land: &["ztunnel"],
            must_land: &["ztunnel"],
            ..probe("plain SYN (control)", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            src: Some(sleep.ip.into()),
            ..probe(
                "forged non-ambient source to a non-ambient pod",
                "productpage-v1",
                sleep.ip,
                9080,
            )
        },
        Probe {
            src: Some(curl_ip.into()),
            ..probe(
                "forged source to a pod on another node",
                "productpage-v1",
                curl_ip,
                8080,
            )
        },
        Probe {
            src: Some(rv2.ip.into()),
            ..probe(
                "another ambient pod's source",
                "productpage-v1",
                rv1.ip,
                9080,
            )
        },
        Probe {
            src: Some(Ipv4Addr::new(10, 244, 2, 99).into()),
            ..probe("unknown source", "reviews-v2", sleep.ip, 9080)
        },
        Probe {
            options: vec![1, 1, 1, 0], // NOP NOP NOP EOL
            may_land: &["ztunnel"],
            ..probe("IPv4 options", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            frag: 0x2000, // more fragments, offset 0: never completed
            ..probe("first fragment", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            frag: 0x0004, // offset 32 bytes, last fragment
            ..probe("later fragment", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            flags: ACK,
            may_land: &["ztunnel"],
            ..probe("TCP without SYN", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            flags: RST,
            may_land: &["ztunnel"],
            ..probe("RST", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            tcp_len: 8,
            ..probe("truncated TCP header", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            flags: ACK,
            may_land: &["ztunnel"],
            ..probe("inbound TCP without SYN", "sleep", rv1.ip, 9080)
        },
        Probe {
            may_land: &["ztunnel"],
            must_land: &["ztunnel"],
            ..probe(
                "to ztunnel's own :15001",
                "productpage-v1",
                ztunnel_ip,
                15001,
            )
        },
        Probe {
            may_land: &["ztunnel", "node"],
            ..probe("to the node", "productpage-v1", w2.gateway, 10250)
        },
        Probe {
            may_land: &["ztunnel"],
            v6_captured: true,
            ..probe("IPv6 SYN (control)", "productpage-v1", rv1.ip6, 9080)
        },
        Probe {
            src: Some(sleep.ip6.into()),
            ..probe("forged IPv6 source", "productpage-v1", sleep.ip6, 9080)
        },
        Probe {
            src: Some(rv2.ip6.into()),
            ..probe(
                "another ambient pod's IPv6 source",
                "productpage-v1",
                rv1.ip6,
                9080,
            )
        },
        Probe {
            exts: vec![(0, hop_by_hop()), (43, routing()), (60, hop_by_hop())],
            may_land: &["ztunnel"],
            v6_captured: true,
            ..probe("IPv6 extension headers", "productpage-v1", rv1.ip6, 9080)
        },
        Probe {
            exts: vec![(44, vec![0, 0, 0, 1, 0, 0, 0, 7])],
            ..probe("IPv6 first fragment", "productpage-v1", rv1.ip6, 9080)
        },
        Probe {
            flags: ACK,
            may_land: &["ztunnel"],
            v6_captured: true,
            ..probe("inbound IPv6 without SYN", "sleep", rv1.ip6, 9080)
        },
    ];
    let failures = deliver(mode, &probes, &sniffers, |name| pod(name))?;
    assert!(failures.is_empty(), "{mode:?}:\n{}", failures.join("\n"));
    if mode.is_ebpf() {
        assert!(lab.agent2().counter("outbound", "dropped_forged_source")? >= 4);
        assert!(lab.agent2().counter("outbound", "dropped_malformed")? >= 1);
    } else {
        let forged =
            zdivert_tests::fallback::rule_packets(&w2.ns, "ztunnel-pods-srcs src,src -j DROP")?;
        assert!(forged >= 4, "the forged-source rule counted {forged}");
    }
    Ok(())
}

/// Sends each probe from its pod and checks where the sniffers saw it delivered: the failures,
/// one line each.
fn deliver<'a>(
    mode: Mode,
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
        match (src, p.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut v4 = V4::new(s, d, IPPROTO_TCP);
                v4.options = p.options.clone();
                v4.frag = p.frag;
                raw::send(&from.ns, d, v4.packet(&segment))?;
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                raw::send6(&from.ns, d, v6(s, d, &p.exts, IPPROTO_TCP, &segment))?;
            }
            _ => anyhow::bail!("{}: mixed families", p.what),
        }
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
        let _ = zdivert_tests::eventually(p.what, Duration::from_secs(2), || {
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
fn hop_by_hop() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// A routing header with no segments left (nothing to route through).
fn routing() -> Vec<u8> {
    vec![0, 0, 2, 0, 0, 0, 0, 0]
}

/// In-pod: ztunnel listens inside each ambient pod, so a captured packet never leaves the
/// sender's netns. Whatever a SYN from an ambient pod looks like, it lands in that pod (ztunnel
/// there, which speaks for that pod alone) or nowhere; a segment without SYN may reach the
/// destination pod, whose own capture hands it to ztunnel's listener there, which resets it.
fn run_in_pod(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| zdivert_tests::ztunnel::MeshConfig::default())?;
    let w2 = lab.w2();
    let pod = |n: &str| -> &Pod { w2.pod(n) };
    let (pp, rv1, rv2, sleep) = (
        pod("productpage-v1"),
        pod("reviews-v1"),
        pod("reviews-v2"),
        pod("sleep"),
    );
    let curl = lab.w1().pod("curl");
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let sniffers = [
        Sniffer::start("productpage-v1", &pp.ns)?,
        Sniffer::start("reviews-v1", &rv1.ns)?,
        Sniffer::start("reviews-v2", &rv2.ns)?,
        Sniffer::start("sleep", &sleep.ns)?,
        Sniffer::start("ztunnel's own pod", &w2.ztunnel.ns)?,
        Sniffer::start("node", &w2.ns)?,
        Sniffer::start("curl", &curl.ns)?,
    ];
    const HERE: &[&str] = &["productpage-v1"];
    // A segment without SYN: ztunnel's listener in the sender (istio-cni's rules take it) or in
    // the destination (the programs pass it as a reply, the destination's capture takes it).
    const THERE: &[&str] = &["productpage-v1", "reviews-v1"];
    let captured = |what, dst: IpAddr, dport| Probe {
        may_land: HERE,
        must_land: HERE,
        ..probe(what, "productpage-v1", dst, dport)
    };
    let forged = |what, src: IpAddr, dst: IpAddr, dport| Probe {
        src: Some(src),
        may_land: HERE,
        ..probe(what, "productpage-v1", dst, dport)
    };
    let probes = vec![
        captured("plain SYN (control)", rv1.ip.into(), 9080),
        forged(
            "forged non-ambient source to a non-ambient pod",
            sleep.ip.into(),
            sleep.ip.into(),
            9080,
        ),
        forged(
            "forged source to a pod on another node",
            curl.ip.into(),
            curl.ip.into(),
            8080,
        ),
        forged(
            "another ambient pod's source",
            rv2.ip.into(),
            rv1.ip.into(),
            9080,
        ),
        Probe {
            src: Some(Ipv4Addr::new(10, 244, 2, 99).into()),
            may_land: &["reviews-v2"],
            ..probe("unknown source", "reviews-v2", sleep.ip, 9080)
        },
        Probe {
            options: vec![1, 1, 1, 0], // NOP NOP NOP EOL
            ..captured("IPv4 options", rv1.ip.into(), 9080)
        },
        Probe {
            frag: 0x2000, // more fragments, offset 0: never completed
            ..probe("first fragment", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            frag: 0x0004, // offset 32 bytes, last fragment
            ..probe("later fragment", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            flags: ACK,
            may_land: THERE,
            ..probe("TCP without SYN", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            flags: RST,
            may_land: THERE,
            ..probe("RST", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            tcp_len: 8,
            may_land: THERE,
            ..probe("truncated TCP header", "productpage-v1", rv1.ip, 9080)
        },
        Probe {
            flags: ACK,
            may_land: THERE,
            ..probe("inbound TCP without SYN", "sleep", rv1.ip, 9080)
        },
        captured("to ztunnel's own pod", w2.ztunnel.ip.into(), 15001),
        captured("to the node", w2.gateway.into(), 10250),
        captured("IPv6 SYN (control)", rv1.ip6.into(), 9080),
        forged(
            "forged IPv6 source",
            sleep.ip6.into(),
            sleep.ip6.into(),
            9080,
        ),
        forged(
            "another ambient pod's IPv6 source",
            rv2.ip6.into(),
            rv1.ip6.into(),
            9080,
        ),
        Probe {
            exts: vec![(0, hop_by_hop()), (43, routing()), (60, hop_by_hop())],
            ..captured("IPv6 extension headers", rv1.ip6.into(), 9080)
        },
        Probe {
            exts: vec![(44, vec![0, 0, 0, 1, 0, 0, 0, 7])],
            ..probe("IPv6 first fragment", "productpage-v1", rv1.ip6, 9080)
        },
        Probe {
            flags: ACK,
            may_land: THERE,
            ..probe("inbound IPv6 without SYN", "sleep", rv1.ip6, 9080)
        },
    ];
    let failures = deliver(mode, &probes, &sniffers, |name| pod(name))?;
    assert!(failures.is_empty(), "{mode:?}:\n{}", failures.join("\n"));
    if mode == Mode::InPodEbpf {
        // The two IPv4 fragments and the IPv6 one, dropped by the egress program.
        assert!(lab.agent2().counter("pod_egress", "dropped_malformed")? >= 3);
    }
    Ok(())
}

#[test]
fn ebpf_mode_delivers_odd_packets_to_ztunnel_or_nowhere() -> anyhow::Result<()> {
    run(Mode::Ebpf)
}

#[test]
fn iptables_mode_delivers_odd_packets_to_ztunnel_or_nowhere() -> anyhow::Result<()> {
    run(Mode::Iptables)
}

#[test]
fn in_pod_ebpf_mode_keeps_odd_packets_in_the_senders_ztunnel_or_drops_them() -> anyhow::Result<()> {
    run_in_pod(Mode::InPodEbpf)
}

#[test]
fn in_pod_iptables_mode_keeps_odd_packets_in_the_senders_ztunnel_or_drops_them()
-> anyhow::Result<()> {
    run_in_pod(Mode::InPodIptables)
}
