//! The packet-path scenarios (`common/scenarios.rs`) through the real ztunnel, in every mode:
//! eBPF attached through TCX, eBPF through tc clsact (as on kernels without TCX), and the
//! iptables fallback.
mod common;

macro_rules! in_every_mode {
    ($($scenario:ident),* $(,)?) => {
        mod ebpf {
            $(#[test]
            fn $scenario() -> anyhow::Result<()> {
                super::common::scenarios::$scenario(super::common::Mode::Ebpf)
            })*
        }
        mod ebpf_clsact {
            $(#[test]
            fn $scenario() -> anyhow::Result<()> {
                super::common::scenarios::$scenario(super::common::Mode::EbpfClsact)
            })*
        }
        mod iptables {
            $(#[test]
            fn $scenario() -> anyhow::Result<()> {
                super::common::scenarios::$scenario(super::common::Mode::Iptables)
            })*
        }
    };
}

in_every_mode!(
    same_node_ambient_to_ambient_is_hbone_through_ztunnel,
    service_vip_reaches_ztunnel_before_any_dnat,
    non_ambient_to_ambient_goes_through_ztunnels_inbound,
    cross_node_ambient_to_ambient_is_hbone_between_ztunnels,
    ambient_to_non_ambient_goes_through_ztunnel,
    node_probes_udp_and_non_ambient_traffic_are_not_captured,
    without_a_ztunnel_ambient_traffic_is_dropped_not_delivered,
    sigkilled_agent_restarts_without_failing_a_connection,
    ping_to_and_from_ambient_pods_works,
    deny_policy_holds_on_every_way_in,
    connection_churn_with_normal_closes_never_waits_for_a_retransmission,
    bulk_transfers_complete_same_node_and_cross_node,
    dns_capture_answers_from_ztunnel_and_only_when_enabled,
    a_new_pods_tcp_is_held_until_it_is_captured,
    ipv6_tcp_is_captured_like_ipv4,
);
