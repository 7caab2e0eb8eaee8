//! In-pod mode over the pods' lifecycle, under the agent and the real in-pod ztunnel, with each
//! redirection: pods join and leave the mesh while traffic flows, a pod deleted while ztunnel
//! is down is not served when it is back, a ZDS peer that never acks does not hold up the
//! others, and `zdivert cleanup` takes the redirection out of every pod.
mod common;

use std::{net::Ipv4Addr, time::Duration};

use common::{Lab, Mode};
use zdivert_tests::{
    apps::{RequestStream, TcpServer, request, request_timeout, sa},
    eventually,
    inpod::{redirection_in, wait_ztunnel_in, ztunnel_listens_in},
    ztunnel::{LaterPod, MeshConfig},
};

macro_rules! with_each_redirection {
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
    };
}

with_each_redirection!(
    pods_join_and_leave_the_mesh_while_traffic_flows,
    a_pod_deleted_while_ztunnel_is_down_is_not_served_when_it_is_back,
    a_peer_that_never_acks_holds_up_no_one,
    cleanup_takes_the_redirection_out_of_every_pod,
    a_pod_that_removes_its_redirection_gets_it_back,
    status_leads_with_the_ztunnels_serving_the_pods,
);

/// The node description without the pods named in `left` (gone from the API).
fn without(description: &str, left: &[&str]) -> String {
    description
        .lines()
        .filter(|l| !left.iter().any(|n| l.contains(&format!("name: {n},"))))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn pods_join_and_leave_the_mesh_while_traffic_flows(mode: Mode) -> anyhow::Result<()> {
    let newcomer_ip = Ipv4Addr::new(10, 244, 2, 60);
    let lab = Lab::real(mode, |topo| MeshConfig {
        later: vec![LaterPod {
            node: topo.worker2().name.clone(),
            name: "ratings-v9".into(),
            namespace: "default".into(),
            ip: newcomer_ip,
            ambient: true,
        }],
        ..Default::default()
    })?;
    let (w2, agent, zt) = (lab.w2(), lab.agent2(), lab.zt2());
    let (pp, rv1, rv2, sleep) = (
        w2.pod("productpage-v1"),
        w2.pod("reviews-v1"),
        w2.pod("reviews-v2"),
        w2.pod("sleep"),
    );
    let _s1 = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _s2 = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;
    let stream = RequestStream::start(&pp.ns, sa(rv1.ip, 9080))?;
    stream.wait_more(5)?;

    // A pod joins: it is redirected, handed to ztunnel, and reached through it.
    let newcomer = w2.start_pod("ratings-v9", "default", newcomer_ip, true)?;
    w2.plug_pod(&newcomer)?;
    let _s3 = TcpServer::start(&newcomer.ns, "ratings-v9", 9080)?;
    let with_newcomer = w2.pods_file_with(&[&newcomer]);
    agent.describe(&with_newcomer)?;
    wait_ztunnel_in([&newcomer])?;
    let reply = request(&sleep.ns, sa(newcomer.ip, 9080))?;
    assert_eq!(reply.server, "ratings-v9");
    zt.wait_access(1, |a| {
        a.direction() == "inbound" && a.dst_workload() == "ratings-v9" && a.error().is_none()
    })?;
    stream.wait_more(5)?;

    // A pod leaves: ztunnel lets go of it, its redirection goes, it is reached directly.
    agent.describe(&without(&with_newcomer, &["reviews-v2"]))?;
    eventually("reviews-v2 released", Duration::from_secs(10), || {
        Ok(!ztunnel_listens_in(rv2)? && redirection_in(rv2)?.is_empty())
    })?;
    let logged = zt.access_log().len();
    assert_eq!(request(&sleep.ns, sa(rv2.ip, 9080))?.server, "reviews-v2");
    stream.wait_more(5)?;
    let results = stream.stop();
    common::assert_none_failed(&results, 15);
    // Every request of the stream went through ztunnel; the direct one did not.
    zt.wait_access(results.len(), |a| {
        a.direction() == "inbound" && a.dst_workload() == "reviews-v1"
    })?;
    assert!(
        zt.access_log()[logged..]
            .iter()
            .all(|a| a.dst_workload() != "reviews-v2"),
        "{}",
        zt.access_summary()
    );
    Ok(())
}

fn a_pod_deleted_while_ztunnel_is_down_is_not_served_when_it_is_back(
    mode: Mode,
) -> anyhow::Result<()> {
    let mut lab = Lab::real(mode, |_| MeshConfig::default())?;
    let w2 = lab.topo.worker2();
    let (pp, rv1, rv2) = (
        w2.pod("productpage-v1"),
        w2.pod("reviews-v1"),
        w2.pod("reviews-v2"),
    );
    let _s1 = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    lab.ztunnels[0].kill();
    lab.agents[0].describe(&without(&w2.pods_file(true), &["reviews-v2"]))?;
    eventually("reviews-v2 released", Duration::from_secs(10), || {
        Ok(redirection_in(rv2)?.is_empty())
    })?;
    lab.ztunnels[0].restart()?;
    lab.ztunnels[0].wait_ready()?;
    wait_ztunnel_in(w2.pods.values().filter(|p| p.ambient && p.name != rv2.name))?;
    assert!(
        !ztunnel_listens_in(rv2)?,
        "the restarted ztunnel was handed the deleted pod"
    );
    assert_eq!(request(&pp.ns, sa(rv1.ip, 9080))?.server, "reviews-v1");
    lab.ztunnels[0].wait_access(1, |a| {
        a.direction() == "inbound" && a.dst_workload() == "reviews-v1"
    })?;
    Ok(())
}

/// A peer that says hello and never acks its snapshot: the agent gives up on it after its ack
/// timeout, says so in its metrics, and serves the real ztunnel all along (a pod that joins
/// meanwhile is handed to it).
fn a_peer_that_never_acks_holds_up_no_one(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let (w2, agent) = (lab.w2(), lab.agent2());
    let (rv2, sleep) = (w2.pod("reviews-v2"), w2.pod("sleep"));
    let socket = zdivert_tests::agent::zds_socket(&w2.name);
    let silent = zdivert::zds::Peer::connect(&socket)?;
    // ZdsHello { version: V1 }: field 1, varint 1.
    silent.send(&[0x08, 0x01], None)?;
    let timeouts = "zdivert_zds_requests_total{request=\"snapshot\",outcome=\"failed\"}";
    // Meanwhile a pod leaves and comes back: the real ztunnel is told both.
    agent.describe(&without(&w2.pods_file(true), &["reviews-v2"]))?;
    eventually(
        "ztunnel let go of reviews-v2",
        Duration::from_secs(10),
        || Ok(!ztunnel_listens_in(rv2)?),
    )?;
    agent.describe(&w2.pods_file(true))?;
    wait_ztunnel_in([rv2])?;
    let _s2 = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;
    assert_eq!(request(&sleep.ns, sa(rv2.ip, 9080))?.server, "reviews-v2");
    eventually("the silent peer given up", Duration::from_secs(15), || {
        Ok(agent.metric(timeouts)? >= 1.0 && agent.metric("zdivert_zds_peers")? == 1.0)
    })?;
    drop(silent);
    Ok(())
}

fn cleanup_takes_the_redirection_out_of_every_pod(mode: Mode) -> anyhow::Result<()> {
    let mut lab = Lab::real(mode, |_| MeshConfig::default())?;
    let w2 = lab.topo.worker2();
    let (pp, rv1) = (w2.pod("productpage-v1"), w2.pod("reviews-v1"));
    let _s1 = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let out = lab.agents[0].cleanup()?;
    for p in w2.pods.values().filter(|p| p.ambient) {
        let left = redirection_in(p)?;
        // istio-cni's rules belong to the iptables fallback's cleanup only in node-level mode;
        // in-pod, what the agent put in a pod is what cleanup must take out.
        assert!(
            left.is_empty(),
            "{mode:?}: {} still holds {left:?}\n{out}",
            p.name
        );
        // Nor the tables the rules made the backend create (the pods had none).
        for save in ["iptables-save", "ip6tables-save"] {
            let tables: Vec<String> =
                p.ns.cmd(save, &[])?
                    .lines()
                    .filter(|l| l.starts_with('*'))
                    .map(String::from)
                    .collect();
            assert!(
                tables.is_empty(),
                "{mode:?}: {} keeps {save} tables {tables:?}",
                p.name
            );
        }
    }
    // Nothing captures any more: productpage reaches reviews-v1 directly.
    lab.ztunnels[0].kill();
    let r = request_timeout(&pp.ns, sa(rv1.ip, 9080), Duration::from_secs(2))?;
    assert_eq!(r.server, "reviews-v1");
    assert_eq!(r.peer.ip(), pp.ip);
    Ok(())
}

/// A pod's netns found by its address (the Kubernetes source names none): an address that two
/// namespaces hold is refused, so neither can be redirected or handed to ztunnel as the pod.
#[test]
fn an_address_two_namespaces_hold_belongs_to_neither() -> anyhow::Result<()> {
    use zdivert_tests::ns::{Netns, Pause};
    let ip: std::net::IpAddr = "10.253.0.7".parse()?;
    let make = |n: usize| -> anyhow::Result<(Netns, Pause)> {
        let ns = Netns::new(&format!("zdamb{}-{n}", std::process::id()))?;
        ns.cmd(
            "ip",
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
            ],
        )?;
        ns.cmd("ip", &["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        let pause = Pause::start(&ns)?;
        pause.wait_in(&ns)?;
        Ok((ns, pause))
    };
    let first = make(1)?;
    let second = make(2)?;
    assert_eq!(zdivert::netns::holding(ip), None, "two holders: refused");
    drop(second);
    let want = zdivert::netns::inode(&first.0.path())?;
    eventually("the one holder left found", Duration::from_secs(5), || {
        let found = zdivert::netns::holding(ip).map(|p| zdivert::netns::inode(&p));
        Ok(found.transpose()? == Some(want))
    })?;
    Ok(())
}

/// A root process in an ambient pod with NET_ADMIN takes its redirection away: the clsact
/// qdisc that holds the programs (eBPF), or istio-cni's chains (rules, both families). With
/// rules, capture is gone at once: its connection to a pod outside the mesh no longer goes
/// through ztunnel. With eBPF, the guard on the pod's host veth, out of the pod's reach, drops
/// the pod's TCP that did not cross the egress program: it fails closed. Within a resync
/// (30 s) the agent finds the redirection gone from the kernel, puts it back and counts it:
/// the pod's connections go through ztunnel again, and a DENY holds.
fn a_pod_that_removes_its_redirection_gets_it_back(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |topo| MeshConfig {
        policies: vec![zdivert_tests::ztunnel::Policy::deny_port(
            topo.worker2().pod("reviews-v1"),
            9080,
        )],
        ..Default::default()
    })?;
    let (w2, agent, zt) = (lab.w2(), lab.agent2(), lab.zt2());
    let (pp, rv1, sleep) = (
        w2.pod("productpage-v1"),
        w2.pod("reviews-v1"),
        w2.pod("sleep"),
    );
    let denied = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _legacy = TcpServer::start(&sleep.ns, "sleep", 9090)?;
    let outbound_to_sleep = |a: &zdivert_tests::ztunnel::Access| {
        a.direction() == "outbound" && a.dst() == Some(sa(sleep.ip, 9090))
    };
    assert_eq!(request(&pp.ns, sa(sleep.ip, 9090))?.server, "sleep");
    zt.wait_access(1, outbound_to_sleep)?;
    match mode {
        Mode::InPodEbpf => {
            pp.ns
                .cmd("tc", &["qdisc", "del", "dev", "eth0", "clsact"])?;
        }
        _ => {
            for save in ["iptables", "ip6tables"] {
                for table in ["nat", "mangle"] {
                    pp.ns.cmd(save, &["-t", table, "-F"])?;
                }
            }
        }
    }
    let logged = zt
        .access_log()
        .iter()
        .filter(|a| outbound_to_sleep(a))
        .count();
    if mode == Mode::InPodEbpf {
        let r = request_timeout(&pp.ns, sa(sleep.ip, 9090), Duration::from_secs(2));
        assert!(r.is_err(), "past the removed programs: {r:?}");
        assert!(agent.counter("pod_guard", "dropped_past_egress")? >= 1);
    } else {
        // The hole is real: the pod's connection leaves around ztunnel.
        assert_eq!(request(&pp.ns, sa(sleep.ip, 9090))?.server, "sleep");
        std::thread::sleep(Duration::from_millis(500));
        let direct = zt
            .access_log()
            .iter()
            .filter(|a| outbound_to_sleep(a))
            .count();
        assert_eq!(direct, logged, "the tampering did not take capture away");
    }
    // The pod degrades only itself: another pod's connection still goes through ztunnel.
    let rv2_to_sleep = |a: &zdivert_tests::ztunnel::Access| {
        outbound_to_sleep(a) && a.src_workload() == "reviews-v2"
    };
    assert_eq!(
        request(&w2.pod("reviews-v2").ns, sa(sleep.ip, 9090))?.server,
        "sleep"
    );
    zt.wait_access(1, rv2_to_sleep)?;
    let pod_repairs =
        "zdivert_pod_redirections_repaired_total{namespace=\"default\",pod=\"productpage-v1\"}";
    eventually("the redirection put back", Duration::from_secs(40), || {
        Ok(agent.metric("zdivert_redirections_repaired_total")? >= 1.0
            && agent.metric(pod_repairs)? >= 1.0)
    })?;
    // ...and status names it.
    let records = agent.status()?["inpod_pods"].clone();
    let repairs = |pod: &str| {
        records
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["pod"] == format!("default/{pod}").as_str())
            .and_then(|r| r["repairs"].as_u64())
    };
    assert!(repairs("productpage-v1") >= Some(1), "{records}");
    assert_eq!(repairs("reviews-v2"), Some(0), "{records}");
    assert_eq!(request(&pp.ns, sa(sleep.ip, 9090))?.server, "sleep");
    zt.wait_access(logged + 1, outbound_to_sleep)?;
    let again = request_timeout(&pp.ns, sa(rv1.ip, 9080), Duration::from_secs(2));
    assert!(again.is_err(), "DENY does not hold: {again:?}");
    assert!(
        denied.seen().is_empty(),
        "reached around ztunnel: {:?}",
        denied.seen()
    );
    Ok(())
}

/// `zdivert status` in in-pod mode says what is true there: which redirection and why, the
/// ztunnels connected over ZDS and what they acked, then each pod's redirection; not the
/// node-level view (no node-level ztunnel, no pod map), which in-pod mode does not use.
fn status_leads_with_the_ztunnels_serving_the_pods(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let (w2, agent) = (lab.w2(), lab.agent2());
    let pods = w2.pods.values().filter(|p| p.ambient).count();
    let text = eventually_text(agent, pods)?;
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!("node {}: in-pod redirection: ", w2.name)),
        "{text}"
    );
    assert_eq!(lines[1], "in-pod ztunnels connected over ZDS: 1", "{text}");
    assert!(lines[2].ends_with(&format!("{pods} pods acked")), "{text}");
    if mode == Mode::InPodEbpf {
        assert!(
            text.contains(&format!("pods redirected by eBPF programs ({pods} netns)")),
            "{text}"
        );
    }
    for node_level in ["ztunnel: none", "ambient pod addresses"] {
        assert!(!text.contains(node_level), "{text}");
    }
    Ok(())
}

/// The status text once ztunnel has acked every pod.
fn eventually_text(agent: &zdivert_tests::agent::Agent, pods: usize) -> anyhow::Result<String> {
    let mut text = String::new();
    eventually("every pod acked", Duration::from_secs(10), || {
        text = agent.status_text()?;
        Ok(text.contains(&format!(": {pods} pods acked")))
    })?;
    Ok(text)
}

/// A root process in an ambient pod (no added capability) binds ztunnel's ports, with
/// SO_REUSEPORT as ztunnel does: on the pod's own address (more specific than ztunnel's
/// wildcard listener, so the kernel's lookup prefers it), and on the wildcard (joining
/// ztunnel's reuseport group, same uid). With the eBPF redirection, captured traffic goes only
/// to sockets that carry ztunnel's mark: the squatter accepts nothing, and a DENY on the pod
/// holds for plaintext and HBONE clients alike. (istio-cni's rules cannot tell whose socket
/// TPROXY finds: README, "What cannot get around ztunnel".) The agent names the pod, with the
/// ports, in a metric and in status.
#[test]
fn inpod_ebpf_gives_nothing_to_a_process_that_binds_ztunnels_ports_in_its_pod() -> anyhow::Result<()>
{
    use socket2::{Domain, Protocol, Socket, Type};
    let lab = Lab::real_with(
        Mode::InPodEbpf,
        |topo| MeshConfig {
            policies: vec![zdivert_tests::ztunnel::Policy::deny_port(
                topo.worker2().pod("reviews-v1"),
                9080,
            )],
            ..Default::default()
        },
        &[],
        &["--resync-secs", "1"],
    )?;
    let w2 = lab.w2();
    let (pp, rv1, sleep) = (
        w2.pod("productpage-v1"),
        w2.pod("reviews-v1"),
        w2.pod("sleep"),
    );
    let denied = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let rv1_ip = rv1.ip;
    let squatters: Vec<Socket> = rv1.ns.exec(move || -> anyhow::Result<Vec<Socket>> {
        let mut out = Vec::new();
        for port in [15006u16, 15008] {
            for addr in [
                std::net::IpAddr::from(rv1_ip),
                std::net::Ipv6Addr::UNSPECIFIED.into(),
            ] {
                let s = Socket::new(
                    Domain::for_address(std::net::SocketAddr::new(addr, port)),
                    Type::STREAM,
                    Some(Protocol::TCP),
                )?;
                s.set_reuse_port(true)?;
                s.set_nonblocking(true)?;
                if addr.is_ipv6() {
                    s.set_only_v6(false)?;
                }
                s.bind(&std::net::SocketAddr::new(addr, port).into())?;
                s.listen(64)?;
                out.push(s);
            }
        }
        Ok(out)
    })?;
    for (who, client) in [
        ("plaintext, from outside the mesh", sleep),
        ("HBONE, from an ambient pod", pp),
    ] {
        for _ in 0..8 {
            let r = request_timeout(&client.ns, sa(rv1.ip, 9080), Duration::from_secs(2));
            assert!(r.is_err(), "{who}: DENY did not hold: {r:?}");
        }
    }
    assert!(
        denied.seen().is_empty(),
        "reached around ztunnel: {:?}",
        denied.seen()
    );
    let accepted: Vec<String> = squatters
        .iter()
        .filter_map(|s| s.accept().ok())
        .map(|(_, from)| format!("{:?}", from.as_socket()))
        .collect();
    assert!(accepted.is_empty(), "the squatter accepted {accepted:?}");
    // The agent names the pod: in a metric, and in status with the ports.
    let sample = "zdivert_pod_foreign_listeners{namespace=\"default\",pod=\"reviews-v1\"}";
    zdivert_tests::eventually("the squatter named", Duration::from_secs(10), || {
        Ok(lab.agent2().metric(sample)? == 2.0)
    })?;
    let records = lab.agent2().status()?["inpod_pods"].clone();
    let ports = |pod: &str| {
        (records.as_array().into_iter().flatten())
            .find(|r| r["pod"] == format!("default/{pod}").as_str())
            .map(|r| r["foreign_listeners"].clone())
    };
    assert_eq!(
        ports("reviews-v1"),
        Some(serde_json::json!([15006, 15008])),
        "{records}"
    );
    assert_eq!(
        ports("productpage-v1"),
        Some(serde_json::json!([])),
        "{records}"
    );
    Ok(())
}
