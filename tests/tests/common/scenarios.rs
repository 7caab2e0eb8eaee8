//! The packet-path scenarios both dataplanes must pass, each run by `ebpf_paths` and
//! `iptables_paths` with its mode: which ztunnel listener accepted each connection, which
//! original destination it saw, and which source the server saw.
#![allow(dead_code)]
use std::{net::Ipv4Addr, time::Duration};

use super::Lab;
use zdivert_tests::{
    apps::{RequestStream, TcpServer, UdpEcho, connect, request, request_timeout, sa, udp_request},
    fallback,
    standin::{HBONE, INBOUND, OUTBOUND},
};

pub fn outbound_same_node_goes_through_15001_with_original_destination(
    mode: &str,
) -> anyhow::Result<()> {
    let lab = Lab::start_mode(mode, vec![])?;
    let (pp, rv1) = (lab.w2().pod("productpage-v1"), lab.w2().pod("reviews-v1"));
    let server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;

    let reply = request(&pp.ns, sa(rv1.ip, 9080))?;

    let recs = lab.z2().to(sa(rv1.ip, 9080));
    assert_eq!(recs.len(), 1, "one connection through ztunnel: {recs:?}");
    assert_eq!(recs[0].listener, OUTBOUND);
    assert_eq!(recs[0].peer.ip(), pp.ip);
    // ztunnel connected to the pod with the client's address, and the pod saw the client.
    assert_eq!(
        recs[0].upstream.map(|(to, from)| (to, from.ip())),
        Some((sa(rv1.ip, 9080), pp.ip.into()))
    );
    assert_eq!(reply.server, "reviews-v1");
    assert_eq!(reply.peer.ip(), pp.ip);
    assert_eq!(server.seen().len(), 1);
    if mode != "iptables" {
        assert!(lab.agent2().counter("outbound", "redirected")? > 0);
        assert!(
            lab.agent2()
                .counter("ztunnel_tproxy", "assigned_listener")?
                >= 1
        );
    } else {
        // The article's path, by the rules' own packet counters: marked 0x100 on the node,
        // tproxied from pistioout in ztunnel's netns, the reply steered back by 0x40 / 0x4d3.
        let (node, zt) = (&lab.w2().ns, &lab.w2().ztunnel.ns);
        for (ns, rule) in [
            (
                node,
                "--match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100",
            ),
            (
                node,
                "-m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40",
            ),
            (zt, "-i pistioout -p tcp -j TPROXY --on-port 15001"),
            (zt, "-j MARK --set-xmark 0x4d3/0xfff"),
        ] {
            assert!(
                fallback::rule_packets(ns, rule)? > 0,
                "no packet hit {rule}"
            );
        }
    }
    Ok(())
}

pub fn service_vip_reaches_ztunnel_before_any_dnat(mode: &str) -> anyhow::Result<()> {
    let vip = sa(Ipv4Addr::new(10, 96, 0, 10), 9080);
    let lab = Lab::start_mode(mode, vec![(vip, sa(Ipv4Addr::new(10, 244, 2, 7), 9080))])?;
    let (w2, pp, rv1) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
    );
    // kube-proxy's DNAT for the Service, in the node's netns: it must never see captured packets.
    w2.ns.cmd(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "10.96.0.10/32",
            "-p",
            "tcp",
            "--dport",
            "9080",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{}:9080", rv1.ip),
        ],
    )?;
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;

    let reply = request(&pp.ns, vip)?;

    let recs = lab.z2().to(vip);
    assert_eq!(
        recs.len(),
        1,
        "ztunnel saw the VIP as original destination: {:?}",
        lab.z2().records()
    );
    assert_eq!(recs[0].listener, OUTBOUND);
    assert_eq!(reply.server, "reviews-v1");
    assert_eq!(reply.peer.ip(), pp.ip);
    Ok(())
}

pub fn inbound_from_a_non_ambient_pod_lands_on_15006_and_port_15008_on_15008(
    mode: &str,
) -> anyhow::Result<()> {
    let lab = Lab::start_mode(mode, vec![])?;
    let (sleep, rv1) = (lab.w2().pod("sleep"), lab.w2().pod("reviews-v1"));
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;

    let reply = request(&sleep.ns, sa(rv1.ip, 9080))?;
    let recs = lab.z2().to(sa(rv1.ip, 9080));
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].listener, INBOUND);
    assert_eq!(recs[0].peer.ip(), sleep.ip);
    assert_eq!(reply.peer.ip(), sleep.ip, "the pod sees the real client");

    // Plain traffic to :15008 is HBONE's port: it goes to ztunnel's :15008 listener.
    let conn = connect(&sleep.ns, sa(rv1.ip, HBONE), Duration::from_secs(3))?;
    std::io::Write::write_all(&mut &conn, b"GET / HTTP/1.1\n")?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut &conn, &mut answer)?;
    assert!(answer.contains("HBONE header required"), "{answer:?}");
    let recs = lab.z2().to(sa(rv1.ip, HBONE));
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].listener, HBONE);
    Ok(())
}

pub fn cross_node_goes_ztunnel_to_ztunnel_and_the_server_sees_the_client_pod(
    mode: &str,
) -> anyhow::Result<()> {
    let lab = Lab::start_mode(mode, vec![])?;
    let pp = lab.w2().pod("productpage-v1");
    let details = lab.w1().pod("details-v1");
    let _server = TcpServer::start(&details.ns, "details-v1", 9080)?;

    let reply = request(&pp.ns, sa(details.ip, 9080))?;

    let out = lab.z2().to(sa(details.ip, 9080));
    assert_eq!(
        out.len(),
        1,
        "source node's ztunnel: {:?}",
        lab.z2().records()
    );
    assert_eq!(out[0].listener, OUTBOUND);
    assert_eq!(
        out[0].upstream.map(|(to, from)| (to, from.ip())),
        Some((sa(details.ip, HBONE), lab.w2().ztunnel.ip.into())),
        "tunnelled to the pod's :15008"
    );
    let inn = lab.z1().to(sa(details.ip, HBONE));
    assert_eq!(
        inn.len(),
        1,
        "destination node's ztunnel: {:?}",
        lab.z1().records()
    );
    assert_eq!(inn[0].listener, HBONE);
    assert_eq!(inn[0].peer.ip(), lab.w2().ztunnel.ip);
    assert_eq!(
        inn[0].hbone.map(|(src, dst)| (src.ip(), dst)),
        Some((pp.ip.into(), sa(details.ip, 9080)))
    );
    assert_eq!(reply.server, "details-v1");
    assert_eq!(
        reply.peer.ip(),
        pp.ip,
        "the server sees the client pod's address"
    );
    Ok(())
}

pub fn non_ambient_node_and_udp_traffic_is_not_captured(mode: &str) -> anyhow::Result<()> {
    let lab = Lab::start_mode(mode, vec![])?;
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
    assert!(
        lab.z2().records().is_empty(),
        "nothing went through ztunnel: {:?}",
        lab.z2().records()
    );
    assert!(lab.z1().records().is_empty(), "{:?}", lab.z1().records());
    Ok(())
}

pub fn without_a_ztunnel_ambient_traffic_is_dropped_not_delivered(
    mode: &str,
) -> anyhow::Result<()> {
    let lab = Lab::start_mode(mode, vec![])?;
    let (w2, pp, rv1, sleep) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("sleep"),
    );
    let server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let agent = &lab.agents[0];
    agent.describe(&w2.pods_file(false))?;
    lab.wait_ready(w2, false)?;
    if mode != "iptables" {
        assert!(agent.status()?["ztunnel"].is_null());
    }

    for client in [pp, sleep] {
        let r = request_timeout(&client.ns, sa(rv1.ip, 9080), Duration::from_millis(700));
        assert!(
            r.is_err(),
            "{} reached the ambient pod without ztunnel: {r:?}",
            client.name
        );
    }
    assert!(
        server.seen().is_empty(),
        "the server never saw a connection: {:?}",
        server.seen()
    );
    if mode != "iptables" {
        assert!(agent.counter("outbound", "dropped_no_ztunnel")? > 0);
        assert!(agent.counter("inbound", "dropped_no_ztunnel")? > 0);
    }
    Ok(())
}

pub fn sigkilled_agent_restarts_without_failing_a_connection(mode: &str) -> anyhow::Result<()> {
    let mut lab = Lab::start_mode(mode, vec![])?;
    let (pp, rv1) = (lab.w2().pod("productpage-v1"), lab.w2().pod("reviews-v1"));
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let dst = sa(rv1.ip, 9080);
    // A stream of connections from productpage while the agent is killed and restarted.
    let stream = RequestStream::start(&pp.ns, dst)?;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        lab.agents[0].restart()?; // SIGKILL, then start again
    }
    lab.wait_ready(lab.w2(), true)?;
    std::thread::sleep(Duration::from_millis(300));
    let results = stream.stop();
    super::assert_none_failed(&results, 20);
    assert_eq!(
        lab.z2().to(dst).len(),
        results.len(),
        "every one went through ztunnel"
    );
    Ok(())
}

pub fn ping_to_and_from_ambient_pods_works(mode: &str) -> anyhow::Result<()> {
    let lab = Lab::start_mode(mode, vec![])?;
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
            "{mode}: ping {from} → {to}: {out:?}"
        );
    }
    assert!(lab.z2().records().is_empty(), "ICMP is not proxied");
    Ok(())
}

/// SYN retransmissions the TCP stack of `ns` counted so far (`TcpExt: TCPSynRetrans`).
pub fn syn_retransmits(ns: &zdivert_tests::ns::Netns) -> anyhow::Result<u64> {
    ns.net_counter("netstat", "TcpExt", "TCPSynRetrans")
}

/// 16 parallel clients, each opening short connections (connect, one exchange, close) through
/// ztunnel. Returns (connections, failures, SYN retransmissions in the clients and ztunnel).
pub fn churn(lab: &Lab, per_client: usize) -> anyhow::Result<(usize, usize, u64)> {
    let w2 = lab.w2();
    let rv1 = w2.pod("reviews-v1");
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let clients = ["productpage-v1", "reviews-v2", "reviews-v3", "ratings-v1"];
    let counted = |lab: &Lab| -> anyhow::Result<u64> {
        let mut n = syn_retransmits(&lab.w2().ztunnel.ns)?;
        for c in clients {
            n += syn_retransmits(&lab.w2().pod(c).ns)?;
        }
        Ok(n)
    };
    let before = counted(lab)?;
    let dst = sa(rv1.ip, 9080);
    let mut threads = Vec::new();
    for i in 0..16 {
        let ns = zdivert_tests::ns::Netns::attach(&w2.pod(clients[i % clients.len()]).ns.path())?;
        threads.push(std::thread::spawn(move || {
            (0..per_client)
                .filter(|_| request(&ns, dst).is_err())
                .count()
        }));
    }
    let failed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    Ok((16 * per_client, failed, counted(lab)? - before))
}
