//! What only the eBPF dataplane does, through the real ztunnel: ICMP errors about ztunnel's
//! connections, the node's own connections told from ztunnel's and from forged ones, a node
//! address gained at run time, a foreign program in front. The scenarios every mode passes are in `paths.rs`.
mod common;

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use common::{
    Lab, Mode,
    scenarios::{from_to, node_port_rule},
};
use zdivert_tests::{
    apps::{TcpServer, connect_from, exchange, request, sa},
    packets::{SYN, V4, tcp},
    raw::{self, Sniffer},
    ztunnel::MeshConfig,
};

/// `Icmp: InDestUnreachs` of a netns: ICMP errors its stack took in.
fn dest_unreachs(ns: &zdivert_tests::ns::Netns) -> anyhow::Result<u64> {
    ns.net_counter("snmp", "Icmp", "InDestUnreachs")
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn icmp_errors_about_ztunnels_connections_reach_ztunnel_not_the_pod() -> anyhow::Result<()> {
    use zdivert_tests::{
        apps::{connect, exchange},
        packets::V4,
        raw,
    };
    let lab = Lab::real(Mode::Ebpf, |_| MeshConfig::default())?;
    let (w2, pp) = (lab.w2(), lab.w2().pod("productpage-v1"));
    let (details, sender) = (lab.w1().pod("details-v1"), lab.w1().pod("curl"));
    let _server = TcpServer::start(&details.ns, "details-v1", 9080)?;
    // productpage → details-v1 through ztunnel, kept open: ztunnel's HBONE connection to
    // details-v1:15008 is made in productpage's name (its address, a port of ztunnel's choosing).
    let conn = connect(
        &pp.ns,
        sa(details.ip, 9080),
        std::time::Duration::from_secs(3),
    )?;
    exchange(&conn)?;
    let upstream_src = local_addr_towards(&w2.ztunnel.ns, sa(details.ip, 15008))?;
    assert_eq!(upstream_src.ip(), std::net::IpAddr::from(pp.ip));

    // A router on the way says: fragmentation needed for that upstream connection.
    let mut quoted_tcp = vec![0u8; 8];
    quoted_tcp[..2].copy_from_slice(&upstream_src.port().to_be_bytes());
    quoted_tcp[2..4].copy_from_slice(&15008u16.to_be_bytes());
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00]; // type 3 code 4, next-hop MTU 1280
    icmp.extend(V4::new(pp.ip, details.ip, 6).packet(&quoted_tcp));
    let sum = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let packet = V4::new(sender.ip, pp.ip, 1).packet(&icmp);

    let (zt_before, pod_before) = (dest_unreachs(&w2.ztunnel.ns)?, dest_unreachs(&pp.ns)?);
    raw::send(&sender.ns, pp.ip, packet)?;
    zdivert_tests::eventually(
        "ztunnel's stack took the ICMP error",
        std::time::Duration::from_secs(5),
        || Ok(dest_unreachs(&w2.ztunnel.ns)? > zt_before),
    )?;
    assert_eq!(
        dest_unreachs(&pp.ns)?,
        pod_before,
        "the pod has no such connection: it must not get the error"
    );

    // An error about the pod's direct traffic with the node stays the pod's.
    let mut quoted = V4::new(pp.ip, w2.gateway, 6).packet(&quoted_tcp);
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00];
    icmp.append(&mut quoted);
    let sum = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    raw::send(
        &sender.ns,
        pp.ip,
        V4::new(sender.ip, pp.ip, 1).packet(&icmp),
    )?;
    zdivert_tests::eventually(
        "the pod took the error about its node traffic",
        std::time::Duration::from_secs(5),
        || Ok(dest_unreachs(&pp.ns)? > pod_before),
    )?;
    drop(conn);
    Ok(())
}

/// The local address of an established connection to `dst` in `ns`, from `ss`.
fn local_addr_towards(
    ns: &zdivert_tests::ns::Netns,
    dst: std::net::SocketAddr,
) -> anyhow::Result<std::net::SocketAddr> {
    let out = ns.cmd("ss", &["-Htn", "state", "established"])?;
    out.lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let (local, peer) = (cols.get(cols.len().checked_sub(2)?)?, cols.last()?);
            (peer.parse::<std::net::SocketAddr>().ok()? == dst).then(|| local.parse().ok())?
        })
        .ok_or_else(|| anyhow::anyhow!("no connection to {dst} in ztunnel's netns:\n{out}"))
}

/// A node listener on a port is no connection of the node's. ztunnel serves a NodePort client
/// (masqueraded to the node's address) with a connection from that address and a port of its
/// own netns's range; where the node listens on that port (pinned here to 40000 so that they
/// meet), the pod's answers are still ztunnel's, and the client is served.
#[test]
fn a_node_listener_on_ztunnels_port_does_not_take_a_node_port_connection() -> anyhow::Result<()> {
    let lab = Lab::real(Mode::Ebpf, |_| MeshConfig::default())?;
    let (w2, rv2, curl) = (lab.w2(), lab.w2().pod("reviews-v2"), lab.w1().pod("curl"));
    let _server = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;
    let port = 40000;
    let _node_listener = TcpServer::start(&w2.ns, "node", port)?;
    w2.ztunnel.ns.cmd(
        "sysctl",
        &[
            "-qw",
            &format!("net.ipv4.ip_local_port_range={port} {port}"),
        ],
    )?;
    node_port_rule(w2, 30081, sa(rv2.ip, 9080))?;
    let conn = connect_from(
        &curl.ns,
        0,
        SocketAddr::new(w2.underlay_ip.into(), 30081),
        Duration::from_secs(3),
    )?;
    let reply = exchange(&conn)?;
    assert_eq!(reply.server, "reviews-v2");
    let upstream = local_addr_towards(&w2.ztunnel.ns, sa(rv2.ip, 9080))?;
    assert_eq!(
        upstream.port(),
        port,
        "ztunnel's connection did not meet the listener"
    );
    // ztunnel logs a connection when it closes.
    drop(conn);
    lab.zt2()
        .wait_access(1, |a| {
            a.direction() == "inbound" && a.dst_workload() == "reviews-v2"
        })
        .map(|_| ())
}

/// The exemptions of `zd_inbound` are decided by where a packet came from, not only by the
/// source address it claims: a process on the node (a hostNetwork pod keeps CAP_NET_RAW)
/// sending with a source that is not the node's, and a process on the other node claiming this
/// node's ztunnel, are captured like any client (the latter then dropped by ztunnel's stack: a
/// packet from its own address). The node's own address still goes straight to the pod
/// (kubelet probes).
#[test]
fn forged_sources_from_the_nodes_are_captured() -> anyhow::Result<()> {
    let lab = Lab::real(Mode::Ebpf, |_| MeshConfig::default())?;
    let (w1, w2, rv1) = (lab.w1(), lab.w2(), lab.w2().pod("reviews-v1"));
    let pod = Sniffer::start("reviews-v1", &rv1.ns)?;
    let redirected = || lab.agent2().counter("inbound", "redirected");
    let probes: [(&str, &zdivert_tests::ns::Netns, Ipv4Addr, bool); 3] = [
        ("the node, as itself", &w2.ns, w2.gateway, false),
        (
            "the node, as no node",
            &w2.ns,
            Ipv4Addr::new(10, 244, 1, 99),
            true,
        ),
        ("the other node, as ztunnel", &w1.ns, w2.ztunnel.ip, true),
    ];
    for (i, (what, ns, src, captured)) in probes.into_iter().enumerate() {
        let sport = 41000 + i as u16;
        let before = redirected()?;
        let mut segment = tcp(sport, 9080, SYN);
        raw::tcp_checksum(src.into(), rv1.ip.into(), &mut segment);
        raw::send(ns, rv1.ip, V4::new(src, rv1.ip, 6).packet(&segment))?;
        // Until the packet is accounted for: delivered to the pod, or redirected to ztunnel.
        zdivert_tests::eventually(what, Duration::from_secs(2), || {
            Ok(!pod.with_sport(sport).is_empty() || redirected()? > before)
        })?;
        std::thread::sleep(Duration::from_millis(250));
        let (in_pod, to_ztunnel) = (!pod.with_sport(sport).is_empty(), redirected()? > before);
        assert_eq!(
            (in_pod, to_ztunnel),
            (!captured, captured),
            "{what}: (reached the pod, redirected to ztunnel)"
        );
    }
    Ok(())
}

/// A CNI's program that returns a final verdict, attached in front of zdivert's, would end the
/// hook's chain before capture runs. The agent finds it at its next reconcile and moves its
/// program back to the front; one attached behind changes nothing. TCX and tc clsact.
fn a_foreign_program_in_front_is_overtaken(mode: Mode) -> anyhow::Result<()> {
    use zdivert_tests::foreign::{ForeignClsact, ForeignTcx, Place};
    let lab = Lab::real_with(
        mode,
        |_| MeshConfig::default(),
        &[],
        &["--resync-secs", "1"],
    )?;
    let (pp, rv1) = (lab.w2().pod("productpage-v1"), lab.w2().pod("reviews-v1"));
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let dst = sa(rv1.ip, 9080);
    let agent = lab.agent2();
    let moved = || agent.metric("zdivert_programs_moved_to_head_total");
    assert_eq!(moved()?, 0.0);
    let node = &lab.w2().ns;
    let in_front = |veth: &str, ingress: bool| -> anyhow::Result<Box<dyn std::any::Any>> {
        Ok(match mode {
            Mode::EbpfClsact => Box::new(ForeignClsact::attach(node, veth, ingress)?),
            _ => Box::new(ForeignTcx::attach(node, veth, ingress, Place::First)?),
        })
    };

    let mut foreign = vec![
        in_front(&pp.host_veth, true)?,
        in_front(&rv1.host_veth, false)?,
    ];
    zdivert_tests::eventually(
        "both programs back in front",
        std::time::Duration::from_secs(10),
        || Ok(moved()? >= 2.0),
    )?;
    let reply = request(&pp.ns, dst)?;
    assert_eq!(reply.peer.ip(), pp.ip);
    lab.zt2().wait_access(1, from_to(pp, dst, "outbound"))?;
    lab.zt2().wait_access(1, from_to(pp, dst, "inbound"))?;

    // Behind ours (TCX only: a tc filter cannot be put behind at priority 1): nothing to do.
    if mode == Mode::Ebpf {
        let before = moved()?;
        let reconciles = agent.metric("zdivert_reconciles_total")?;
        foreign.push(Box::new(ForeignTcx::attach(
            node,
            &pp.host_veth,
            true,
            Place::Last,
        )?));
        agent.wait_reconciles(reconciles as u64 + 2)?;
        assert_eq!(moved()?, before, "a program behind ours is left alone");
    }
    request(&pp.ns, dst)?;
    lab.zt2().wait_access(2, from_to(pp, dst, "outbound"))?;
    Ok(())
}

#[test]
fn a_foreign_tcx_program_in_front_is_overtaken_and_capture_holds() -> anyhow::Result<()> {
    a_foreign_program_in_front_is_overtaken(Mode::Ebpf)
}

#[test]
fn a_foreign_tc_filter_in_front_is_overtaken_and_capture_holds() -> anyhow::Result<()> {
    a_foreign_program_in_front_is_overtaken(Mode::EbpfClsact)
}

/// An address the node gains while the agent runs is the node's from the next apply on: the
/// bit filter `zd_outbound` tests first gets its bit, not only `NODE_IPS` its entry (without
/// the bit, the pod's connection to it would be captured and ztunnel would log it).
#[test]
fn an_address_the_node_gains_is_not_captured_once_the_agent_applied() -> anyhow::Result<()> {
    // The agent reads the node's addresses at each apply, and applies at least every resync.
    let lab = Lab::real_with(
        Mode::Ebpf,
        |_| MeshConfig::default(),
        &[],
        &["--resync-secs", "1"],
    )?;
    let (w2, pp, rv1) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
    );
    let gained = Ipv4Addr::new(172, 18, 0, 200);
    let _node_server = TcpServer::start(&w2.ns, "node", 7070)?;
    let _pod_server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    w2.ns.ip(&format!("addr add {gained}/32 dev lo"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !lab.agent2().status_text()?.contains(&gained.to_string()) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent never listed {gained} among the node's addresses"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let reply = request(&pp.ns, sa(gained, 7070))?;
    assert_eq!(reply.server, "node");
    // Then a captured connection: once ztunnel logged it, it would have logged the first.
    let marker = sa(rv1.ip, 9080);
    request(&pp.ns, marker)?;
    lab.zt2().wait_access(1, from_to(pp, marker, "outbound"))?;
    let around: Vec<_> = lab
        .zt2()
        .access_log()
        .into_iter()
        .filter(|a| a.dst() == Some(sa(gained, 7070)))
        .collect();
    assert!(around.is_empty(), "captured: {around:?}");
    Ok(())
}
