//! Authorization proves capture: a DENY policy that holds on every way in, NodePort and IPv6
//! included.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::super::{Lab, Mode};
use zdivert_tests::{
    apps::{TcpServer, request, request_timeout, sa},
    topology::Pod,
    ztunnel::{MeshConfig, Policy},
};

/// A DENY policy on reviews-v1:9080 holds on every way in, and nothing else is denied.
pub fn deny_policy_holds_on_every_way_in(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |topo| MeshConfig {
        services: vec![],
        policies: vec![Policy::deny_port(topo.worker2().pod("reviews-v1"), 9080)],
        ..Default::default()
    })?;
    let (w2, pp, rv1, rv2, sleep) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("reviews-v2"),
        lab.w2().pod("sleep"),
    );
    let (details, curl) = (lab.w1().pod("details-v1"), lab.w1().pod("curl"));
    let denied = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _allowed = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;
    // A NodePort as kube-proxy makes it: DNAT on the node's port, masqueraded to the node's
    // address, so the pod sees the node as its client.
    let node_port = 30080;
    for (to, port) in [(rv1.ip, node_port), (rv2.ip, node_port + 1)] {
        node_port_rule(lab.w2(), port, sa(to, 9080))?;
    }
    let node_addr = SocketAddr::new(w2.underlay_ip.into(), node_port);

    let ways_in: [(&str, &Pod, SocketAddr); 7] = [
        ("same node, ambient", pp, sa(rv1.ip, 9080)),
        ("other node, ambient", details, sa(rv1.ip, 9080)),
        ("same node, not ambient", sleep, sa(rv1.ip, 9080)),
        ("NodePort from the other node", curl, node_addr),
        ("same node, ambient, IPv6", pp, sa(rv1.ip6, 9080)),
        ("other node, ambient, IPv6", details, sa(rv1.ip6, 9080)),
        ("same node, not ambient, IPv6", sleep, sa(rv1.ip6, 9080)),
    ];
    for (way, client, dst) in ways_in {
        let r = request_timeout(&client.ns, dst, Duration::from_secs(2));
        assert!(
            r.is_err(),
            "{way}: DENY did not hold, the pod answered: {r:?}"
        );
    }
    assert!(
        denied.seen().is_empty(),
        "reviews-v1 was reached around ztunnel: {:?}",
        denied.seen()
    );
    let rejections = lab
        .zt2()
        .wait_access(ways_in.len(), |a| a.direction() == "inbound" && a.denied())?;
    // The NodePort client reaches ztunnel as the node (masqueraded to the address of the
    // interface the node routed it out of), which is no pod's address.
    let pod_ips: Vec<IpAddr> = lab
        .topo
        .nodes
        .iter()
        .flat_map(|n| n.pods.values())
        .flat_map(|p| [IpAddr::from(p.ip), IpAddr::from(p.ip6)])
        .collect();
    assert!(
        rejections
            .iter()
            .any(|a| a.src_ip().is_some_and(|ip| !pod_ips.contains(&ip))),
        "the NodePort connection was denied by ztunnel: {}",
        lab.zt2().access_summary()
    );

    // Allowed pairs still work, the NodePort one included.
    for (client, dst) in [
        (pp, sa(rv2.ip, 9080)),
        (details, sa(rv2.ip, 9080)),
        (sleep, sa(rv2.ip, 9080)),
        (curl, SocketAddr::new(w2.underlay_ip.into(), node_port + 1)),
        (pp, sa(rv2.ip6, 9080)),
        (details, sa(rv2.ip6, 9080)),
        (sleep, sa(rv2.ip6, 9080)),
    ] {
        let reply = request(&client.ns, dst)?;
        assert_eq!(reply.server, "reviews-v2", "{} → {dst}", client.name);
    }
    lab.zt2()
        .wait_access(7, |a| {
            a.direction() == "inbound" && a.dst_workload() == "reviews-v2"
        })
        .map(|_| ())
}

/// kube-proxy's NodePort in the node's netns: DNAT `port` on the node to `to`, and masquerade
/// what it forwards there (`externalTrafficPolicy: Cluster`).
pub fn node_port_rule(
    node: &zdivert_tests::topology::Node,
    port: u16,
    to: SocketAddr,
) -> anyhow::Result<()> {
    node.ns.iptables(&format!(
        "-t nat -A PREROUTING -p tcp --dport {port} -j DNAT --to-destination {to}"
    ))?;
    node.ns.iptables(&format!(
        "-t nat -A POSTROUTING -d {} -p tcp -m conntrack --ctstate DNAT -j MASQUERADE",
        to.ip()
    ))?;
    Ok(())
}
