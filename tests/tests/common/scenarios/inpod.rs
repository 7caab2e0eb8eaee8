//! What only in-pod mode does: istio-cni's contract for kubelet probes.
use std::{net::IpAddr, time::Duration};

use super::super::{Lab, Mode};
use zdivert_tests::{
    apps::{TcpServer, request, request_timeout, sa},
    ztunnel::{MeshConfig, Policy},
};

const PROBE_V4: &str = "169.254.7.127";
const PROBE_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";

/// Kubelet's probes reach the pod uncaptured: the node SNATs them to istio-cni's probe address
/// (`--ambient-snat`), which the redirection leaves alone. Nothing else from the node is left
/// alone: its own address is captured like any client. A DENY policy on both ports proves
/// which is which: the probe is answered, the node's own connection is denied by ztunnel.
pub fn probes_from_istio_cnis_address_reach_the_pod_and_nothing_else_from_the_node_does(
    mode: Mode,
) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |topo| {
        let rv1 = topo.worker2().pod("reviews-v1");
        MeshConfig {
            policies: vec![Policy::deny_port(rv1, 9080), Policy::deny_port(rv1, 8081)],
            ..Default::default()
        }
    })?;
    let (w2, rv1) = (lab.w2(), lab.w2().pod("reviews-v1"));
    let health = TcpServer::start(&rv1.ns, "reviews-v1-health", 8081)?;
    let app = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    // The node's probe SNAT, for the health port only.
    w2.ns.iptables(&format!(
        "-t nat -A POSTROUTING -p tcp -d {} --dport 8081 -j SNAT --to-source {PROBE_V4}",
        rv1.ip
    ))?;
    w2.ns.cmd(
        "ip6tables",
        &format!(
            "-t nat -A POSTROUTING -p tcp -d {} --dport 8081 -j SNAT --to-source {PROBE_V6}",
            rv1.ip6
        )
        .split_whitespace()
        .collect::<Vec<_>>(),
    )?;

    for (dst, probe) in [
        (sa(rv1.ip, 8081), PROBE_V4.parse::<IpAddr>()?),
        (sa(rv1.ip6, 8081), PROBE_V6.parse()?),
    ] {
        let reply = request(&w2.ns, dst)?;
        assert_eq!(
            reply.server, "reviews-v1-health",
            "{mode:?}: probe to {dst}"
        );
        assert_eq!(reply.peer.ip(), probe, "{mode:?}: the probe came as itself");
    }
    for dst in [sa(rv1.ip, 9080), sa(rv1.ip6, 9080)] {
        let r = request_timeout(&w2.ns, dst, Duration::from_secs(2));
        assert!(
            r.is_err(),
            "{mode:?}: the node reached {dst} around ztunnel: {r:?}"
        );
    }
    assert!(app.seen().is_empty(), "{:?}", app.seen());
    let denied = lab
        .zt2()
        .wait_access(2, |a| a.direction() == "inbound" && a.denied())?;
    let node_addrs: [IpAddr; 2] = [w2.gateway.into(), w2.gateway6.into()];
    assert!(
        denied
            .iter()
            .all(|a| a.src_ip().is_some_and(|ip| node_addrs.contains(&ip))),
        "ztunnel denied the node's own connections: {}",
        lab.zt2().access_summary()
    );
    assert_eq!(health.seen().len(), 2, "{:?}", health.seen());
    Ok(())
}
