//! zdivert's ZDS server and the real in-pod ztunnel (1.31-dev): ztunnel connects, takes the
//! snapshot, opens its listeners in the pod's netns it was handed, and closes them on `del`.
use std::{fs::File, os::fd::OwnedFd, sync::mpsc, time::Duration};

use anyhow::Context;
use zdivert::zds::{ACK_TIMEOUT, Listener, Session, WorkloadInfo, WorkloadNetns};
use zdivert_tests::{
    eventually,
    ns::Netns,
    topology::Topology,
    ztunnel::{MeshConfig, Ztunnel, service_account},
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

/// Removes the socket directory even when the test fails.
struct SocketDir(std::path::PathBuf);

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_real_in_pod_ztunnel_takes_a_pods_netns_over_zds() -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let pod = node.pod("productpage-v1");
    let dir = SocketDir(std::env::temp_dir().join(format!("zdivert-zds-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let uds = dir.0.join("ztunnel.sock");
    let listener = Listener::bind(&uds)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(listener.accept()));
    let mut ztunnel = Ztunnel::start_in_pod(&topo, node, &MeshConfig::default(), &uds)?;
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
    ztunnel.wait_ready(Duration::from_secs(10))?;
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
