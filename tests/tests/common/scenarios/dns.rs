//! DNS capture (`--dns-capture`).

use super::super::{Lab, Mode};
use zdivert_tests::{
    apps::{UdpEcho, sa},
    ztunnel::MeshConfig,
};

/// `--dns-capture`: an ambient pod's DNS, over UDP and TCP, is answered by ztunnel's DNS proxy
/// (a name only ztunnel's config knows), from the address the pod asked (both families in-pod);
/// without the option DNS is untouched and reaches the server the pod asked.
pub fn dns_capture_answers_from_ztunnel_and_only_when_enabled(mode: Mode) -> anyhow::Result<()> {
    use zdivert_tests::dns::{resolve_tcp, resolve_udp};
    let vip = super::REVIEWS_VIP;
    let mesh = |_: &zdivert_tests::topology::Topology| MeshConfig {
        services: vec![super::reviews_service()],
        ..Default::default()
    };
    let name = "reviews.default.svc.cluster.local";
    for capture in [true, false] {
        let lab = if capture {
            Lab::real_with(
                mode,
                mesh,
                &[("ISTIO_META_DNS_CAPTURE", "true")],
                &["--dns-capture"],
            )?
        } else {
            Lab::real(mode, mesh)?
        };
        let (pp, sleep) = (lab.w2().pod("productpage-v1"), lab.w2().pod("sleep"));
        // The pod's nameserver is another pod here: whatever answers, answers as it.
        let server = sa(sleep.ip, 53);
        let echo = UdpEcho::start(&sleep.ns, 53)?;
        if capture {
            // IPv6 DNS is captured in in-pod mode only (node-level capture is IPv4).
            let server6 = sa(sleep.ip6, 53);
            let servers: &[_] = if mode.is_in_pod() {
                &[server, server6]
            } else {
                &[server]
            };
            for &server in servers {
                for (how, answer) in [
                    ("UDP", resolve_udp(&pp.ns, server, name)),
                    ("TCP", resolve_tcp(&pp.ns, server, name)),
                ] {
                    let (addr, from) = answer?;
                    assert_eq!(addr, vip, "{mode:?} {how} {server}: ztunnel resolved it");
                    assert_eq!(from, server, "{mode:?} {how}: answered as the server asked");
                }
            }
            assert_eq!(echo.received(), 0, "the pod's nameserver saw nothing");
        } else {
            let r = resolve_udp(&pp.ns, server, name);
            assert!(r.is_err(), "not a DNS server: only its echo answers: {r:?}");
            assert_eq!(echo.received(), 1, "DNS went where the pod sent it");
        }
    }
    Ok(())
}

/// One pod asking DNS from every port, UDP and TCP (a flood, or a resolver gone wrong), and
/// claiming another pod's address too, degrades only its own DNS: another pod's queries in
/// flight are still answered from the server they asked. The answers are sent as ztunnel's DNS
/// proxy sends them (from its address and :15053) after the flood, so it cannot miss the window.
pub fn a_dns_flood_from_one_pod_keeps_other_pods_dns(mode: Mode) -> anyhow::Result<()> {
    use std::{net::UdpSocket, time::Duration};
    use zdivert_tests::{dns::resolve_udp, packets, raw};
    let lab = Lab::real_with(
        mode,
        |_| MeshConfig {
            services: vec![super::reviews_service()],
            ..Default::default()
        },
        &[("ISTIO_META_DNS_CAPTURE", "true")],
        &["--dns-capture"],
    )?;
    let w2 = lab.w2();
    let (victim, flooder, sleep) = (
        w2.pod("productpage-v1"),
        w2.pod("reviews-v1"),
        w2.pod("sleep"),
    );
    let server = sa(sleep.ip, 53);
    let name = "reviews.default.svc.cluster.local";
    assert_eq!(
        resolve_udp(&victim.ns, server, name)?.1,
        server,
        "capture works"
    );

    // The victim's resolver: a socket connected to its server takes answers from it alone.
    // Queries still in flight when the flood comes, unanswered, so that nothing has looked
    // their flows up (an LRU keeps what was used): each ztunnel leaves one of these two
    // unanswered, malformed bytes (1.22) or a message that says it is an answer (1.31).
    let mut resolvers = Vec::new();
    for query in [
        &b"not DNS"[..],
        &[0x12, 0x34, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0],
    ] {
        // A socket connected to its server takes answers from it alone.
        let resolver = victim.ns.exec(move || -> anyhow::Result<UdpSocket> {
            let s = UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(server)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })?;
        resolver.send(query)?;
        resolvers.push(resolver);
    }

    // From every port, over UDP and TCP: four times what the node's flow map once held; and
    // from every port over UDP again, claiming the victim's address.
    let query = |src, proto, sport| {
        let l4 = match proto {
            6 => packets::tcp(sport, 53, packets::SYN),
            _ => packets::udp(sport, 53),
        };
        (sleep.ip, packets::V4::new(src, sleep.ip, proto).packet(&l4))
    };
    let own: Vec<_> = (1024..=u16::MAX)
        .flat_map(|sport| [query(flooder.ip, 17, sport), query(flooder.ip, 6, sport)])
        .collect();
    let forged: Vec<_> = (1024..=u16::MAX)
        .map(|sport| query(victim.ip, 17, sport))
        .collect();
    let (own_sent, forged_sent) = (own.len() as u64, forged.len() as u64);
    raw::send_from_every_cpu(&flooder.ns, own.into_iter().chain(forged).collect())?;
    std::thread::sleep(Duration::from_millis(500));
    // The answer to the victim's query as the proxy sends it: from ztunnel's address at node
    // level; in-pod, from loopback in the pod's own netns, by a socket with ztunnel's mark.
    let (from_ns, proxy, mark) = match mode.is_in_pod() {
        true => (
            &victim.ns,
            std::net::Ipv4Addr::LOCALHOST,
            Some(zdivert_common::MARK_INPOD_ZTUNNEL),
        ),
        false => (&w2.ztunnel.ns, w2.ztunnel.ip, None),
    };
    for resolver in resolvers {
        let port = resolver.local_addr()?.port();
        let answer = packets::V4::new(proxy, victim.ip, 17).packet(&packets::udp(15053, port));
        raw::send_marked(from_ns, vec![(victim.ip, answer)], mark)?;
        // Only the crafted answer counts (ztunnel answers some queries with an error).
        let mut buf = [0u8; 512];
        loop {
            let n = resolver.recv(&mut buf).map_err(|e| {
                anyhow::anyhow!("{mode:?}: no answer from the victim's server after the flood: {e}")
            })?;
            if &buf[..n] == b"ping" {
                break;
            }
        }
    }
    // The flood was taken for DNS, and what claimed the victim's address was refused.
    let counted = |path: &str, outcome: &str| lab.agent2().counter(path, outcome);
    let (captured, refused) = match mode {
        Mode::InPodEbpf => (
            counted("pod_egress", "dns_to_ztunnel")?,
            counted("pod_egress", "dropped_dns_from_another_address")?,
        ),
        m if m.is_ebpf() => (
            counted("outbound", "dns_to_ztunnel")?,
            counted("outbound", "dropped_forged_source")?,
        ),
        _ => (own_sent, forged_sent),
    };
    assert!(
        captured >= own_sent && refused >= forged_sent,
        "{mode:?}: {captured} captured, {refused} refused"
    );
    Ok(())
}
