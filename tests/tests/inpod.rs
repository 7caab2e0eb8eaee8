//! In-pod mode end to end, with the real in-pod ztunnel (1.31-dev): zdivert's ZDS server hands
//! it each ambient pod's netns, and istio-cni's in-pod rules redirect inside each pod. A DENY
//! policy holds for ambient and non-ambient clients in both families, and allowed pairs reach
//! the server through ztunnel; a pod that leaves the mesh loses its rules and is reached
//! directly. First with the pieces driven by hand, then by the agent in `--ztunnel-mode inpod`,
//! with each redirection: eBPF programs in the pods' netns, and istio-cni's rules.
use std::{net::SocketAddr, time::Duration};

use zdivert::{
    dataplane::{inpod::istio_cni as rules, iptables::Backend},
    zds::Server,
};
use zdivert_tests::{
    TempDir,
    agent::{Mode, zds_socket},
    apps::{LongLived, RequestStream, TcpServer, request, request_timeout, sa},
    eventually,
    inpod::{self, wait_ztunnel_in, ztunnel_listens_in},
    topology::{Pod, Topology},
    ztunnel::{MeshConfig, Policy, Ztunnel, identity},
};

/// The mesh of the DENY tests: reviews-v1:9080 denied to everyone.
fn deny_reviews_v1(node: &zdivert_tests::topology::Node) -> MeshConfig {
    MeshConfig {
        policies: vec![Policy::deny_port(node.pod("reviews-v1"), 9080)],
        ..Default::default()
    }
}

#[test]
fn in_pod_redirection_holds_a_deny_policy_and_lets_allowed_pairs_through() -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let (pp, rv1, rv2, sleep) = (
        node.pod("productpage-v1"),
        node.pod("reviews-v1"),
        node.pod("reviews-v2"),
        node.pod("sleep"),
    );
    let mesh = deny_reviews_v1(node);
    let dir = TempDir::new("zdivert-inpod")?;
    let server = Server::start(&dir.0.join("ztunnel.sock"))?;
    let workloads = inpod::workloads(node.pods.values().filter(|p| p.ambient));
    for p in node.pods.values().filter(|p| p.ambient) {
        rules::apply(&p.ns.path(), Backend::Nft, false)?;
    }
    // Applying again changes nothing (the jumps are not repeated).
    let before = pp.ns.cmd("iptables-save", &["-t", "nat"])?;
    rules::apply(&pp.ns.path(), Backend::Nft, false)?;
    let after = pp.ns.cmd("iptables-save", &["-t", "nat"])?;
    let rules = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("-A"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(rules(&before), rules(&after));
    // Golden: what the kernel holds is istio-cni's rules, in both families, with its route.
    for (v6, save, ip) in [
        (false, "iptables-save", "-4"),
        (true, "ip6tables-save", "-6"),
    ] {
        let held = rules(&pp.ns.cmd(save, &[])?);
        let wanted = rules::restore_input(v6, false, &|_, _, _| false);
        for line in wanted.lines().filter(|l| l.starts_with("-A")) {
            assert!(
                held.iter().any(|h| h == line),
                "{save}: no {line}\n{held:#?}"
            );
        }
        let rule = pp.ns.cmd("ip", &[ip, "rule"])?;
        assert!(
            rule.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100"),
            "{rule}"
        );
        let route = pp.ns.cmd("ip", &[ip, "route", "show", "table", "100"])?;
        assert!(route.starts_with("local default dev lo"), "{route}");
    }

    server.set(workloads);
    let mut ztunnel = Ztunnel::start_in_pod(&topo, node, &node.ztunnel, &mesh, server.path())?;
    ztunnel.wait_ready()?;
    wait_ztunnel_in(node.pods.values().filter(|p| p.ambient))?;
    let denied = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _allowed = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;

    let ways_in: [(&str, &Pod, SocketAddr); 4] = [
        ("ambient", pp, sa(rv1.ip, 9080)),
        ("not ambient", sleep, sa(rv1.ip, 9080)),
        ("ambient, IPv6", pp, sa(rv1.ip6, 9080)),
        ("not ambient, IPv6", sleep, sa(rv1.ip6, 9080)),
    ];
    for (way, client, dst) in ways_in {
        let r = request_timeout(&client.ns, dst, Duration::from_secs(2));
        assert!(r.is_err(), "{way}: DENY did not hold: {r:?}");
    }
    assert!(
        denied.seen().is_empty(),
        "reached around ztunnel: {:?}",
        denied.seen()
    );
    ztunnel.wait_access(ways_in.len(), |a| a.direction() == "inbound" && a.denied())?;

    for (client, dst) in [
        (pp, sa(rv2.ip, 9080)),
        (sleep, sa(rv2.ip, 9080)),
        (pp, sa(rv2.ip6, 9080)),
        (sleep, sa(rv2.ip6, 9080)),
    ] {
        let reply = request(&client.ns, dst)?;
        assert_eq!(reply.server, "reviews-v2", "{} → {dst}", client.name);
    }
    // productpage's connections came in over HBONE with its identity.
    let inbound = ztunnel.wait_access(4, |a| {
        a.direction() == "inbound" && a.dst_workload() == "reviews-v2" && !a.denied()
    })?;
    assert_eq!(
        inbound
            .iter()
            .filter(|a| a.src_identity() == identity(pp))
            .count(),
        2,
        "{}",
        ztunnel.access_summary()
    );

    // reviews-v2 leaves the mesh: ztunnel lets go of it, then its rules go, and nothing of
    // them is left; its clients now reach it directly.
    let mut rest = inpod::workloads(node.pods.values().filter(|p| p.ambient));
    rest.retain(|_, w| w.info.name != rv2.name);
    server.set(rest);
    eventually(
        "ztunnel gone from reviews-v2",
        Duration::from_secs(10),
        || Ok(!ztunnel_listens_in(rv2)?),
    )?;
    rules::remove(&rv2.ns.path(), Backend::Nft)?;
    for (save, ip) in [("iptables-save", "-4"), ("ip6tables-save", "-6")] {
        let left = rv2.ns.cmd(save, &[])?;
        assert!(!left.contains("ISTIO"), "{left}");
        let rule = rv2.ns.cmd("ip", &[ip, "rule"])?;
        assert!(!rule.contains("0x111"), "{rule}");
        let route = rv2.ns.cmd("ip", &[ip, "route", "show", "table", "100"])?;
        assert!(route.trim().is_empty(), "{route}");
    }
    let logged = ztunnel.access_log().len();
    let reply = request(&sleep.ns, sa(rv2.ip, 9080))?;
    assert_eq!(reply.server, "reviews-v2");
    // A connection ztunnel does see, after it: once it is logged, anything of the one before
    // would have been too.
    assert!(request_timeout(&sleep.ns, sa(rv1.ip, 9080), Duration::from_secs(2)).is_err());
    let log = ztunnel.wait_access(logged + 1, |_| true)?;
    assert_eq!(log.len(), logged + 1, "{}", ztunnel.access_summary());
    assert_eq!(log[logged].dst_workload(), "reviews-v1");
    Ok(())
}

macro_rules! with_each_redirection {
    ($($test:ident),* $(,)?) => {
        mod inpod_ebpf {
            $(#[test]
            fn $test() -> anyhow::Result<()> {
                super::$test(zdivert_tests::agent::Mode::InPodEbpf)
            })*
        }
        mod inpod_iptables {
            $(#[test]
            fn $test() -> anyhow::Result<()> {
                super::$test(zdivert_tests::agent::Mode::InPodIptables)
            })*
        }
    };
}

with_each_redirection!(
    the_agent_in_pod_mode_serves_ztunnel_and_survives_its_own_restart,
    without_ztunnel_in_pod_traffic_fails_closed_and_resumes_when_it_is_back,
);

/// The agent in `--ztunnel-mode inpod`: it serves ZDS and redirects in each pod; a DENY policy
/// holds, a SIGKILLed agent comes back under a request stream without a failed request (the
/// redirection stays in the pods, ztunnel reconnects and gets the snapshot again), and a pod
/// that leaves the mesh loses its redirection and ztunnel's listeners.
fn the_agent_in_pod_mode_serves_ztunnel_and_survives_its_own_restart(
    mode: Mode,
) -> anyhow::Result<()> {
    serves_ztunnel_and_survives_its_own_restart(mode, &[])
}

/// The programs attached as TCX links instead of tc filters (in-pod mode's default).
#[test]
fn inpod_ebpf_with_tcx_links_serves_ztunnel_and_survives_its_own_restart() -> anyhow::Result<()> {
    serves_ztunnel_and_survives_its_own_restart(Mode::InPodEbpf, &["--attach", "tcx"])
}

fn serves_ztunnel_and_survives_its_own_restart(mode: Mode, extra: &[&str]) -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let (pp, rv1, rv2, sleep) = (
        node.pod("productpage-v1"),
        node.pod("reviews-v1"),
        node.pod("reviews-v2"),
        node.pod("sleep"),
    );
    let mesh = deny_reviews_v1(node);
    let socket = zds_socket(&node.name);
    let mut agent = inpod::start_agent_with(node, mode, extra)?;
    let mut ztunnel = Ztunnel::start_in_pod(&topo, node, &node.ztunnel, &mesh, &socket)?;
    ztunnel.wait_ready()?;
    wait_ztunnel_in(node.pods.values().filter(|p| p.ambient))?;
    // ZDS in the agent's metrics: one ztunnel, and an acked add per ambient pod.
    let ambient = node.pods.values().filter(|p| p.ambient).count() as f64;
    let adds = "zdivert_zds_requests_total{request=\"add\",outcome=\"acked\"}";
    eventually("ZDS metrics", Duration::from_secs(5), || {
        Ok(agent.metric("zdivert_zds_peers")? == 1.0 && agent.metric(adds)? == ambient)
    })?;
    // ...and in `zdivert status`: the one ztunnel, by pid, and the pods it acked.
    let st = agent.status()?;
    let peers = st["zds"]["peers"].as_array().cloned().unwrap_or_default();
    assert_eq!(peers.len(), 1, "{st}");
    assert_eq!(
        peers[0]["pid"].as_i64(),
        ztunnel.pid().map(i64::from),
        "{st}"
    );
    assert_eq!(
        peers[0]["acked"].as_array().map(Vec::len),
        Some(ambient as usize)
    );
    let denied = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _allowed = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;
    for client in [pp, sleep] {
        let r = request_timeout(&client.ns, sa(rv1.ip, 9080), Duration::from_secs(2));
        assert!(r.is_err(), "{}: DENY did not hold: {r:?}", client.name);
    }
    assert!(denied.seen().is_empty(), "{:?}", denied.seen());
    ztunnel.wait_access(2, |a| a.direction() == "inbound" && a.denied())?;
    if mode == Mode::InPodEbpf {
        // The programs, not something else, took both to ztunnel: productpage's to :15001 in
        // its netns, sleep's to :15006 in reviews-v1's.
        let assigned = "zdivert_packets_total{path=\"pod_ingress\",outcome=\"assigned_listener\"}";
        assert!(agent.metric(assigned)? >= 2.0, "{assigned}");
    }

    let stream = RequestStream::start(&pp.ns, sa(rv2.ip, 9080))?;
    let long = LongLived::start(&pp.ns, sa(rv2.ip, 9080))?;
    stream.wait_more(5)?;
    agent.kill();
    stream.wait_more(5)?;
    agent.restart()?;
    // ztunnel retries the socket with a doubling backoff of up to 15 s: an agent that takes
    // over 10 s to come back (a program load under emulation) is met up to 15 s later.
    eventually(
        "ztunnel back on the restarted agent's socket",
        Duration::from_secs(60),
        || Ok(ztunnel.log().matches("received snapshot sent").count() >= 2),
    )?;
    stream.wait_more(10)?;
    long.wait_more(10)?;
    let failed: Vec<String> = stream
        .stop()
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    assert_eq!(failed, Vec::<String>::new());
    let broken: Vec<String> = long.stop().into_iter().filter_map(Result::err).collect();
    assert_eq!(broken, Vec::<String>::new());

    agent.describe(&node.pods_file_without(true, &["reviews-v2"]))?;
    eventually("reviews-v2 released", Duration::from_secs(10), || {
        Ok(!ztunnel_listens_in(rv2)? && inpod::redirection_in(rv2)?.is_empty())
    })?;
    assert_eq!(request(&sleep.ns, sa(rv2.ip, 9080))?.server, "reviews-v2");
    Ok(())
}

/// ztunnel down under the agent: captured traffic fails closed (nothing reaches the server
/// around it), peers that break the protocol are turned away without disturbing anything, and
/// the restarted ztunnel gets its snapshot and carries traffic again.
fn without_ztunnel_in_pod_traffic_fails_closed_and_resumes_when_it_is_back(
    mode: Mode,
) -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let (pp, rv2) = (node.pod("productpage-v1"), node.pod("reviews-v2"));
    let socket = zds_socket(&node.name);
    let agent = inpod::start_agent(node, mode)?;
    let mut ztunnel =
        Ztunnel::start_in_pod(&topo, node, &node.ztunnel, &MeshConfig::default(), &socket)?;
    ztunnel.wait_ready()?;
    wait_ztunnel_in([rv2])?;
    let server = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;
    assert_eq!(request(&pp.ns, sa(rv2.ip, 9080))?.server, "reviews-v2");

    ztunnel.kill();
    let seen = server.seen().len();
    for dst in [sa(rv2.ip, 9080), sa(rv2.ip6, 9080)] {
        let r = request_timeout(&pp.ns, dst, Duration::from_secs(2));
        assert!(r.is_err(), "{dst} answered without ztunnel: {r:?}");
    }
    assert_eq!(
        server.seen().len(),
        seen,
        "reached around ztunnel: {:?}",
        server.seen()
    );

    // Peers that are not ztunnel, or not speaking ZDS, are turned away.
    let garbage = zdivert::zds::Peer::connect(&socket)?;
    garbage.send(&[0xff, 0xff, 0xff], None)?;
    let oversized = zdivert::zds::Peer::connect(&socket)?;
    oversized.send(&[0u8; 4096], None)?;
    let failed = "zdivert_zds_requests_total{request=\"snapshot\",outcome=\"failed\"}";
    eventually(
        "both bad peers turned away",
        Duration::from_secs(10),
        || Ok(agent.metric(failed)? >= 2.0),
    )?;

    ztunnel.restart()?;
    wait_ztunnel_in([rv2])?;
    assert_eq!(request(&pp.ns, sa(rv2.ip, 9080))?.server, "reviews-v2");
    assert_eq!(request(&pp.ns, sa(rv2.ip6, 9080))?.server, "reviews-v2");
    // Its log starts anew with the restart: the two connections since.
    ztunnel.wait_access(2, |a| {
        a.direction() == "inbound" && a.dst_workload() == "reviews-v2" && a.error().is_none()
    })?;
    Ok(())
}
