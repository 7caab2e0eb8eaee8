//! The packet-path scenarios every dataplane must pass with the real ztunnel, run by `paths.rs`
//! in each mode: what ztunnel's access log recorded (direction, workloads, identity, policy
//! decision), and which source the server saw. Policy, load and DNS scenarios have files of
//! their own.
#![allow(dead_code)]
mod dns;
mod inpod;
mod ipv6;
mod load;
mod policy;
mod start;

// Every test binary includes `common`; only `paths.rs` runs these.
#[allow(unused_imports)]
pub use {dns::*, inpod::*, ipv6::*, load::*, policy::*, start::*};

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use super::{Lab, Mode};
use zdivert_tests::{
    apps::{RequestStream, TcpServer, UdpEcho, request, request_timeout, sa, udp_request},
    fallback,
    topology::Pod,
    ztunnel::{Access, MeshConfig, Service, Ztunnel, identity},
};

/// The Service VIP of `reviews_service`.
pub const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Service `reviews` (VIP `REVIEWS_VIP`, port 9080) with reviews-v1 behind it.
pub fn reviews_service() -> Service {
    Service {
        name: "reviews".into(),
        namespace: "default".into(),
        vip: REVIEWS_VIP.into(),
        port: 9080,
        target_port: 9080,
        endpoints: vec!["reviews-v1".into()],
    }
}

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
    let agent = lab.agent2();
    match mode {
        Mode::Iptables => {
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
        }
        Mode::Ebpf | Mode::EbpfClsact => {
            assert!(agent.counter("outbound", "redirected")? > 0);
            assert!(agent.counter("ztunnel_return", "hbone_to_ztunnel")? > 0);
        }
        Mode::InPodEbpf => {
            // Turned back in productpage's netns and given to ztunnel's :15001 there.
            assert!(agent.counter("pod_egress", "turned_back")? > 0);
            assert!(agent.counter("pod_ingress", "assigned_listener")? > 0);
        }
        Mode::InPodIptables => {
            let pp = &lab.w2().pod("productpage-v1").ns;
            let rule = "-p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001";
            assert!(
                fallback::rule_packets(pp, rule)? > 0,
                "no packet hit {rule}"
            );
        }
    }
    Ok(())
}

pub fn service_vip_reaches_ztunnel_before_any_dnat(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |_| vip_mesh())?;
    the_vip_goes_to_ztunnels_endpoint(&lab)
}

/// kube-proxy in IPVS mode binds every ClusterIP on the node's `kube-ipvs0`: a Service address
/// is then one of the node's, and still no pod may reach it around ztunnel. The device and its
/// address exist before the agent starts. (kube-proxy's device is a dummy, which not every test
/// kernel has: a veth with its name holds the address here.)
pub fn service_vip_bound_by_ipvs_on_the_node_is_still_captured(mode: Mode) -> anyhow::Result<()> {
    let lab = Lab::real(mode, |topo| {
        let node = &topo.worker2().ns;
        for cmd in [
            "link add kube-ipvs0 type veth peer name kube-ipvs0p".to_string(),
            "link set kube-ipvs0 up".to_string(),
            format!("addr add {REVIEWS_VIP}/32 dev kube-ipvs0"),
        ] {
            node.ip(&cmd).expect("kube-ipvs0 in the node's netns");
        }
        vip_mesh()
    })?;
    the_vip_goes_to_ztunnels_endpoint(&lab)
}

/// The `reviews` Service, and IPv4 only (see "The real ztunnel in the lab").
fn vip_mesh() -> MeshConfig {
    MeshConfig {
        services: vec![reviews_service()],
        ipv4_only: true,
        ..Default::default()
    }
}

/// productpage-v1's connection to the `reviews` VIP reaches the endpoint ztunnel picks, with
/// the node's DNAT (kube-proxy's, or standing in for IPVS's) pointing at another one: captured
/// packets must never meet it, so ztunnel sees the VIP.
fn the_vip_goes_to_ztunnels_endpoint(lab: &Lab) -> anyhow::Result<()> {
    let vip = REVIEWS_VIP;
    let (w2, pp, rv1, rv2) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("reviews-v2"),
    );
    w2.ns.iptables(&format!(
        "-t nat -A PREROUTING -d {vip}/32 -p tcp --dport 9080 -j DNAT --to-destination {}:9080",
        rv2.ip
    ))?;
    let _s1 = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _s2 = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;

    let reply = request(&pp.ns, sa(vip, 9080))?;

    assert_eq!(
        reply.server, "reviews-v1",
        "ztunnel's endpoint, not the node's DNAT's"
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
    // In-pod ztunnel holds :15008 in the pod's own netns: there the port is not the pod's to
    // open at all.
    let in_pod_15008 = if mode.is_in_pod() {
        None
    } else {
        Some(TcpServer::start(&rv1.ns, "reviews-v1-15008", 15008)?)
    };
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
    if let Some(s) = in_pod_15008 {
        assert!(
            s.seen().is_empty(),
            "the pod's :15008 was reached around ztunnel: {:?}",
            s.seen()
        );
    }
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
    // Then one captured connection on each node: once ztunnel has logged it, it would have
    // logged the earlier ones, which closed before it started.
    let details = lab.w1().pod("details-v1");
    let markers = [
        (lab.zt2(), pp, sa(rv1.ip, 9080)),
        (lab.zt1(), details, sa(curl.ip, 8080)),
    ];
    for (z, from, dst) in markers {
        request(&from.ns, dst)?;
        z.wait_access(1, from_to(from, dst, "outbound"))?;
        let others: Vec<_> = z
            .access_log()
            .into_iter()
            .filter(|a| a.dst() != Some(dst))
            .collect();
        assert!(
            others.is_empty(),
            "nothing but the marker went through ztunnel on {}:\n{}",
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

    // The agent told there is no ztunnel on the node (its pod deleted, its process gone).
    server.peers.lock().unwrap().clear();
    lab.ztunnels[0].kill();
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
        stream.wait_more(5)?;
        lab.agents[0].restart()?; // SIGKILL, then start again
    }
    super::wait_set_up(&lab.agents[0], w2, true)?;
    stream.wait_more(20)?;
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
