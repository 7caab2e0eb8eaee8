//! What only the iptables fallback does (the shared packet-path scenarios run in this mode from
//! `paths.rs`).
mod common;

/// The fallback has no IPv6 layout: ambient pods' IPv6 TCP is dropped both ways, not passed.
#[test]
fn ipv6_tcp_of_ambient_pods_fails_closed() -> anyhow::Result<()> {
    use std::time::Duration;
    use zdivert_tests::apps::{TcpServer, request, request_timeout, sa};
    let lab = common::Lab::real(common::Mode::Iptables, |_| {
        zdivert_tests::ztunnel::MeshConfig::default()
    })?;
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
