//! The agent with its Kubernetes source, in the simulated article node, driven by the fake API
//! server: the namespace label decides whose traffic goes through the stand-in ztunnel, the pods
//! get their status annotation, /metrics shows live counters, an unreachable API server (even
//! across an agent restart) leaves the capture as it was, and losing ztunnel fails closed. In
//! in-pod mode, the label decides which pods the agent redirects and hands to in-pod ztunnel.
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use zdivert_tests::{
    agent::Agent,
    agent::Mode,
    apps::{TcpServer, request, request_timeout, sa},
    eventually,
    fakeapi::{
        FakeApi, Kind,
        objects::{namespace, node_objects, ztunnel},
    },
    ns::Pause,
    topology::{Node, Topology},
    ztunnel::{MeshConfig, Ztunnel},
};

const REDIRECTION: &str = "ambient.istio.io/redirection";
/// Every wait here polls for the agent's work. Under emulation on 5.10 an agent started
/// from the Kubernetes source did not serve /readyz within 20 s.
const WAIT: Duration = zdivert_tests::SET_UP_WITHIN;

struct KubeLab {
    // Dropped in this order: the agent (it removes its pins) before the nodes.
    agent: Agent,
    ztunnel: Ztunnel,
    _pause: Pause,
    api: FakeApi,
    topo: Topology,
}

impl KubeLab {
    /// The article node's objects in the fake API (namespace `default` labelled ambient or
    /// not), the real ztunnel, and an agent watching the API from inside the node.
    fn start(default_ambient: bool) -> Result<KubeLab> {
        let topo = Topology::article()?;
        let w2 = topo.worker2();
        let api = FakeApi::start()?;
        for obj in node_objects(w2) {
            api.apply(obj)?;
        }
        if default_ambient {
            api.apply(namespace("default", Some("ambient")))?;
        }
        let addr = api.listen_in(&w2.ns.path())?;
        let dir = std::env::temp_dir().join("zdivert-tests");
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = FakeApi::write_kubeconfig(&dir, &w2.name, addr)?;
        let ztunnel = Ztunnel::start(&topo, w2, &MeshConfig::default())?;
        // The agent finds ztunnel's netns through a process in it, not by a name.
        let pause = Pause::start(&w2.ztunnel.ns)?;
        let agent = Agent::start_kube(w2, &kubeconfig, Mode::Ebpf, &[])?;
        let lab = KubeLab {
            agent,
            ztunnel,
            _pause: pause,
            api,
            topo,
        };
        lab.wait_readyz()?;
        Ok(lab)
    }

    fn w2(&self) -> &Node {
        self.topo.worker2()
    }

    fn wait_readyz(&self) -> Result<()> {
        eventually("/readyz answers 200", WAIT, || {
            Ok(self.agent.http_get("/readyz")?.0 == 200)
        })
    }

    /// Waits until the pinned pod map holds `pods` ambient pods (two addresses each).
    fn wait_pods_in_map(&self, pods: usize) -> Result<()> {
        eventually(&format!("{pods} pods in the map"), WAIT, || {
            let st = self.agent.status()?;
            Ok(st["pods"].as_array().map_or(0, Vec::len) == pods * 2)
        })
    }

    fn annotation(&self, pod: &str) -> Option<String> {
        let ns = &self.w2().pod(pod).namespace;
        let obj: Value = self.api.get(Kind::Pod, ns, pod)?;
        obj["metadata"]["annotations"][REDIRECTION]
            .as_str()
            .map(str::to_string)
    }

    fn ambient_pods(&self) -> Vec<String> {
        let w2 = self.w2();
        w2.pods
            .values()
            .filter(|p| p.ambient)
            .map(|p| p.name.clone())
            .collect()
    }
}

/// A process in each pod: how the agent finds a pod's netns when the API names none.
fn processes_in(pods: &[&zdivert_tests::topology::Pod]) -> Result<Vec<Pause>> {
    pods.iter().map(|p| Pause::start(&p.ns)).collect()
}

/// productpage → reviews-v1:9080: whether it went through ztunnel (its access log grew by the
/// connection, as seen on the inbound side).
fn through_ztunnel(lab: &KubeLab) -> Result<bool> {
    let (pp, rv1) = (lab.w2().pod("productpage-v1"), lab.w2().pod("reviews-v1"));
    let dst = sa(rv1.ip, 9080);
    let seen = || {
        let log = lab.ztunnel.access_log();
        log.iter()
            .filter(|a| a.direction() == "inbound" && a.dst() == Some(dst))
            .filter(|a| a.src_ip() == Some(pp.ip.into()))
            .count()
    };
    let before = seen();
    let reply = request(&pp.ns, dst)?;
    assert_eq!(reply.server, "reviews-v1");
    assert_eq!(
        reply.peer.ip(),
        pp.ip,
        "the server sees the client pod either way"
    );
    // An entry is written when ztunnel closes the connection, a moment after the client.
    let through = eventually("the access log", Duration::from_secs(2), || {
        Ok(seen() > before)
    });
    Ok(through.is_ok())
}

#[test]
fn the_namespace_label_decides_capture_and_the_pods_are_annotated() -> Result<()> {
    let lab = KubeLab::start(false)?;
    let _server = TcpServer::start(&lab.w2().pod("reviews-v1").ns, "reviews-v1", 9080)?;
    assert!(
        !through_ztunnel(&lab)?,
        "no namespace is ambient yet: nothing captured"
    );
    assert_eq!(lab.annotation("productpage-v1"), None);

    // Label the namespace: its five pods are captured and annotated.
    lab.api.apply(namespace("default", Some("ambient")))?;
    lab.wait_pods_in_map(5)?;
    assert!(through_ztunnel(&lab)?, "labelled ambient: through ztunnel");
    for pod in lab.ambient_pods() {
        eventually(&format!("{pod} annotated"), WAIT, || {
            Ok(lab.annotation(&pod).as_deref() == Some("enabled"))
        })?;
    }
    assert_eq!(
        lab.annotation("sleep"),
        None,
        "the legacy namespace's pod is not annotated"
    );

    // Live counters on /metrics.
    let redirected = "zdivert_packets_total{path=\"outbound\",outcome=\"redirected\"}";
    let before = lab.agent.metric(redirected)?;
    assert!(before > 0.0, "outbound packets were redirected");
    assert!(through_ztunnel(&lab)?);
    assert!(
        lab.agent.metric(redirected)? > before,
        "the counter moves with traffic"
    );
    assert_eq!(lab.agent.metric("zdivert_pods_in_map")?, 10.0);
    assert_eq!(lab.agent.metric("zdivert_ztunnel_ready")?, 1.0);
    assert!(lab.agent.metric("zdivert_last_sync_age_seconds")? >= 0.0);
    let (code, body) = lab.agent.http_get("/healthz")?;
    assert_eq!((code, body.trim()), (200, "ok"));

    // Remove the label: capture stops and the annotation goes.
    lab.api.apply(namespace("default", None))?;
    lab.wait_pods_in_map(0)?;
    assert!(
        !through_ztunnel(&lab)?,
        "label removed: not captured any more"
    );
    for pod in lab.ambient_pods() {
        eventually(&format!("{pod}'s annotation removed"), WAIT, || {
            Ok(lab.annotation(&pod).is_none())
        })?;
    }
    Ok(())
}

#[test]
fn an_unreachable_api_server_even_across_a_restart_keeps_the_capture() -> Result<()> {
    let mut lab = KubeLab::start(true)?;
    let _server = TcpServer::start(&lab.w2().pod("reviews-v1").ns, "reviews-v1", 9080)?;
    lab.wait_pods_in_map(5)?;
    assert!(through_ztunnel(&lab)?);

    lab.api.set_down(true);
    // Meanwhile the namespace loses its label; the agent cannot know.
    lab.api.apply(namespace("default", None))?;
    eventually("watch errors counted", WAIT, || {
        Ok(lab.agent.metric("zdivert_source_errors_total")? > 0.0)
    })?;
    assert!(
        through_ztunnel(&lab)?,
        "API down: the kernel keeps the last good state"
    );

    // A restarted agent that cannot reach the API adopts the pinned state and waits.
    lab.agent.restart()?;
    eventually("the restarted agent serves /readyz", WAIT, || {
        Ok(lab.agent.http_get("/readyz")?.0 == 503)
    })?;
    assert!(
        through_ztunnel(&lab)?,
        "restart without the API: still captured"
    );
    lab.wait_pods_in_map(5)?;

    // Back: the agent converges on what changed meanwhile.
    lab.api.set_down(false);
    lab.wait_readyz()?;
    lab.wait_pods_in_map(0)?;
    assert!(!through_ztunnel(&lab)?);
    Ok(())
}

#[test]
fn without_its_ztunnel_pod_ambient_traffic_fails_closed() -> Result<()> {
    let lab = KubeLab::start(true)?;
    let server = TcpServer::start(&lab.w2().pod("reviews-v1").ns, "reviews-v1", 9080)?;
    lab.wait_pods_in_map(5)?;
    assert!(through_ztunnel(&lab)?);
    let served = server.seen().len();

    let z = ztunnel(lab.w2());
    let name = z["metadata"]["name"].as_str().context("name")?.to_string();
    lab.api.delete(Kind::Pod, "istio-system", &name)?;
    eventually("ztunnel unwired", WAIT, || {
        Ok(lab.agent.status()?["ztunnel"].is_null())
    })?;
    let (pp, rv1) = (lab.w2().pod("productpage-v1"), lab.w2().pod("reviews-v1"));
    let r = request_timeout(&pp.ns, sa(rv1.ip, 9080), Duration::from_millis(1500));
    assert!(
        r.is_err(),
        "no ztunnel: the connection must not get through ({r:?})"
    );
    assert_eq!(
        server.seen().len(),
        served,
        "nothing reached the server around ztunnel"
    );
    assert_eq!(lab.agent.metric("zdivert_ztunnel_ready")?, 0.0);

    // ztunnel back (a new pod): traffic flows through it again.
    lab.api.apply(z)?;
    eventually("ztunnel rewired", WAIT, || {
        Ok(!lab.agent.status()?["ztunnel"].is_null())
    })?;
    assert!(through_ztunnel(&lab)?);
    Ok(())
}

/// In-pod mode from the Kubernetes source: the pods' uid and service account come from the API,
/// their netns from the processes in them (no source names it). Labelling the namespace
/// redirects its pods and hands them to the real in-pod ztunnel; removing the label releases
/// them, and traffic goes direct.
#[test]
fn inpod_ebpf_mode_takes_its_pods_from_the_namespace_label() -> Result<()> {
    let topo = Topology::article()?;
    let w2 = topo.worker2();
    let api = FakeApi::start()?;
    for obj in node_objects(w2) {
        api.apply(obj)?;
    }
    api.apply(namespace("default", Some("ambient")))?;
    let addr = api.listen_in(&w2.ns.path())?;
    let dir = std::env::temp_dir().join("zdivert-tests");
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = FakeApi::write_kubeconfig(&dir, &w2.name, addr)?;
    let ambient: Vec<_> = w2.pods.values().filter(|p| p.ambient).collect();
    let _pauses = processes_in(&ambient)?;
    let agent = Agent::start_kube(w2, &kubeconfig, Mode::InPodEbpf, &[])?;
    let mut ztunnel = Ztunnel::start_in_pod(
        &topo,
        w2,
        &w2.ztunnel,
        &MeshConfig::default(),
        &zdivert_tests::agent::zds_socket(&w2.name),
    )?;
    ztunnel.wait_ready()?;
    zdivert_tests::inpod::wait_ztunnel_in(ambient.iter().copied())?;
    let (pp, rv1) = (w2.pod("productpage-v1"), w2.pod("reviews-v1"));
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let dst = sa(rv1.ip, 9080);
    assert_eq!(request(&pp.ns, dst)?.server, "reviews-v1");
    let inbound = ztunnel.wait_access(1, |a| a.direction() == "inbound" && a.dst() == Some(dst))?;
    assert_eq!(
        inbound[0].src_identity(),
        zdivert_tests::ztunnel::identity(pp),
        "ztunnel knew the pod by the uid the API gave it"
    );

    api.apply(namespace("default", None))?;
    eventually("the pods released", WAIT, || {
        for p in &ambient {
            if zdivert_tests::inpod::ztunnel_listens_in(p)?
                || !zdivert_tests::inpod::redirection_in(p)?.is_empty()
            {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let logged = ztunnel.access_log().len();
    assert_eq!(request(&pp.ns, dst)?.server, "reviews-v1");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ztunnel.access_log().len(), logged, "released: direct");
    drop(agent);
    Ok(())
}

/// A pod the kubelet is starting, as the API has it before the runtime made its sandbox: no
/// address yet, its uid and service account set. The plugin's ADD reaches the agent before the
/// watch brings any address: the agent reads the pod and its namespace from the API server,
/// finds it ambient by the namespace label, redirects it in the runtime's netns and has in-pod
/// ztunnel ack it before ADD returns. The pod's first connection is then ztunnel's, with the
/// identity the API gave it.
#[test]
fn inpod_ebpf_judges_a_new_pod_through_the_api_and_captures_it_before_add_returns() -> Result<()> {
    use zdivert_tests::{
        TempDir,
        agent::cni_socket,
        cni::Runtime,
        ztunnel::{LaterPod, Policy},
    };
    let topo = Topology::article()?;
    let w2 = topo.worker2();
    let newcomer_ip = std::net::Ipv4Addr::new(10, 244, 2, 60);
    let api = FakeApi::start()?;
    for obj in node_objects(w2) {
        api.apply(obj)?;
    }
    api.apply(namespace("default", Some("ambient")))?;
    let addr = api.listen_in(&w2.ns.path())?;
    let dir = TempDir::new("zdivert-kube-cni")?;
    let kubeconfig = FakeApi::write_kubeconfig(&dir.0, &w2.name, addr)?;
    let ambient: Vec<_> = w2.pods.values().filter(|p| p.ambient).collect();
    let _pauses = processes_in(&ambient)?;
    let agent = Agent::start_kube(w2, &kubeconfig, Mode::InPodEbpf, &[])?;
    let rv1 = w2.pod("reviews-v1");
    let mesh = MeshConfig {
        policies: vec![Policy::deny_port(rv1, 9080)],
        later: vec![LaterPod {
            node: w2.name.clone(),
            name: "ratings-v9".into(),
            namespace: "default".into(),
            ip: newcomer_ip,
            ambient: true,
        }],
        ..Default::default()
    };
    let socket = zdivert_tests::agent::zds_socket(&w2.name);
    let mut ztunnel = Ztunnel::start_in_pod(&topo, w2, &w2.ztunnel, &mesh, &socket)?;
    ztunnel.wait_ready()?;
    zdivert_tests::inpod::wait_ztunnel_in(ambient.iter().copied())?;

    let runtime = Runtime::ptp(w2, &dir.0.join("ipam"), &cni_socket(&w2.name), None);
    let uid = "cluster1//v1/Pod/default/ratings-v9";
    let mut pod = runtime.sandbox(w2, "default", "ratings-v9", uid, newcomer_ip)?;
    let mut object =
        zdivert_tests::fakeapi::objects::pod_on(&w2.name, "default", "ratings-v9", &[]);
    object["metadata"]["uid"] = uid.into();
    object["spec"]["serviceAccountName"] = "ratings".into();
    object["status"] = serde_json::json!({ "phase": "Pending" });
    api.apply(object)?;
    let gets_before = api.requests().len();
    runtime.add(&mut pod)?;
    let asked: Vec<String> = api.requests()[gets_before..]
        .iter()
        .filter(|r| r.method == "GET" && !r.is_watch())
        .map(|r| r.path.clone())
        .collect();
    assert!(
        asked.contains(&"/api/v1/namespaces/default/pods/ratings-v9".to_string())
            && asked.contains(&"/api/v1/namespaces/default".to_string()),
        "the agent asked the API server: {asked:?}"
    );
    assert!(
        zdivert_tests::inpod::ztunnel_listens_in(&pod.pod)?,
        "acked before ADD returned"
    );
    let denied = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let first = request_timeout(&pod.pod.ns, sa(rv1.ip, 9080), Duration::from_secs(3));
    assert!(
        first.is_err(),
        "DENY did not hold on the first connection: {first:?}"
    );
    assert!(
        denied.seen().is_empty(),
        "reached around ztunnel: {:?}",
        denied.seen()
    );
    let refused = ztunnel.wait_access(1, |a| a.denied())?;
    assert_eq!(
        refused[0].src_workload(),
        "ratings-v9",
        "{}",
        ztunnel.access_summary()
    );
    runtime.del(&pod)?;
    drop(agent);
    Ok(())
}
