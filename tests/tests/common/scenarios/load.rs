//! Load through ztunnel: many short connections with normal closes, and full-size segments.
use std::time::Duration;

use super::super::{Lab, Mode};
use super::from_to;
use zdivert_tests::{apps::sa, ztunnel::MeshConfig};

/// SYN retransmissions the TCP stack of `ns` counted so far (`TcpExt: TCPSynRetrans`).
pub fn syn_retransmits(ns: &zdivert_tests::ns::Netns) -> anyhow::Result<u64> {
    ns.net_counter("netstat", "TcpExt", "TCPSynRetrans")
}

/// Short connections from four ambient pods, 16 clients, to a server that answers and closes
/// first, as `Connection: close` HTTP does: ztunnel closes its client side first and holds
/// TIME_WAIT, and the clients take ports from a narrowed range, so new SYNs meet ztunnel's
/// TIME_WAIT sockets again and again.
/// Returns (connections, failures, SYN retransmissions in the clients and ztunnel).
pub fn churn_with_normal_closes(
    lab: &Lab,
    per_client: usize,
) -> anyhow::Result<(usize, usize, u64)> {
    use zdivert_tests::load;
    let w2 = lab.w2();
    let rv1 = w2.pod("reviews-v1");
    let _server = load::Server::start(&rv1.ns, 9080)?;
    let clients = ["productpage-v1", "reviews-v2", "reviews-v3", "ratings-v1"];
    for c in clients {
        w2.pod(c)
            .ns
            .sysctl("net.ipv4.ip_local_port_range", "40000 40063")?;
    }
    let counted = |lab: &Lab| -> anyhow::Result<u64> {
        let mut n = syn_retransmits(&lab.w2().ztunnel.ns)?;
        for c in clients {
            n += syn_retransmits(&lab.w2().pod(c).ns)?;
        }
        Ok(n)
    };
    let before = counted(lab)?;
    let from: Vec<_> = clients.iter().map(|c| w2.pod(c).ns.path()).collect();
    let run = load::churn(&from, sa(rv1.ip, 9080), 16, load::Amount::Each(per_client))?;
    Ok((
        run.connections + run.failures,
        run.failures,
        counted(lab)? - before,
    ))
}

pub fn connection_churn_with_normal_closes_never_waits_for_a_retransmission(
    mode: Mode,
) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let (total, failed, retransmits) = churn_with_normal_closes(&lab, 125)?;
    assert_eq!(failed, 0, "{failed} of {total} connections failed");
    assert_eq!(
        retransmits, 0,
        "{retransmits} SYN retransmissions over {total} connections"
    );
    let (tproxy, lookup) = match mode {
        Mode::Ebpf | Mode::EbpfClsact => ("ztunnel_tproxy", "ztunnel_sk_lookup"),
        Mode::InPodEbpf => ("pod_ingress", "pod_sk_lookup"),
        Mode::Iptables | Mode::InPodIptables => return Ok(()),
    };
    assert!(
        lab.agent2().counter(tproxy, "syn_to_time_wait")? > 0,
        "no SYN met a TIME_WAIT socket: the test did not test it"
    );
    assert!(lab.agent2().counter(lookup, "assigned_listener")? > 0);
    Ok(())
}

/// Full-size segments both ways, same node and cross node: nothing on the path may be smaller
/// than what the two ends agreed on (the fallback's tunnels are 50 bytes smaller).
pub fn bulk_transfers_complete_same_node_and_cross_node(mode: Mode) -> anyhow::Result<()> {
    use zdivert_tests::load;
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let pp = lab.w2().pod("productpage-v1");
    for server in [lab.w2().pod("reviews-v1"), lab.w1().pod("details-v1")] {
        let _sink = load::Server::start(&server.ns, 7000)?;
        let dst = sa(server.ip, 7000);
        let bits = load::bulk(&pp.ns.path(), dst, 1, Duration::from_millis(300))
            .map_err(|e| anyhow::anyhow!("{mode:?}: bulk to {}: {e:#}", server.name))?;
        assert!(bits > 0.0, "{} received nothing", server.name);
        lab.zt2().wait_access(1, from_to(pp, dst, "outbound"))?;
    }
    Ok(())
}
