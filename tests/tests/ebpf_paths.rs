//! The eBPF dataplane on the article's nodes: the shared packet-path scenarios.
mod common;

use common::scenarios;

#[test]
fn outbound_same_node_goes_through_15001_with_original_destination() -> anyhow::Result<()> {
    scenarios::outbound_same_node_goes_through_15001_with_original_destination("ebpf")
}

#[test]
fn service_vip_reaches_ztunnel_before_any_dnat() -> anyhow::Result<()> {
    scenarios::service_vip_reaches_ztunnel_before_any_dnat("ebpf")
}

#[test]
fn inbound_from_a_non_ambient_pod_lands_on_15006_and_port_15008_on_15008() -> anyhow::Result<()> {
    scenarios::inbound_from_a_non_ambient_pod_lands_on_15006_and_port_15008_on_15008("ebpf")
}

#[test]
fn cross_node_goes_ztunnel_to_ztunnel_and_the_server_sees_the_client_pod() -> anyhow::Result<()> {
    scenarios::cross_node_goes_ztunnel_to_ztunnel_and_the_server_sees_the_client_pod("ebpf")
}

#[test]
fn non_ambient_node_and_udp_traffic_is_not_captured() -> anyhow::Result<()> {
    scenarios::non_ambient_node_and_udp_traffic_is_not_captured("ebpf")
}

#[test]
fn without_a_ztunnel_ambient_traffic_is_dropped_not_delivered() -> anyhow::Result<()> {
    scenarios::without_a_ztunnel_ambient_traffic_is_dropped_not_delivered("ebpf")
}

#[test]
fn sigkilled_agent_restarts_without_failing_a_connection() -> anyhow::Result<()> {
    scenarios::sigkilled_agent_restarts_without_failing_a_connection("ebpf")
}

#[test]
fn ping_to_and_from_ambient_pods_works() -> anyhow::Result<()> {
    scenarios::ping_to_and_from_ambient_pods_works("ebpf")
}

#[test]
fn ipv6_tcp_is_captured_like_ipv4_with_the_original_destination() -> anyhow::Result<()> {
    use zdivert_tests::{
        apps::{TcpServer, request, sa},
        standin::{HBONE, INBOUND, OUTBOUND},
    };
    let lab = common::Lab::start()?;
    let (pp, rv1, sleep) = (
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("sleep"),
    );
    let details = lab.w1().pod("details-v1");
    let _s1 = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _s2 = TcpServer::start(&details.ns, "details-v1", 9080)?;

    // Outbound, same node.
    let dst = sa(rv1.ip6, 9080);
    let reply = request(&pp.ns, dst)?;
    let recs = lab.z2().to(dst);
    assert_eq!(recs.len(), 1, "{:?}", lab.z2().records());
    assert_eq!(
        (recs[0].listener, recs[0].peer.ip()),
        (OUTBOUND, pp.ip6.into())
    );
    assert_eq!(
        reply.peer.ip(),
        pp.ip6,
        "the server sees the client pod's IPv6 address"
    );

    // Inbound from a non-ambient pod.
    let reply = request(&sleep.ns, dst)?;
    let inbound: Vec<_> = lab
        .z2()
        .to(dst)
        .into_iter()
        .filter(|r| r.listener == INBOUND)
        .collect();
    assert_eq!(inbound.len(), 1, "{:?}", lab.z2().records());
    assert_eq!(reply.peer.ip(), sleep.ip6);

    // Cross node, through both ztunnels.
    let dst = sa(details.ip6, 9080);
    let reply = request(&pp.ns, dst)?;
    assert_eq!(lab.z2().to(dst).len(), 1, "{:?}", lab.z2().records());
    let hbone = lab.z1().to(sa(details.ip6, HBONE));
    assert_eq!(hbone.len(), 1, "{:?}", lab.z1().records());
    assert_eq!(
        hbone[0].hbone.map(|(s, d)| (s.ip(), d)),
        Some((pp.ip6.into(), dst))
    );
    assert_eq!(reply.peer.ip(), pp.ip6);
    Ok(())
}

/// The eBPF path hands segments between namespaces without the node's conntrack, so ztunnel's
/// spoofed upstream connections never collide with the client's: no SYN is ever retransmitted.
#[test]
fn connection_churn_through_ztunnel_never_retransmits_a_syn() -> anyhow::Result<()> {
    let lab = common::Lab::start()?;
    let (total, failed, retransmits) = scenarios::churn(&lab, 25)?;
    assert_eq!(failed, 0, "{failed} of {total} connections failed");
    assert_eq!(
        retransmits, 0,
        "{retransmits} SYN retransmissions over {total} connections"
    );
    assert!(
        lab.z2().records().len() >= total,
        "every one through ztunnel"
    );
    Ok(())
}

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
        apps::{TcpServer, connect, exchange, sa},
        packets::V4,
        raw,
    };
    let lab = common::Lab::start()?;
    let (w2, pp, rv1) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
    );
    let sender = lab.w1().pod("details-v1");
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    // productpage → reviews-v1 through ztunnel, kept open: ztunnel's upstream connection is
    // made in productpage's name (source 10.244.2.3, a port of ztunnel's choosing).
    let conn = connect(&pp.ns, sa(rv1.ip, 9080), std::time::Duration::from_secs(3))?;
    exchange(&conn)?;
    let rec = lab.z2().to(sa(rv1.ip, 9080));
    let (_, upstream_src) = rec
        .last()
        .and_then(|r| r.upstream)
        .expect("an upstream connection");
    assert_eq!(upstream_src.ip(), std::net::IpAddr::from(pp.ip));

    // A router on the way says: fragmentation needed for that upstream connection.
    let mut quoted_tcp = vec![0u8; 8];
    quoted_tcp[..2].copy_from_slice(&upstream_src.port().to_be_bytes());
    quoted_tcp[2..4].copy_from_slice(&9080u16.to_be_bytes());
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00]; // type 3 code 4, next-hop MTU 1280
    icmp.extend(V4::new(pp.ip, rv1.ip, 6).packet(&quoted_tcp));
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
