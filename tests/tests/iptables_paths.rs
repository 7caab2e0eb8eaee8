//! The iptables/tunnel fallback on the article's nodes.
mod common;

use common::Lab;
use zdivert_tests::{
    apps::{TcpServer, request, sa},
    fallback::Dump,
    standin::OUTBOUND,
};

#[test]
fn smoke_outbound() -> anyhow::Result<()> {
    let lab = Lab::start_mode("iptables", vec![])?;
    let (pp, rv1) = (lab.w2().pod("productpage-v1"), lab.w2().pod("reviews-v1"));
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let d = Dump::take(lab.w2())?;
    println!("{}\n=====\n{}", d.node, d.ztunnel);
    let reply = request(&pp.ns, sa(rv1.ip, 9080))?;
    let recs = lab.z2().to(sa(rv1.ip, 9080));
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].listener, OUTBOUND);
    assert_eq!(reply.peer.ip(), pp.ip);
    Ok(())
}
