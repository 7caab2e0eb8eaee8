//! The pod start window closed by `zdivert-cni`, chained after Debian's reference plugins (ptp
//! with host-local IPAM) and driven as a runtime drives a conflist, with the real ztunnel:
//! in-pod ztunnel with each redirection, and node-level ztunnel with eBPF.
//! - ADD returns only once the pod is captured: option-less SYNs (hping3) sent from the instant
//!   it returns reach nothing around ztunnel, and a DENY holds on the pod's first connection;
//! - a pod that steals the new pod's address (NET_ADMIN) strips nothing;
//! - with the agent down, ADD fails for an ambient pod, nothing of the redirection is left
//!   half-applied, a pod outside the mesh starts, and the retried ADD succeeds once the agent
//!   is back.
mod common;

use std::{net::Ipv4Addr, process::Command, time::Duration};

use common::{Lab, Mode};
use serde_json::json;
use zdivert_tests::{
    SET_UP_WITHIN, TempDir,
    agent::cni_socket,
    apps::{TcpServer, request, request_timeout, sa},
    cni::{Runtime, Sandbox, address},
    eventually,
    fakeapi::FakeApi,
    inpod::redirection_in,
    raw::Sniffer,
    topology::Node,
    ztunnel::{LaterPod, MeshConfig, Policy, service_account, workload_uid},
};

macro_rules! in_each_mode {
    ($($test:ident),* $(,)?) => {
        mod inpod_ebpf {
            $(#[test]
            fn $test() -> anyhow::Result<()> {
                super::$test(super::Mode::InPodEbpf)
            })*
        }
        mod inpod_iptables {
            $(#[test]
            fn $test() -> anyhow::Result<()> {
                super::$test(super::Mode::InPodIptables)
            })*
        }
        mod node_clsact {
            $(#[test]
            fn $test() -> anyhow::Result<()> {
                super::$test(super::Mode::EbpfClsact)
            })*
        }
    };
}

in_each_mode!(
    add_returns_once_the_pod_is_captured,
    with_the_agent_down_add_fails_closed,
    after_a_reboot_no_pod_talks_around_ztunnel,
);

mod inpod_ebpf_only {
    #[test]
    fn a_new_pod_given_a_deleted_pods_address_never_gets_its_identity() -> anyhow::Result<()> {
        super::a_new_pod_given_a_deleted_pods_address_never_gets_its_identity(
            super::Mode::InPodEbpf,
        )
    }
}

mod inpod_iptables_only {
    #[test]
    fn a_new_pod_given_a_deleted_pods_address_never_gets_its_identity() -> anyhow::Result<()> {
        super::a_new_pod_given_a_deleted_pods_address_never_gets_its_identity(
            super::Mode::InPodIptables,
        )
    }
}

const NEWCOMER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 60);
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 61);

/// The mesh: reviews-v1:9080 denied to everyone, and the pods the runtime starts later.
fn lab(mode: Mode) -> anyhow::Result<Lab> {
    Lab::real(mode, |topo| {
        let w2 = topo.worker2();
        let later = |name: &str, ip, ambient| LaterPod {
            node: w2.name.clone(),
            name: name.into(),
            namespace: if ambient { "default" } else { "legacy" }.into(),
            ip,
            ambient,
        };
        MeshConfig {
            policies: vec![Policy::deny_port(w2.pod("reviews-v1"), 9080)],
            later: vec![
                later("ratings-v9", NEWCOMER, true),
                later("batch-job", OUTSIDER, false),
            ],
            ..Default::default()
        }
    })
}

/// The ambient pod the runtime starts, with the uid the mesh's XDS gives it.
fn newcomer(runtime: &Runtime, w2: &Node) -> anyhow::Result<Sandbox> {
    let uid = "cluster1//v1/Pod/default/ratings-v9";
    runtime.sandbox(w2, "default", "ratings-v9", uid, NEWCOMER)
}

/// The node description with `pod` among the ambient pods, as the API lists a pod the kubelet
/// is starting: no netns (the source never knows one), its address once IPAM gave it.
fn listing(node: &Node, pod: &Sandbox) -> String {
    let p = &pod.pod;
    let entry = format!(
        "  - {{ name: {}, namespace: {}, ips: [{}], uid: \"{}\", serviceAccount: {} }}\n",
        p.name,
        p.namespace,
        p.ip,
        pod.uid,
        service_account(p)
    );
    node.pods_file(true)
        .replacen("pods:\n", &format!("pods:\n{entry}"), 1)
}

/// Sends `count` option-less SYNs from `from` to `dst`, one every 2 ms, as hping3 does.
fn syn_flood(from: &Sandbox, dst: Ipv4Addr, port: u16, count: u32) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", &from.pod.ns.name, "hping3", "-q", "-S"])
        .args([
            "-p",
            &port.to_string(),
            "-c",
            &count.to_string(),
            "-i",
            "u2000",
        ])
        .arg(dst.to_string())
        .output()?;
    // hping3 exits 1 when nothing answered, which is what capture looks like here.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        said.contains(&format!("{count} packets transmitted")),
        "hping3: {said}"
    );
    Ok(())
}

fn add_returns_once_the_pod_is_captured(mode: Mode) -> anyhow::Result<()> {
    let lab = lab(mode)?;
    let (w2, agent, zt) = (lab.w2(), lab.agent2(), lab.zt2());
    let (rv1, sleep) = (w2.pod("reviews-v1"), w2.pod("sleep"));
    let dir = TempDir::new("zdivert-cni")?;
    let runtime = Runtime::ptp(w2, &dir.0.join("ipam"), &cni_socket(&w2.name), None);
    let mut pod = newcomer(&runtime, w2)?;
    assert_eq!(pod.uid, workload_uid(&pod.pod));
    agent.describe(&listing(w2, &pod))?;
    let denied = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _legacy = TcpServer::start(&sleep.ns, "sleep", 9090)?;
    let sniffer = Sniffer::start("sleep", &sleep.ns)?;

    let result = runtime.add(&mut pod)?;
    assert_eq!(
        address(&result),
        Some(NEWCOMER),
        "ptp's result, untouched: {result}"
    );
    // From the instant ADD returned: SYNs to a pod outside the mesh, then a first connection
    // to a denied server.
    syn_flood(&pod, sleep.ip, 9090, 300)?;
    let first = request_timeout(&pod.pod.ns, sa(rv1.ip, 9080), Duration::from_secs(3));
    assert!(
        first.is_err(),
        "DENY did not hold on the first connection: {first:?}"
    );
    zt.wait_access(1, |a| {
        a.denied()
            && a.dst()
                .is_some_and(|d| d.ip() == std::net::IpAddr::from(rv1.ip))
    })?;
    assert!(
        denied.seen().is_empty(),
        "reached around ztunnel: {:?}",
        denied.seen()
    );
    let around = sniffer.from_addr(NEWCOMER, 9090);
    assert!(
        around.is_empty(),
        "{} segments reached sleep around ztunnel, the first: {:?}",
        around.len(),
        around.first()
    );
    // Its connections go through ztunnel, and CHECK finds it as ADD left it.
    assert_eq!(request(&pod.pod.ns, sa(sleep.ip, 9090))?.server, "sleep");
    zt.wait_access(1, |a| {
        a.src_ip() == Some(std::net::IpAddr::from(NEWCOMER)) && !a.denied()
    })?;
    runtime.check(&pod)?;

    // A NET_ADMIN pod takes the new pod's address; the agent applies again: the pod keeps
    // its capture (its netns came from the runtime, no address scan is made for it).
    sleep.ns.ip(&format!("addr add {NEWCOMER}/32 dev eth0"))?;
    let reconciles = agent.metric("zdivert_reconciles_total")? as u64;
    agent.describe(&listing(w2, &pod).replacen(
        "outside:\n",
        "outside:\n  - { name: filler, namespace: legacy, ips: [10.244.2.99] }\n",
        1,
    ))?;
    agent.wait_reconciles(reconciles + 1)?;
    let again = request_timeout(&pod.pod.ns, sa(rv1.ip, 9080), Duration::from_secs(3));
    assert!(
        again.is_err(),
        "DENY did not hold after the theft: {again:?}"
    );
    assert!(
        denied.seen().is_empty(),
        "reached around ztunnel: {:?}",
        denied.seen()
    );
    if mode.is_in_pod() {
        assert!(
            !redirection_in(&pod.pod)?.is_empty(),
            "the theft released the pod"
        );
    }
    sleep.ns.ip(&format!("addr del {NEWCOMER}/32 dev eth0"))?;

    // DEL releases it; a second DEL (the runtime retries) succeeds as well.
    runtime.del(&pod)?;
    runtime.del(&pod)?;
    Ok(())
}

fn with_the_agent_down_add_fails_closed(mode: Mode) -> anyhow::Result<()> {
    let mut lab = lab(mode)?;
    let w2 = lab.topo.worker2();
    // The plugin asks the API server which pods are ambient while the agent is down.
    let api = FakeApi::start()?;
    let addr = api.listen_in(&w2.ns.path())?;
    let dir = TempDir::new("zdivert-cni")?;
    let kubeconfig = FakeApi::write_kubeconfig(&dir.0, "plugin", addr)?;
    for (ns, ambient) in [("default", true), ("legacy", false)] {
        let labels = if ambient {
            json!({"istio.io/dataplane-mode": "ambient"})
        } else {
            json!({})
        };
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}))?;
    }
    let runtime = Runtime::ptp(
        w2,
        &dir.0.join("ipam"),
        &cni_socket(&w2.name),
        Some(&kubeconfig),
    );
    let mut pod = newcomer(&runtime, w2)?;
    let mut outsider = runtime.sandbox(w2, "legacy", "batch-job", "u-batch", OUTSIDER)?;
    for s in [&pod, &outsider] {
        api.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": s.pod.name, "namespace": s.pod.namespace, "uid": s.uid},
            "spec": {"nodeName": w2.name, "containers": [{"name": "app", "image": "app"}]},
        }))?;
    }
    lab.agents[0].describe(&listing(w2, &pod))?;
    lab.agents[0].kill();

    let refused = runtime
        .add(&mut pod)
        .expect_err("ADD of an ambient pod with the agent down");
    assert_eq!(
        (refused.plugin.as_str(), refused.code),
        ("zdivert-cni", 11),
        "{refused}"
    );
    assert!(
        redirection_in(&pod.pod)?.is_empty(),
        "half-applied: {:?}",
        redirection_in(&pod.pod)?
    );
    runtime.add(&mut outsider).map_err(anyhow::Error::from)?;
    // The runtime tears the failed sandbox down and tries again once the agent is back.
    runtime.del(&pod)?;
    lab.agents[0].restart()?;
    let mut last = None;
    let retried = eventually(
        "the agent serves the plugin again",
        Duration::from_secs(30),
        || {
            last = runtime.add(&mut pod).err();
            if last.is_some() {
                // As the runtime does before it tries a sandbox again.
                runtime.del(&pod)?;
            }
            Ok(last.is_none())
        },
    );
    retried.map_err(|e| anyhow::anyhow!("{e}: the last ADD: {last:?}"))?;
    assert_captured(&lab, &pod)?;
    lab.ztunnels[0].wait_access(1, |a| a.denied())?;
    runtime.del(&pod)?;
    runtime.del(&outsider)?;
    Ok(())
}

/// A flood from `pod` to sleep:9090 reaches nothing around ztunnel, and its first connection
/// to the denied reviews-v1 is denied by ztunnel.
fn assert_captured(lab: &Lab, pod: &Sandbox) -> anyhow::Result<()> {
    let w2 = lab.w2();
    let (rv1, sleep) = (w2.pod("reviews-v1"), w2.pod("sleep"));
    let sniffer = Sniffer::start("sleep", &sleep.ns)?;
    let _legacy = TcpServer::start(&sleep.ns, "sleep", 9090)?;
    let denied = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    syn_flood(pod, sleep.ip, 9090, 200)?;
    let first = request_timeout(&pod.pod.ns, sa(rv1.ip, 9080), Duration::from_secs(3));
    assert!(first.is_err(), "DENY did not hold: {first:?}");
    assert!(
        denied.seen().is_empty(),
        "reached around ztunnel: {:?}",
        denied.seen()
    );
    let around = sniffer.from_addr(pod.pod.ip, 9090);
    assert!(
        around.is_empty(),
        "{} segments reached sleep around ztunnel, the first: {:?}",
        around.len(),
        around.first()
    );
    Ok(())
}

/// A node reboots: its kernel state, ztunnel and the agent are gone, and the runtime starts
/// every pod again (new sandboxes) while the agent and ztunnel start. ADD fails until the pod
/// can be captured; once it succeeds, nothing the pod sends gets around ztunnel.
fn after_a_reboot_no_pod_talks_around_ztunnel(mode: Mode) -> anyhow::Result<()> {
    let mut lab = lab(mode)?;
    let w2 = lab.topo.worker2();
    let dir = TempDir::new("zdivert-cni")?;
    let mut runtime = Runtime::ptp(w2, &dir.0.join("ipam"), &cni_socket(&w2.name), None);
    let mut pod = newcomer(&runtime, w2)?;
    lab.agents[0].describe(&listing(w2, &pod))?;
    runtime.add(&mut pod)?;

    // The reboot: nothing of zdivert's is left in the kernel, every sandbox is gone.
    lab.ztunnels[0].kill();
    lab.agents[0].cleanup()?;
    runtime.del(&pod)?;
    drop(pod);
    let mut pod = newcomer(&runtime, w2)?;
    let retry = |runtime: &Runtime,
                 pod: &mut Sandbox|
     -> anyhow::Result<Option<zdivert_tests::cni::CniError>> {
        let failed = runtime.add(pod).err();
        if failed.is_some() {
            runtime.del(pod)?;
        }
        Ok(failed)
    };
    // ADDs that are meant to fail are kept short; the ones meant to succeed get the plugin's
    // default, as a pod's capture under emulation (vmtest, 5.10) takes over 3 s.
    runtime.set_timeout(Some(3));
    // The runtime starts the pod before the agent runs: ADD fails.
    let before_agent = retry(&runtime, &mut pod)?;
    assert!(before_agent.is_some(), "ADD succeeded with no agent");
    lab.agents[0].restart()?;
    if mode.is_in_pod() {
        // The agent runs, ztunnel does not yet: nobody acknowledges the pod.
        let mut last = None;
        let no_ztunnel = eventually("the agent answers", SET_UP_WITHIN, || {
            last = retry(&runtime, &mut pod)?;
            Ok(last.as_ref().is_some_and(|e| e.code == 100))
        });
        no_ztunnel.map_err(|e| anyhow::anyhow!("{e}: the last ADD: {last:?}"))?;
    }
    lab.ztunnels[0].restart()?;
    runtime.set_timeout(None);
    let mut last = None;
    eventually("ADD succeeds", SET_UP_WITHIN, || {
        last = retry(&runtime, &mut pod)?;
        Ok(last.is_none())
    })
    .map_err(|e| anyhow::anyhow!("{e}: the last ADD: {last:?}"))?;
    assert_captured(&lab, &pod)?;
    runtime.del(&pod)?;
    Ok(())
}

/// A pod is deleted; before its API object goes, IPAM gives its address to a new pod outside
/// the mesh, and the agent restarts. The old pod's object still lists the address,
/// but the netns holding it is the new pod's, as the runtime said: ztunnel is never handed it
/// under the old pod's name, and the new pod talks directly.
fn a_new_pod_given_a_deleted_pods_address_never_gets_its_identity(
    mode: Mode,
) -> anyhow::Result<()> {
    let mut lab = lab(mode)?;
    let w2 = lab.topo.worker2();
    let dir = TempDir::new("zdivert-cni")?;
    let runtime = Runtime::ptp(w2, &dir.0.join("ipam"), &cni_socket(&w2.name), None);
    let mut old = newcomer(&runtime, w2)?;
    let listed = listing(w2, &old);
    lab.agents[0].describe(&listed)?;
    runtime.add(&mut old)?;
    runtime.del(&old)?;
    drop(old);
    let mut new = runtime.sandbox(w2, "legacy", "batch-job", "u-batch", NEWCOMER)?;
    runtime.add(&mut new)?;
    // What the runtime said is kept across a restart: the restarted agent is told nothing.
    lab.agents[0].restart()?;
    // A change of the description makes the agent apply again, the old pod still listed.
    let reconciles = |a: &zdivert_tests::agent::Agent| a.metric("zdivert_reconciles_total");
    eventually("the agent applies", SET_UP_WITHIN, || {
        Ok(reconciles(&lab.agents[0]).is_ok())
    })?;
    let before = reconciles(&lab.agents[0])? as u64;
    lab.agents[0].describe(&listed.replacen(
        "outside:\n",
        "outside:\n  - { name: filler, namespace: legacy, ips: [10.244.2.99] }\n",
        1,
    ))?;
    lab.agents[0].wait_reconciles(before + 1)?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !zdivert_tests::inpod::ztunnel_listens_in(&new.pod)?,
        "ztunnel was handed the new pod's netns"
    );
    assert!(
        redirection_in(&new.pod)?.is_empty(),
        "{:?}",
        redirection_in(&new.pod)?
    );
    let sleep = w2.pod("sleep");
    let _legacy = TcpServer::start(&sleep.ns, "sleep", 9090)?;
    assert_eq!(request(&new.pod.ns, sa(sleep.ip, 9090))?.server, "sleep");
    let by_ztunnel = lab.ztunnels[0]
        .access_log()
        .iter()
        .filter(|a| {
            a.src_ip() == Some(std::net::IpAddr::from(NEWCOMER)) || a.dst_workload() == "ratings-v9"
        })
        .count();
    assert_eq!(by_ztunnel, 0, "{}", lab.ztunnels[0].access_summary());
    runtime.del(&new)?;
    Ok(())
}
