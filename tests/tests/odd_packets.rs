//! Packets crafted with raw sockets inside the pods, in both modes: forged sources, IPv4 options,
//! fragments, TCP without SYN, RST, truncated headers, and packets for ztunnel's own ports and
//! the node. Each must land in ztunnel, be dropped, or (for what is not captured) reach its
//! destination: sniffers in every namespace record where each one was delivered. In-pod mode,
//! where ztunnel listens in the pods themselves, has its own table (`odd_packets_inpod.rs`).
mod common;

use std::net::Ipv4Addr;

use common::{Lab, Mode};
use zdivert_tests::{
    apps::TcpServer,
    odd::{Frame, Probe, RST, deliver, hop_by_hop, probe, routing},
    packets::ACK,
    raw::Sniffer,
    topology::Pod,
};

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
        Probe {
            exts: vec![(60, hop_by_hop()); 9],
            may_land: &["ztunnel"],
            ..probe(
                "nine IPv6 extension headers",
                "productpage-v1",
                sleep.ip6,
                9080,
            )
        },
    ];
    // Frames from a packet socket meet capture on the host veth whatever the pod does to its
    // own egress path: tagged ones too (the stack would strip a VLAN-0 tag and route what it
    // carries), in ztunnel or nowhere.
    let framed =
        |what, tags, qdisc_bypass, must: &'static [&'static str]| -> anyhow::Result<Probe> {
            Ok(Probe {
                frame: Some(Frame {
                    to: w2.gateway_mac(pod("productpage-v1"))?,
                    vlan0_tags: tags,
                    qdisc_bypass,
                }),
                may_land: &["ztunnel"],
                must_land: must,
                ..probe(what, "productpage-v1", sleep.ip, 9080)
            })
        };
    let mut probes = probes;
    probes.extend([
        framed("a frame from a packet socket", 0, false, &["ztunnel"])?,
        framed("a frame with a VLAN-0 tag", 1, false, &[])?,
        framed("a frame with two VLAN-0 tags", 2, false, &[])?,
        framed(
            "a frame past the qdisc (PACKET_QDISC_BYPASS)",
            0,
            true,
            &["ztunnel"],
        )?,
    ]);
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

#[test]
fn ebpf_mode_delivers_odd_packets_to_ztunnel_or_nowhere() -> anyhow::Result<()> {
    run(Mode::Ebpf)
}

#[test]
fn iptables_mode_delivers_odd_packets_to_ztunnel_or_nowhere() -> anyhow::Result<()> {
    run(Mode::Iptables)
}
