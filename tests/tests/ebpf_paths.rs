//! The eBPF dataplane on the article's nodes: which ztunnel listener accepted each connection,
//! which original destination it saw, and which source the server saw.
mod common;

use common::Lab;
use zdivert_tests::{
    apps::{TcpServer, request, sa},
    standin::{HBONE, INBOUND, OUTBOUND},
};

#[test]
fn outbound_same_node_goes_through_15001_with_original_destination() -> anyhow::Result<()> {
    let lab = Lab::start()?;
    let (w2, pp, rv1) = (lab.w2(), lab.w2().pod("productpage-v1"), lab.w2().pod("reviews-v1"));
    let server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;

    let reply = request(&pp.ns, sa(rv1.ip, 9080))?;

    let recs = lab.z2().to(sa(rv1.ip, 9080));
    assert_eq!(recs.len(), 1, "one connection through ztunnel: {recs:?}");
    assert_eq!(recs[0].listener, OUTBOUND);
    assert_eq!(recs[0].peer.ip(), pp.ip);
    // ztunnel connected to the pod with the client's address, and the pod saw the client.
    assert_eq!(reply.server, "reviews-v1");
    assert_eq!(reply.peer.ip(), pp.ip);
    assert_eq!(server.seen().len(), 1);
    let _ = (w2, INBOUND, HBONE);
    Ok(())
}
