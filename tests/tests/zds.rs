//! zdivert's ZDS server and the real in-pod ztunnel (1.31-dev): ztunnel connects, takes the
//! snapshot, opens its listeners in the netns it was handed, closes them on `del`, and comes
//! back for a new snapshot after a restart.
use std::{fs::File, net::Ipv4Addr, os::fd::OwnedFd, sync::mpsc, time::Duration};

use anyhow::Context;
use zdivert::zds::{ACK_TIMEOUT, Listener, Server, Session, WorkloadInfo, WorkloadNetns};
use zdivert_tests::{
    TempDir, eventually, inpod,
    ns::Netns,
    topology::{Pod, Topology},
    ztunnel::{MeshConfig, Ztunnel, service_account, workload_uid},
};

/// ztunnel's in-pod listeners: outbound, inbound plain, inbound HBONE.
const IN_POD_PORTS: [u16; 3] = [15001, 15006, 15008];

fn listening_ports(ns: &Netns) -> anyhow::Result<Vec<u16>> {
    let out = ns.cmd("ss", &["-Hltn"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit_once(':')?.1.parse().ok())
        .collect())
}

/// Whether `listeners` of ztunnel's in-pod ports are open in `pod`'s netns, within 10 s.
fn wait_listeners(pod: &Pod, listeners: usize) -> anyhow::Result<()> {
    eventually(
        &format!("{listeners} ztunnel listener(s) per port in {}", pod.name),
        Duration::from_secs(10),
        || {
            let ports = listening_ports(&pod.ns)?;
            Ok(IN_POD_PORTS
                .iter()
                .all(|p| ports.iter().filter(|l| *l == p).count() == listeners))
        },
    )
}

#[test]
fn the_real_in_pod_ztunnel_takes_a_pods_netns_over_zds() -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let pod = node.pod("productpage-v1");
    let dir = TempDir::new("zdivert-zds")?;
    let uds = dir.0.join("ztunnel.sock");
    let listener = Listener::bind(&uds)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(listener.accept()));
    let mut ztunnel =
        Ztunnel::start_in_pod(&topo, node, &node.ztunnel, &MeshConfig::default(), &uds)?;
    let peer = rx
        .recv_timeout(Duration::from_secs(20))
        .context("ztunnel never connected to the ZDS socket")??;

    let uid = format!("uid-{}", pod.name);
    let snapshot = [WorkloadNetns {
        uid: uid.clone(),
        info: WorkloadInfo {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: service_account(pod),
        },
        netns: Some(OwnedFd::from(File::open(pod.ns.path())?)),
    }];
    assert!(
        listening_ports(&pod.ns)?.is_empty(),
        "the pod listened before"
    );
    let (mut session, report) = Session::open(peer, ACK_TIMEOUT, &snapshot)?;
    assert!(report.refused.is_empty(), "{report:?}");
    // In-pod ztunnel is ready only once it has acked the snapshot.
    ztunnel.wait_ready()?;
    eventually(
        "ztunnel's listeners in the pod's netns",
        Duration::from_secs(10),
        || {
            let ports = listening_ports(&pod.ns)?;
            Ok(IN_POD_PORTS.iter().all(|p| ports.contains(p)))
        },
    )?;

    session.del(&uid)?;
    eventually(
        "ztunnel's listeners gone after del",
        Duration::from_secs(10),
        || {
            let ports = listening_ports(&pod.ns)?;
            Ok(!IN_POD_PORTS.iter().any(|p| ports.contains(p)))
        },
    )
}

/// The server through ztunnel's life: a snapshot on connect, changes as they come, a pod
/// deleted while ztunnel is down left out of the snapshot it gets on reconnecting, and a
/// second ztunnel (a rolling update's new pod) served beside the first.
#[test]
fn every_ztunnel_that_connects_gets_the_snapshot_then_each_change() -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let (pp, rv1) = (node.pod("productpage-v1"), node.pod("reviews-v1"));
    let dir = TempDir::new("zdivert-zds")?;
    let server = Server::start(&dir.0.join("ztunnel.sock"))?;
    server.set(inpod::workloads([pp]));
    let mesh = MeshConfig::default();
    let mut first = Ztunnel::start_in_pod(&topo, node, &node.ztunnel, &mesh, server.path())?;
    first.wait_ready()?;
    wait_listeners(pp, 1)?;

    server.set(inpod::workloads([pp, rv1]));
    wait_listeners(rv1, 1)?;
    let peers = server.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].pid, Some(first.pid().context("ztunnel's pid")?));
    assert_eq!(peers[0].acked, [workload_uid(pp), workload_uid(rv1)]);

    // productpage deleted while ztunnel is down: the snapshot on reconnect leaves it out.
    first.kill();
    eventually(
        "the killed ztunnel gone from the peers",
        Duration::from_secs(5),
        || Ok(server.peers().is_empty()),
    )?;
    server.set(inpod::workloads([rv1]));
    first.restart()?;
    wait_listeners(rv1, 1)?;
    wait_listeners(pp, 0)?;

    // The new pod of a rolling update connects beside the old one; both serve the pod.
    let new_pod = node.start_pod(
        "ztunnel-v2",
        "istio-system",
        Ipv4Addr::new(10, 244, 2, 11),
        false,
    )?;
    node.plug_pod(&new_pod)?;
    let mut second = Ztunnel::start_in_pod(&topo, node, &new_pod, &mesh, server.path())?;
    second.wait_ready()?;
    wait_listeners(rv1, 2)?;
    eventually(
        "two peers, each with reviews-v1",
        Duration::from_secs(5),
        || {
            let peers = server.peers();
            Ok(peers.len() == 2 && peers.iter().all(|p| p.acked == [workload_uid(rv1)]))
        },
    )?;
    server.set(inpod::workloads([]));
    wait_listeners(rv1, 0)
}
