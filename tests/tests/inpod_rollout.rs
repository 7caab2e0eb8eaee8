//! ztunnel rollouts in in-pod mode, as a DaemonSet's surge update makes them: the new ztunnel
//! connects over ZDS, takes the snapshot and opens its listeners in every pod beside the old
//! one's; the old one gets SIGTERM and drains. A workload making new connections throughout
//! must not see one fail. In eBPF mode every new connection goes to the newest ztunnel that
//! acked the pod (`zd_zt_newest`); istio-cni's rules leave the choice to the kernel, and that
//! test is ignored: run it with `--ignored` to measure.
use std::time::Duration;

use zdivert_tests::{
    agent::{Mode, zds_socket},
    apps::{RequestStream, TcpServer, sa},
    eventually,
    inpod::{self, wait_ztunnel_in},
    topology::Topology,
    ztunnel::{MeshConfig, Ztunnel},
};

const ROLLOUTS: usize = 5;

/// Five rollouts under four streams of new connections (same node, through both pods'
/// ztunnels, IPv4 and IPv6): every request answered. The new ztunnel runs in another pod's
/// netns each time (a new pod), as the old one drains in its own.
fn rollouts_fail_no_connection(mode: Mode) -> anyhow::Result<()> {
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
    // The ztunnel pods of the rollouts: the node's, and a stand-in netns for its successor.
    let hosts = [&node.ztunnel, node.pod("sleep")];
    let mut old = Ztunnel::start_in_pod(&topo, node, hosts[0], &mesh, &socket)?;
    old.wait_ready(Duration::from_secs(20))?;
    wait_ztunnel_in([pp, rv1, rv2, rv3])?;
    let _servers = [
        TcpServer::start(&rv2.ns, "reviews-v2", 9080)?,
        TcpServer::start(&rv3.ns, "reviews-v3", 9080)?,
    ];
    // Four clients at once, each a new connection after the other.
    let streams = [
        RequestStream::start(&pp.ns, sa(rv2.ip, 9080))?,
        RequestStream::start(&pp.ns, sa(rv3.ip, 9080))?,
        RequestStream::start(&rv1.ns, sa(rv2.ip, 9080))?,
        RequestStream::start(&rv1.ns, sa(rv3.ip6, 9080))?,
    ];
    let more = || streams.iter().try_for_each(|s| s.wait_more(25));
    more()?;
    let peers = || agent.metric("zdivert_zds_peers");
    for i in 1..=ROLLOUTS {
        let mut new = Ztunnel::start_in_pod(&topo, node, hosts[i % 2], &mesh, &socket)?;
        new.wait_ready(Duration::from_secs(20))?;
        eventually("both ztunnels served", Duration::from_secs(10), || {
            Ok(peers()? == 2.0)
        })?;
        more()?;
        // From the new one's ack on, the old one takes no new connection (what it logs is
        // a connection that ended: none, once the ones it had before are over).
        let before = old.access_log().len();
        more()?;
        let after = old.access_log().len();
        if mode == Mode::InPodEbpf {
            anyhow::ensure!(
                after == before,
                "rollout {i}: the old ztunnel took {} new connections after the new one acked",
                after - before
            );
        }
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
    let results: Vec<_> = streams.into_iter().flat_map(RequestStream::stop).collect();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    println!(
        "{mode:?}: {} connections across {ROLLOUTS} rollouts, {} failed",
        results.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{mode:?}: {failed:?}");
    Ok(())
}

#[test]
fn ebpf_rollouts_fail_no_connection() -> anyhow::Result<()> {
    rollouts_fail_no_connection(Mode::InPodEbpf)
}

#[test]
#[ignore = "not zero: the kernel hashes new connections to either ztunnel, and one in about \
            5,000 meets the old one's closing listener or draining server, as istio/istio#58514 \
            reports for istio-cni; rules cannot choose the listener (README, issue 25)"]
fn iptables_rollouts_fail_no_connection() -> anyhow::Result<()> {
    rollouts_fail_no_connection(Mode::InPodIptables)
}
