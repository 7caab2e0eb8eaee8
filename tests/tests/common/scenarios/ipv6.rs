//! IPv6 through ztunnel, in every mode: the eBPF programs capture it as they do IPv4, and the
//! fallback applies the article's layout to it (ip6tables, `ip -6` rules and routes, the same
//! tunnels).
use super::{Lab, Mode, from_to};
use zdivert_tests::{
    apps::{TcpServer, request, sa},
    ztunnel::{MeshConfig, identity},
};

/// IPv6 is captured the way IPv4 is: same node and cross node, from ambient and non-ambient
/// pods, while the node's own connections (probes) are not.
pub fn ipv6_tcp_is_captured_like_ipv4(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let (pp, rv1, sleep) = (
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("sleep"),
    );
    let details = lab.w1().pod("details-v1");
    let _s1 = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _s2 = TcpServer::start(&details.ns, "details-v1", 9080)?;

    // Same node (HBONE through this node's ztunnel), from an ambient and a non-ambient pod.
    let dst = sa(rv1.ip6, 9080);
    for client in [pp, sleep] {
        let reply = request(&client.ns, dst)?;
        assert_eq!(
            reply.peer.ip(),
            client.ip6,
            "the server sees the client's IPv6 address"
        );
        lab.zt2().wait_access(1, from_to(client, dst, "inbound"))?;
    }
    lab.zt2().wait_access(1, from_to(pp, dst, "outbound"))?;

    // Cross node, through both ztunnels.
    let dst = sa(details.ip6, 9080);
    let reply = request(&pp.ns, dst)?;
    assert_eq!(reply.peer.ip(), pp.ip6);
    lab.zt2().wait_access(1, from_to(pp, dst, "outbound"))?;
    let inb = lab.zt1().wait_access(1, from_to(pp, dst, "inbound"))?;
    assert_eq!(inb[0].src_identity(), identity(pp));

    // Ambient → non-ambient, through ztunnel's outbound.
    let curl = lab.w1().pod("curl");
    let _s3 = TcpServer::start(&curl.ns, "curl", 8080)?;
    let dst = sa(curl.ip6, 8080);
    assert_eq!(request(&pp.ns, dst)?.peer.ip(), pp.ip6);
    lab.zt2().wait_access(1, from_to(pp, dst, "outbound"))?;

    // The node's own connection (a kubelet probe over IPv6) is not captured.
    let w2 = lab.w2();
    let reply = request(&w2.ns, sa(rv1.ip6, 9080))?;
    assert_eq!(
        reply.peer.ip(),
        w2.gateway6,
        "probe from the node's own address"
    );
    Ok(())
}
