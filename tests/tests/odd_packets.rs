//! Packets crafted with raw sockets inside the pods, in both modes: forged sources, IPv4 options,
//! fragments, TCP without SYN, RST, truncated headers, and packets for ztunnel's own ports and
//! the node. Each must land in ztunnel, be dropped, or (for what is not captured) reach its
//! destination: sniffers in every namespace record where each one was delivered.
mod common;

use std::{net::Ipv4Addr, time::Duration};

use common::Lab;
use zdivert_tests::{
    apps::TcpServer,
    packets::{ACK, SYN, V4, tcp},
    raw::{self, Sniffer},
    topology::Pod,
};

const RST: u8 = 0x04;
const IPPROTO_TCP: u8 = 6;

struct Probe {
    what: &'static str,
    from: &'static str,
    src: Option<Ipv4Addr>,
    dst: Ipv4Addr,
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
}

fn probe(what: &'static str, from: &'static str, dst: Ipv4Addr, dport: u16) -> Probe {
    Probe {
        what,
        from,
        src: None,
        dst,
        dport,
        flags: SYN,
        options: vec![],
        frag: 0x4000,
        tcp_len: 20,
        may_land: &[],
        must_land: &[],
    }
}

fn run(mode: &str) -> anyhow::Result<()> {
    let lab = Lab::start_mode(mode, vec![])?;
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
            src: Some(sleep.ip),
            ..probe(
                "forged non-ambient source to a non-ambient pod",
                "productpage-v1",
                sleep.ip,
                9080,
            )
        },
        Probe {
            src: Some(curl_ip),
            ..probe(
                "forged source to a pod on another node",
                "productpage-v1",
                curl_ip,
                8080,
            )
        },
        Probe {
            src: Some(rv2.ip),
            ..probe(
                "another ambient pod's source",
                "productpage-v1",
                rv1.ip,
                9080,
            )
        },
        Probe {
            src: Some(Ipv4Addr::new(10, 244, 2, 99)),
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
    ];
    let mut failures = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        let sport = 40000 + i as u16;
        let from = if p.from == "sleep" {
            sleep
        } else {
            pod(p.from)
        };
        let src = p.src.unwrap_or(from.ip);
        let mut segment = tcp(sport, p.dport, p.flags);
        raw::tcp_checksum(src, p.dst, &mut segment);
        segment.truncate(p.tcp_len);
        let mut v4 = V4::new(src, p.dst, IPPROTO_TCP);
        v4.options = p.options.clone();
        v4.frag = p.frag;
        raw::send(&from.ns, p.dst, v4.packet(&segment))?;
        std::thread::sleep(Duration::from_millis(250));
        let landed: Vec<&str> = sniffers
            .iter()
            .filter(|s| !s.with_sport(sport).is_empty())
            .map(|s| s.name.as_str())
            .collect();
        let wrong: Vec<&&str> = landed.iter().filter(|l| !p.may_land.contains(l)).collect();
        let missed: Vec<&&str> = p.must_land.iter().filter(|m| !landed.contains(m)).collect();
        println!("{mode}: {:<50} landed in {landed:?}", p.what);
        if !wrong.is_empty() || !missed.is_empty() {
            failures.push(format!(
                "{}: landed in {landed:?}, allowed {:?}, required {:?}",
                p.what, p.may_land, p.must_land
            ));
        }
    }
    assert!(failures.is_empty(), "{mode}:\n{}", failures.join("\n"));
    if mode == "ebpf" {
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
    run("ebpf")
}

#[test]
fn iptables_mode_delivers_odd_packets_to_ztunnel_or_nowhere() -> anyhow::Result<()> {
    run("iptables")
}
