//! The odd-packet suite from inside in-pod pods, both redirections (see `odd_packets.rs`).
mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{Lab, Mode};
use zdivert_tests::{
    apps::TcpServer,
    odd::{Frame, Probe, RST, deliver, hop_by_hop, probe, routing},
    packets::ACK,
    raw::Sniffer,
    topology::Pod,
};

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
    let framed =
        |what, tags, qdisc_bypass, landing: &'static [&'static str]| -> anyhow::Result<Probe> {
            Ok(Probe {
                frame: Some(Frame {
                    to: w2.gateway_mac(pp)?,
                    vlan0_tags: tags,
                    qdisc_bypass,
                }),
                may_land: landing,
                must_land: landing,
                ..probe(what, "productpage-v1", sleep.ip, 9080)
            })
        };
    // A packet socket's frames never meet the pod's netfilter hooks: istio-cni's rules cannot
    // see them (README, "what cannot get around ztunnel"). The programs see every frame: a
    // plain one is captured, a tagged one dropped, and one past the qdisc (and so past the
    // egress hook) is dropped by the guard on the pod's host veth.
    let (plain_frame, odd_frames): (&[&str], &[&str]) = match mode {
        Mode::InPodIptables => (&["sleep"], &["sleep"]),
        _ => (HERE, &[]),
    };
    let mut probes = probes;
    probes.extend([
        Probe {
            exts: vec![(60, hop_by_hop()); 9],
            may_land: HERE,
            ..probe(
                "nine IPv6 extension headers",
                "productpage-v1",
                sleep.ip6,
                9080,
            )
        },
        framed("a frame from a packet socket", 0, false, plain_frame)?,
        framed("a frame with a VLAN-0 tag", 1, false, odd_frames)?,
        framed("a frame with two VLAN-0 tags", 2, false, odd_frames)?,
        framed(
            "a frame past the qdisc (PACKET_QDISC_BYPASS)",
            0,
            true,
            odd_frames,
        )?,
    ]);
    let failures = deliver(mode, &probes, &sniffers, |name| pod(name))?;
    assert!(failures.is_empty(), "{mode:?}:\n{}", failures.join("\n"));
    if mode == Mode::InPodEbpf {
        // The two IPv4 fragments and the IPv6 one, the nine extension headers and the two
        // tagged frames, dropped by the egress program.
        assert!(lab.agent2().counter("pod_egress", "dropped_malformed")? >= 6);
        // The frame past the qdisc, dropped by the guard on the host veth.
        assert!(lab.agent2().counter("pod_guard", "dropped_past_egress")? >= 1);
    }
    Ok(())
}

#[test]
fn inpod_ebpf_mode_keeps_odd_packets_in_the_senders_ztunnel_or_drops_them() -> anyhow::Result<()> {
    run_in_pod(Mode::InPodEbpf)
}

#[test]
fn inpod_iptables_mode_keeps_odd_packets_in_the_senders_ztunnel_or_drops_them() -> anyhow::Result<()>
{
    run_in_pod(Mode::InPodIptables)
}

/// TCP simultaneous open from an ambient pod: its socket waits in SYN_SENT (ztunnel's keyless
/// listener drops its MD5-signed SYN), and a cooperating peer outside the mesh connects to
/// that socket's port with the same key. Captured as inbound, the peer's SYN goes to ztunnel's
/// listener, never to the pod's waiting socket: neither side gets a connection. The same two
/// steps between two pods outside the mesh do connect, so the mechanism is real here.
fn simultaneous_open_gets_no_connection_around_ztunnel(mode: Mode) -> anyhow::Result<()> {
    use std::{net::SocketAddr, time::Duration};
    use zdivert_tests::{apps::sa, simopen::simultaneous_open};
    let lab = Lab::real(mode, |_| zdivert_tests::ztunnel::MeshConfig::default())?;
    let (pp, sleep, curl) = (
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("sleep"),
        lab.w1().pod("curl"),
    );
    let open = |a: &Pod, b: &Pod, ports: (u16, u16)| {
        // The first side's own SYN, should it reach the peer before the peer connects, would
        // be answered with a reset: the peer drops plain SYNs to its port.
        sleep.ns.iptables(&format!(
            "-A INPUT -p tcp --dport {} --tcp-flags SYN,ACK,RST SYN -j DROP",
            ports.1
        ))?;
        let ends: (SocketAddr, SocketAddr) = (sa(a.ip, ports.0), sa(b.ip, ports.1));
        simultaneous_open((&a.ns, ends.0), (&b.ns, ends.1), Duration::from_secs(3))
    };
    let control = open(curl, sleep, (42000, 42001))?;
    control
        .a
        .and(control.b)
        .map_err(|e| e.context("outside the mesh"))?;

    let captured = open(pp, sleep, (42002, 42003))?;
    // Both wait unanswered: the pod's SYN and the peer's each met only ztunnel's listener.
    let timed_out = |r: &anyhow::Result<std::net::TcpStream>| {
        r.as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
    };
    assert!(
        timed_out(&captured.a) && timed_out(&captured.b),
        "{mode:?}: the pod's {:?}, the peer's {:?}",
        captured.a.map(|s| s.local_addr()),
        captured.b.map(|s| s.peer_addr())
    );
    Ok(())
}

#[test]
fn inpod_ebpf_mode_gets_no_simultaneous_open_around_ztunnel() -> anyhow::Result<()> {
    simultaneous_open_gets_no_connection_around_ztunnel(Mode::InPodEbpf)
}

#[test]
fn inpod_iptables_mode_gets_no_simultaneous_open_around_ztunnel() -> anyhow::Result<()> {
    simultaneous_open_gets_no_connection_around_ztunnel(Mode::InPodIptables)
}
