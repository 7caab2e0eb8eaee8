//! ztunnel rollouts in in-pod mode, as a DaemonSet's surge update makes them: the new ztunnel
//! connects over ZDS, takes the snapshot and opens its listeners in every pod beside the old
//! one's; the old one gets SIGTERM and drains. Under four streams of new connections (same
//! node, through both pods' ztunnels, IPv4 and IPv6). For the test (`inpod_rollout.rs`) and
//! the bench alike.
use std::time::Duration;

use anyhow::Result;

use crate::{
    agent::{Mode, zds_socket},
    apps::{RequestStream, TcpServer, Timed, sa},
    eventually,
    inpod::{self, wait_ztunnel_in},
    topology::Topology,
    ztunnel::{MeshConfig, Ztunnel},
};

pub struct Rollouts {
    /// Every request made, with its outcome and duration.
    pub requests: Vec<Timed>,
    /// For each rollout, the access-log lines (a connection each way ztunnel saw it: outbound,
    /// inbound) the old ztunnel wrote while both listened after the new one's ack: new
    /// connections it was given, as the ones it had before are over by then.
    pub old_logged_after_ack: Vec<usize>,
}

/// At least `rollouts` rollouts, more until `min_requests` requests were made. The new
/// ztunnel runs in another pod's netns each time (a new pod), as the old one drains in its own.
pub fn run(mode: Mode, rollouts: usize, min_requests: usize) -> Result<Rollouts> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let (pp, rv1, rv2, rv3) = (
        node.pod("productpage-v1"),
        node.pod("reviews-v1"),
        node.pod("reviews-v2"),
        node.pod("reviews-v3"),
    );
    let socket = zds_socket(&node.name);
    let agent = inpod::start_agent(node, mode)?;
    let mesh = MeshConfig::default();
    let hosts = [&node.ztunnel, node.pod("sleep")];
    let mut old = Ztunnel::start_in_pod(&topo, node, hosts[0], &mesh, &socket)?;
    old.wait_ready()?;
    wait_ztunnel_in([pp, rv1, rv2, rv3])?;
    let _servers = [
        TcpServer::start(&rv2.ns, "reviews-v2", 9080)?,
        TcpServer::start(&rv3.ns, "reviews-v3", 9080)?,
    ];
    let streams = [
        RequestStream::start(&pp.ns, sa(rv2.ip, 9080))?,
        RequestStream::start(&pp.ns, sa(rv3.ip, 9080))?,
        RequestStream::start(&rv1.ns, sa(rv2.ip, 9080))?,
        RequestStream::start(&rv1.ns, sa(rv3.ip6, 9080))?,
    ];
    let more = || streams.iter().try_for_each(|s| s.wait_more(25));
    let finished = || streams.iter().map(RequestStream::finished).sum::<usize>();
    more()?;
    let peers = || agent.metric("zdivert_zds_peers");
    let mut old_logged_after_ack = Vec::new();
    let mut i = 0;
    while i < rollouts || finished() < min_requests {
        i += 1;
        let mut new = Ztunnel::start_in_pod(&topo, node, hosts[i % 2], &mesh, &socket)?;
        new.wait_ready()?;
        eventually("both ztunnels served", Duration::from_secs(10), || {
            Ok(peers()? == 2.0)
        })?;
        // What the old one logs from here on is a connection that ended after it was given
        // it: the ones it had before are over by then.
        more()?;
        let before = old.access_log().len();
        more()?;
        old_logged_after_ack.push(old.access_log().len() - before);
        anyhow::ensure!(
            old.terminate(Duration::from_secs(30)),
            "rollout {i}: the old ztunnel did not drain within 30 s"
        );
        eventually("the old ztunnel gone", Duration::from_secs(10), || {
            Ok(peers()? == 1.0)
        })?;
        more()?;
        old = new;
    }
    Ok(Rollouts {
        requests: streams
            .into_iter()
            .flat_map(RequestStream::stop_timed)
            .collect(),
        old_logged_after_ack,
    })
}
