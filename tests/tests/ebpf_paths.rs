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
