//! The iptables/tunnel fallback on the article's nodes: the same packet-path scenarios as the
//! eBPF dataplane.
mod common;

use common::scenarios;

#[test]
fn outbound_same_node_goes_through_15001_with_original_destination() -> anyhow::Result<()> {
    scenarios::outbound_same_node_goes_through_15001_with_original_destination("iptables")
}

#[test]
fn service_vip_reaches_ztunnel_before_any_dnat() -> anyhow::Result<()> {
    scenarios::service_vip_reaches_ztunnel_before_any_dnat("iptables")
}

#[test]
fn inbound_from_a_non_ambient_pod_lands_on_15006_and_port_15008_on_15008() -> anyhow::Result<()> {
    scenarios::inbound_from_a_non_ambient_pod_lands_on_15006_and_port_15008_on_15008("iptables")
}

#[test]
fn cross_node_goes_ztunnel_to_ztunnel_and_the_server_sees_the_client_pod() -> anyhow::Result<()> {
    scenarios::cross_node_goes_ztunnel_to_ztunnel_and_the_server_sees_the_client_pod("iptables")
}

#[test]
fn non_ambient_node_and_udp_traffic_is_not_captured() -> anyhow::Result<()> {
    scenarios::non_ambient_node_and_udp_traffic_is_not_captured("iptables")
}

#[test]
fn without_a_ztunnel_ambient_traffic_is_dropped_not_delivered() -> anyhow::Result<()> {
    scenarios::without_a_ztunnel_ambient_traffic_is_dropped_not_delivered("iptables")
}

#[test]
fn sigkilled_agent_restarts_without_failing_a_connection() -> anyhow::Result<()> {
    scenarios::sigkilled_agent_restarts_without_failing_a_connection("iptables")
}

#[test]
fn ping_to_and_from_ambient_pods_works() -> anyhow::Result<()> {
    scenarios::ping_to_and_from_ambient_pods_works("iptables")
}

/// The fallback has no IPv6 layout: ambient pods' IPv6 TCP is dropped both ways, not passed.
#[test]
fn ipv6_tcp_of_ambient_pods_fails_closed() -> anyhow::Result<()> {
    use std::time::Duration;
    use zdivert_tests::apps::{TcpServer, request, request_timeout, sa};
    let lab = common::Lab::start_mode("iptables", vec![])?;
    let (pp, rv1, sleep) = (
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("sleep"),
    );
    let curl = lab.w1().pod("curl");
    let server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _s2 = TcpServer::start(&sleep.ns, "sleep", 9080)?;
    let _s3 = TcpServer::start(&curl.ns, "curl", 9080)?;
    for (from, to) in [(pp, rv1.ip6), (pp, sleep.ip6), (sleep, rv1.ip6)] {
        let r = request_timeout(&from.ns, sa(to, 9080), Duration::from_millis(700));
        assert!(r.is_err(), "{} → {to} got around ztunnel: {r:?}", from.name);
    }
    assert!(server.seen().is_empty(), "{:?}", server.seen());
    // Non-ambient IPv6 is untouched.
    let reply = request(&sleep.ns, sa(curl.ip6, 9080))?;
    assert_eq!(reply.peer.ip(), sleep.ip6);
    Ok(())
}

/// The fallback's known weakness, measured, not asserted: ztunnel's spoofed upstream SYNs can
/// collide with the client's conntrack entry on the node and wait for a retransmission.
#[test]
fn connection_churn_through_ztunnel_completes() -> anyhow::Result<()> {
    let lab = common::Lab::start_mode("iptables", vec![])?;
    let (total, failed, retransmits) = scenarios::churn(&lab, 25)?;
    println!("iptables fallback: {retransmits} SYN retransmissions over {total} connections");
    assert_eq!(failed, 0, "{failed} of {total} connections failed");
    assert!(
        lab.z2().records().len() >= total,
        "every one through ztunnel"
    );
    Ok(())
}
