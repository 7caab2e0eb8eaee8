//! The packet-path scenarios every dataplane must pass with the real ztunnel, run by `paths.rs`
//! in each mode: what ztunnel's access log recorded (direction, workloads, identity, policy
//! decision), and which source the server saw.
#![allow(dead_code)]
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use super::{Lab, Mode};
use zdivert_tests::{
    apps::{RequestStream, TcpServer, UdpEcho, request, request_timeout, sa, udp_request},
    fallback,
    topology::Pod,
    ztunnel::{Access, MeshConfig, Policy, Service, Ztunnel, identity},
};

/// ztunnel's record of a connection from `src` to `dst` in `direction`.
pub fn from_to(src: &Pod, dst: SocketAddr, direction: &'static str) -> impl Fn(&Access) -> bool {
    let src_ips: [IpAddr; 2] = [src.ip.into(), src.ip6.into()];
    move |a: &Access| {
        a.direction() == direction
            && a.dst() == Some(dst)
            && a.src_ip().is_some_and(|ip| src_ips.contains(&ip))
    }
}

/// productpage-v1 → `server`:9080 through ztunnel, HBONE: the server must see the client pod,
/// productpage's ztunnel record it outbound, and `inbound_on` (the server's node's ztunnel)
/// record it inbound with the client pod's mTLS identity. Returns the outbound record.
fn hbone_from_productpage(lab: &Lab, server: &Pod, inbound_on: &Ztunnel) -> anyhow::Result<Access> {
    let pp = lab.w2().pod("productpage-v1");
    let _server = TcpServer::start(&server.ns, &server.name, 9080)?;
    let dst = sa(server.ip, 9080);

    let reply = request(&pp.ns, dst)?;

    assert_eq!(reply.server, server.name);
    assert_eq!(reply.peer.ip(), pp.ip, "the server sees the client pod");
    let out = lab.zt2().wait_access(1, from_to(pp, dst, "outbound"))?;
    assert_eq!(out[0].dst_workload(), server.name);
    assert_eq!(
        out[0].get("dst.addr"),
        Some(format!("{}:15008", server.ip).as_str()),
        "HBONE to the pod's :15008"
    );
    let inb = inbound_on.wait_access(1, from_to(pp, dst, "inbound"))?;
    assert_eq!(inb[0].src_identity(), identity(pp), "mTLS identity");
    assert_eq!(inb[0].error(), None);
    Ok(out[0].clone())
}

pub fn same_node_ambient_to_ambient_is_hbone_through_ztunnel(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    hbone_from_productpage(&lab, lab.w2().pod("reviews-v1"), lab.zt2())?;
    if mode == Mode::Iptables {
        // The article's path, by the rules' own packet counters: marked 0x100 on the node,
        // tproxied from pistioout, and HBONE sent back in through pistioin to :15008.
        let (node, zt) = (&lab.w2().ns, &lab.w2().ztunnel.ns);
        for (ns, rule) in [
            (
                node,
                "--match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100",
            ),
            (
                node,
                "--dport 15008 -m set --match-set ztunnel-pods-ips dst",
            ),
            (
                node,
                "--sport 15008 -m set --match-set ztunnel-pods-ips dst",
            ),
            (zt, "-i pistioout -p tcp -j TPROXY --on-port 15001"),
            (zt, "--dport 15008 -j TPROXY --on-port 15008"),
        ] {
            assert!(
                fallback::rule_packets(ns, rule)? > 0,
                "no packet hit {rule}"
            );
        }
    } else {
        let agent = lab.agent2();
        assert!(agent.counter("outbound", "redirected")? > 0);
        assert!(agent.counter("ztunnel_return", "hbone_to_ztunnel")? > 0);
    }
    Ok(())
}

pub fn service_vip_reaches_ztunnel_before_any_dnat(mode: Mode) -> anyhow::Result<()> {
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let lab = Lab::real(mode, |_| MeshConfig {
        services: vec![Service {
            name: "reviews".into(),
            namespace: "default".into(),
            vip: vip.into(),
            port: 9080,
            target_port: 9080,
            endpoints: vec!["reviews-v1".into()],
        }],
        policies: vec![],
        ipv4_only: true,
    })?;
    let (w2, pp, rv1, rv2) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("reviews-v2"),
    );
    // kube-proxy's DNAT for the Service, in the node's netns, to the *wrong* endpoint: it must
    // never see captured packets, so ztunnel sees the VIP and picks the endpoint itself.
    w2.ns.iptables(&format!(
        "-t nat -A PREROUTING -d {vip}/32 -p tcp --dport 9080 -j DNAT --to-destination {}:9080",
        rv2.ip
    ))?;
    let _s1 = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _s2 = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;

    let reply = request(&pp.ns, sa(vip, 9080))?;

    assert_eq!(
        reply.server, "reviews-v1",
        "ztunnel's endpoint, not kube-proxy's"
    );
    assert_eq!(reply.peer.ip(), pp.ip);
    let out = lab.zt2().wait_access(1, |a| {
        a.direction() == "outbound" && a.src_workload() == pp.name
    })?;
    assert_eq!(
        out[0].get("dst.service"),
        Some("reviews.default.svc.cluster.local"),
        "ztunnel saw the VIP: {}",
        out[0]
    );
    Ok(())
}

pub fn non_ambient_to_ambient_goes_through_ztunnels_inbound(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let (sleep, rv1) = (lab.w2().pod("sleep"), lab.w2().pod("reviews-v1"));
    let curl = lab.w1().pod("curl");
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let in_pod_15008 = TcpServer::start(&rv1.ns, "reviews-v1-15008", 15008)?;
    let dst = sa(rv1.ip, 9080);

    for client in [sleep, curl] {
        let reply = request(&client.ns, dst)?;
        assert_eq!(reply.peer.ip(), client.ip, "the pod sees the real client");
        let inb = lab.zt2().wait_access(1, from_to(client, dst, "inbound"))?;
        assert_eq!(inb[0].error(), None, "{}", inb[0]);
    }
    // Plain TCP to :15008 is HBONE's port: ztunnel's listener takes it (and wants mTLS), the
    // pod's own socket on that port never sees it.
    let plain = request_timeout(&sleep.ns, sa(rv1.ip, 15008), Duration::from_secs(2));
    assert!(plain.is_err(), "plain TCP is no HBONE: {plain:?}");
    assert!(
        in_pod_15008.seen().is_empty(),
        "the pod's :15008 was reached around ztunnel: {:?}",
        in_pod_15008.seen()
    );
    Ok(())
}

pub fn cross_node_ambient_to_ambient_is_hbone_between_ztunnels(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    // The other node's ztunnel authenticated the client pod over mTLS.
    hbone_from_productpage(&lab, lab.w1().pod("details-v1"), lab.zt1()).map(|_| ())
}

pub fn ambient_to_non_ambient_goes_through_ztunnel(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let (pp, sleep) = (lab.w2().pod("productpage-v1"), lab.w2().pod("sleep"));
    let curl = lab.w1().pod("curl");
    let _s1 = TcpServer::start(&sleep.ns, "sleep", 8080)?;
    let _s2 = TcpServer::start(&curl.ns, "curl", 8080)?;

    for server in [sleep, curl] {
        let dst = sa(server.ip, 8080);
        let reply = request(&pp.ns, dst)?;
        assert_eq!(reply.server, server.name);
        assert_eq!(reply.peer.ip(), pp.ip, "ztunnel connects as the client pod");
        let out = lab.zt2().wait_access(1, from_to(pp, dst, "outbound"))?;
        assert_eq!(out[0].dst_workload(), server.name);
    }
    Ok(())
}

pub fn node_probes_udp_and_non_ambient_traffic_are_not_captured(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let (w2, pp, rv1, sleep) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("sleep"),
    );
    let curl = lab.w1().pod("curl");
    let _s1 = TcpServer::start(&curl.ns, "curl", 8080)?;
    let _s2 = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _u = UdpEcho::start(&rv1.ns, 5353)?;

    // non-ambient → non-ambient across nodes
    let reply = request(&sleep.ns, sa(curl.ip, 8080))?;
    assert_eq!(reply.peer.ip(), sleep.ip);
    // the node itself (a kubelet probe) → ambient pod
    let reply = request(&w2.ns, sa(rv1.ip, 9080))?;
    assert_eq!(
        reply.peer.ip(),
        w2.gateway,
        "probe from the node's own address"
    );
    // UDP (DNS-like) from an ambient pod
    let echo = udp_request(&pp.ns, sa(rv1.ip, 5353))?;
    assert!(echo.starts_with(&format!("{}:", pp.ip)), "{echo}");
    std::thread::sleep(Duration::from_millis(300));
    for z in &lab.ztunnels {
        assert!(
            z.access_log().is_empty(),
            "nothing went through ztunnel on {}:\n{}",
            z.node,
            z.access_summary()
        );
    }
    Ok(())
}

/// Whether a request from `client` to `dst` fails and the server never sees it.
fn refused_around_ztunnel(client: &Pod, dst: SocketAddr, server: &TcpServer) -> bool {
    let r = request_timeout(&client.ns, dst, Duration::from_millis(700));
    r.is_err() && server.seen().is_empty()
}

pub fn without_a_ztunnel_ambient_traffic_is_dropped_not_delivered(
    mode: Mode,
) -> anyhow::Result<()> {
    let mut lab = Lab::real(mode, |_| MeshConfig::default())?;
    let w2 = lab.topo.worker2();
    let (pp, rv1, sleep) = (
        w2.pod("productpage-v1"),
        w2.pod("reviews-v1"),
        w2.pod("sleep"),
    );
    let server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let dst = sa(rv1.ip, 9080);

    // ztunnel's process gone (crashed, being replaced): its listeners are gone.
    lab.ztunnels[0].kill();
    for client in [pp, sleep] {
        assert!(
            refused_around_ztunnel(client, dst, &server),
            "{} reached the ambient pod while ztunnel was down: {:?}",
            client.name,
            server.seen()
        );
    }
    // The agent says so: not ready, by metric; status names the missing listeners.
    let agent = &lab.agents[0];
    zdivert_tests::eventually("the agent saw ztunnel go", Duration::from_secs(10), || {
        Ok(agent.metric("zdivert_ztunnel_ready")? == 0.0)
    })?;
    if mode.is_ebpf() {
        assert_eq!(
            agent.status()?["ztunnel"]["missing_listeners"],
            serde_json::json!([15001, 15006, 15008])
        );
    }
    lab.ztunnels[0].restart()?;
    zdivert_tests::eventually(
        "the agent saw ztunnel back",
        Duration::from_secs(10),
        || Ok(agent.metric("zdivert_ztunnel_ready")? == 1.0),
    )?;
    let reply = request(&pp.ns, dst)?;
    assert_eq!(reply.peer.ip(), pp.ip, "back through the restarted ztunnel");
    lab.ztunnels[0].wait_access(1, from_to(pp, dst, "inbound"))?;

    // The agent told there is no ztunnel on the node (its pod deleted).
    server.peers.lock().unwrap().clear();
    let agent = &lab.agents[0];
    agent.describe(&w2.pods_file(false))?;
    super::wait_set_up(agent, w2, false)?;
    for client in [pp, sleep] {
        assert!(
            refused_around_ztunnel(client, dst, &server),
            "{} reached the ambient pod without ztunnel: {:?}",
            client.name,
            server.seen()
        );
    }
    if mode.is_ebpf() {
        assert!(agent.status()?["ztunnel"].is_null());
        assert!(agent.counter("outbound", "dropped_no_ztunnel")? > 0);
        assert!(agent.counter("inbound", "dropped_no_ztunnel")? > 0);
    }
    Ok(())
}

pub fn sigkilled_agent_restarts_without_failing_a_connection(mode: Mode) -> anyhow::Result<()> {
    let mut lab = Lab::real(mode, |_| MeshConfig::default())?;
    let w2 = lab.topo.worker2();
    let (pp, rv1) = (w2.pod("productpage-v1"), w2.pod("reviews-v1"));
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let dst = sa(rv1.ip, 9080);
    // A stream of connections from productpage while the agent is killed and restarted.
    let stream = RequestStream::start(&pp.ns, dst)?;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        lab.agents[0].restart()?; // SIGKILL, then start again
    }
    super::wait_set_up(&lab.agents[0], w2, true)?;
    std::thread::sleep(Duration::from_millis(300));
    let results = stream.stop();
    super::assert_none_failed(&results, 20);
    lab.ztunnels[0]
        .wait_access(results.len(), from_to(pp, dst, "inbound"))
        .map(|_| ())
}

pub fn ping_to_and_from_ambient_pods_works(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let (w2, pp, rv1, sleep) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("sleep"),
    );
    let details = lab.w1().pod("details-v1");
    let ping = |ns: &zdivert_tests::ns::Netns, ip: Ipv4Addr| {
        ns.cmd("ping", &["-c", "1", "-W", "2", &ip.to_string()])
    };
    for (from, ns, to) in [
        ("productpage-v1", &pp.ns, rv1.ip),
        ("productpage-v1", &pp.ns, sleep.ip),
        ("productpage-v1", &pp.ns, details.ip),
        ("sleep", &sleep.ns, rv1.ip),
        ("the node", &w2.ns, rv1.ip),
        ("details-v1", &details.ns, pp.ip),
    ] {
        let out = ping(ns, to);
        assert!(
            out.as_ref().is_ok_and(|o| o.contains("1 received")),
            "{mode:?}: ping {from} → {to}: {out:?}"
        );
    }
    assert!(lab.zt2().access_log().is_empty(), "ICMP is not proxied");
    Ok(())
}

/// SYN retransmissions the TCP stack of `ns` counted so far (`TcpExt: TCPSynRetrans`).
pub fn syn_retransmits(ns: &zdivert_tests::ns::Netns) -> anyhow::Result<u64> {
    ns.net_counter("netstat", "TcpExt", "TCPSynRetrans")
}

/// A DENY policy on reviews-v1:9080 holds on every way in, and nothing else is denied.
pub fn deny_policy_holds_on_every_way_in(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |topo| MeshConfig {
        services: vec![],
        policies: vec![Policy::deny_port(topo.worker2().pod("reviews-v1"), 9080)],
        ..Default::default()
    })?;
    let (w2, pp, rv1, rv2, sleep) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("reviews-v2"),
        lab.w2().pod("sleep"),
    );
    let (details, curl) = (lab.w1().pod("details-v1"), lab.w1().pod("curl"));
    let denied = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _allowed = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;
    // A NodePort as kube-proxy makes it: DNAT on the node's port, masqueraded to the node's
    // address, so the pod sees the node as its client.
    let node_port = 30080;
    for (to, port) in [(rv1.ip, node_port), (rv2.ip, node_port + 1)] {
        node_port_rule(lab.w2(), port, sa(to, 9080))?;
    }
    let node_addr = SocketAddr::new(w2.underlay_ip.into(), node_port);

    let ways_in: [(&str, &Pod, SocketAddr); 4] = [
        ("same node, ambient", pp, sa(rv1.ip, 9080)),
        ("other node, ambient", details, sa(rv1.ip, 9080)),
        ("same node, not ambient", sleep, sa(rv1.ip, 9080)),
        ("NodePort from the other node", curl, node_addr),
    ];
    for (way, client, dst) in ways_in {
        let r = request_timeout(&client.ns, dst, Duration::from_secs(2));
        assert!(
            r.is_err(),
            "{way}: DENY did not hold, the pod answered: {r:?}"
        );
    }
    assert!(
        denied.seen().is_empty(),
        "reviews-v1 was reached around ztunnel: {:?}",
        denied.seen()
    );
    let rejections = lab
        .zt2()
        .wait_access(4, |a| a.direction() == "inbound" && a.denied())?;
    // The NodePort client reaches ztunnel as the node (masqueraded to the address of the
    // interface the node routed it out of), which is no pod's address.
    let pod_ips: Vec<IpAddr> = lab
        .topo
        .nodes
        .iter()
        .flat_map(|n| n.pods.values())
        .flat_map(|p| [IpAddr::from(p.ip), IpAddr::from(p.ip6)])
        .collect();
    assert!(
        rejections
            .iter()
            .any(|a| a.src_ip().is_some_and(|ip| !pod_ips.contains(&ip))),
        "the NodePort connection was denied by ztunnel: {}",
        lab.zt2().access_summary()
    );

    // Allowed pairs still work, the NodePort one included.
    for (client, dst) in [
        (pp, sa(rv2.ip, 9080)),
        (details, sa(rv2.ip, 9080)),
        (sleep, sa(rv2.ip, 9080)),
        (curl, SocketAddr::new(w2.underlay_ip.into(), node_port + 1)),
    ] {
        let reply = request(&client.ns, dst)?;
        assert_eq!(reply.server, "reviews-v2", "{} → {dst}", client.name);
    }
    lab.zt2()
        .wait_access(4, |a| {
            a.direction() == "inbound" && a.dst_workload() == "reviews-v2"
        })
        .map(|_| ())
}

/// kube-proxy's NodePort in the node's netns: DNAT `port` on the node to `to`, and masquerade
/// what it forwards there (`externalTrafficPolicy: Cluster`).
fn node_port_rule(
    node: &zdivert_tests::topology::Node,
    port: u16,
    to: SocketAddr,
) -> anyhow::Result<()> {
    node.ns.iptables(&format!(
        "-t nat -A PREROUTING -p tcp --dport {port} -j DNAT --to-destination {to}"
    ))?;
    node.ns.iptables(&format!(
        "-t nat -A POSTROUTING -d {} -p tcp -m conntrack --ctstate DNAT -j MASQUERADE",
        to.ip()
    ))?;
    Ok(())
}

/// Short connections from four ambient pods, 16 clients, to a server that answers and closes
/// first, as `Connection: close` HTTP does: ztunnel closes its client side first and holds
/// TIME_WAIT, and the clients take ports from a narrowed range, so new SYNs meet ztunnel's
/// TIME_WAIT sockets again and again.
/// Returns (connections, failures, SYN retransmissions in the clients and ztunnel).
pub fn churn_with_normal_closes(
    lab: &Lab,
    per_client: usize,
) -> anyhow::Result<(usize, usize, u64)> {
    use zdivert_tests::load;
    let w2 = lab.w2();
    let rv1 = w2.pod("reviews-v1");
    let _server = load::Server::start(&rv1.ns, 9080)?;
    let clients = ["productpage-v1", "reviews-v2", "reviews-v3", "ratings-v1"];
    for c in clients {
        w2.pod(c)
            .ns
            .sysctl("net.ipv4.ip_local_port_range", "40000 40063")?;
    }
    let counted = |lab: &Lab| -> anyhow::Result<u64> {
        let mut n = syn_retransmits(&lab.w2().ztunnel.ns)?;
        for c in clients {
            n += syn_retransmits(&lab.w2().pod(c).ns)?;
        }
        Ok(n)
    };
    let before = counted(lab)?;
    let from: Vec<_> = clients.iter().map(|c| w2.pod(c).ns.path()).collect();
    let run = load::churn(&from, sa(rv1.ip, 9080), 16, load::Amount::Each(per_client))?;
    Ok((
        run.connections + run.failures,
        run.failures,
        counted(lab)? - before,
    ))
}

pub fn connection_churn_with_normal_closes_never_waits_for_a_retransmission(
    mode: Mode,
) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let (total, failed, retransmits) = churn_with_normal_closes(&lab, 125)?;
    assert_eq!(failed, 0, "{failed} of {total} connections failed");
    assert_eq!(
        retransmits, 0,
        "{retransmits} SYN retransmissions over {total} connections"
    );
    if mode.is_ebpf() {
        assert!(
            lab.agent2().counter("ztunnel_tproxy", "syn_to_time_wait")? > 0,
            "no SYN met a TIME_WAIT socket: the test did not test it"
        );
        assert!(
            lab.agent2()
                .counter("ztunnel_sk_lookup", "assigned_listener")?
                > 0
        );
    }
    Ok(())
}

/// Full-size segments both ways, same node and cross node: nothing on the path may be smaller
/// than what the two ends agreed on (the fallback's tunnels are 50 bytes smaller).
pub fn bulk_transfers_complete_same_node_and_cross_node(mode: Mode) -> anyhow::Result<()> {
    use zdivert_tests::load;
    let lab = Lab::real(mode, |_| MeshConfig::default())?;
    let pp = lab.w2().pod("productpage-v1");
    for server in [lab.w2().pod("reviews-v1"), lab.w1().pod("details-v1")] {
        let _sink = load::Server::start(&server.ns, 7000)?;
        let dst = sa(server.ip, 7000);
        let bits = load::bulk(&pp.ns.path(), dst, 1, Duration::from_millis(300))
            .map_err(|e| anyhow::anyhow!("{mode:?}: bulk to {}: {e:#}", server.name))?;
        assert!(bits > 0.0, "{} received nothing", server.name);
        lab.zt2().wait_access(1, from_to(pp, dst, "outbound"))?;
    }
    Ok(())
}

/// `--dns-capture`: an ambient pod's DNS, over UDP and TCP, is answered by ztunnel's DNS proxy
/// (a name only ztunnel's config knows), from the address the pod asked; without the option
/// DNS is untouched and reaches the server the pod asked.
pub fn dns_capture_answers_from_ztunnel_and_only_when_enabled(mode: Mode) -> anyhow::Result<()> {
    use zdivert_tests::dns::{resolve_tcp, resolve_udp};
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let mesh = |_: &zdivert_tests::topology::Topology| MeshConfig {
        services: vec![Service {
            name: "reviews".into(),
            namespace: "default".into(),
            vip: vip.into(),
            port: 9080,
            target_port: 9080,
            endpoints: vec!["reviews-v1".into()],
        }],
        ..Default::default()
    };
    let name = "reviews.default.svc.cluster.local";
    for capture in [true, false] {
        let lab = if capture {
            Lab::real_with(
                mode,
                mesh,
                &[("ISTIO_META_DNS_CAPTURE", "true")],
                &["--dns-capture"],
            )?
        } else {
            Lab::real(mode, mesh)?
        };
        let (pp, sleep) = (lab.w2().pod("productpage-v1"), lab.w2().pod("sleep"));
        // The pod's nameserver is another pod here: whatever answers, answers as it.
        let server = sa(sleep.ip, 53);
        let echo = UdpEcho::start(&sleep.ns, 53)?;
        if capture {
            for (how, answer) in [
                ("UDP", resolve_udp(&pp.ns, server, name)),
                ("TCP", resolve_tcp(&pp.ns, server, name)),
            ] {
                let (addr, from) = answer?;
                assert_eq!(addr, vip, "{mode:?} {how}: ztunnel resolved the Service");
                assert_eq!(from, server, "{mode:?} {how}: answered as the server asked");
            }
            assert_eq!(echo.received(), 0, "the pod's nameserver saw nothing");
        } else {
            let r = resolve_udp(&pp.ns, server, name);
            assert!(r.is_err(), "not a DNS server: only its echo answers: {r:?}");
            assert_eq!(echo.received(), 1, "DNS went where the pod sent it");
        }
    }
    Ok(())
}
