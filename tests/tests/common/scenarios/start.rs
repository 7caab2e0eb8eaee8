//! The pod start window: a pod whose veth appears while the agent runs, serving and sending from
//! the moment it can, before the agent can know which pod it is.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use super::super::{Lab, Mode};
use zdivert_tests::{
    SET_UP_WITHIN,
    apps::{RequestStream, TcpServer, request, sa},
    eventually,
    topology::v6_of,
    ztunnel::{LaterPod, MeshConfig, Policy},
};

/// A new ambient pod is held from the moment its veth exists until the agent captures it:
/// - inbound: a DENY policy on its server holds throughout, for a client on the same node and
///   one on the other node (without the hold, both reach it directly until capture);
/// - outbound: every connection it makes to a pod outside the mesh went through ztunnel;
/// - a new pod outside the mesh is held too, then released when it is known, and talks directly.
pub fn a_new_pods_tcp_is_held_until_it_is_captured(mode: Mode) -> anyhow::Result<()> {
    let newcomer_ip = Ipv4Addr::new(10, 244, 2, 60);
    let outsider_ip = Ipv4Addr::new(10, 244, 2, 61);
    let lab = Lab::real(mode, |topo| {
        let later = |name: &str, ip, ambient| LaterPod {
            node: topo.worker2().name.clone(),
            name: name.into(),
            namespace: "default".into(),
            ip,
            ambient,
        };
        MeshConfig {
            policies: vec![Policy {
                name: "deny-ratings-v9-9080".into(),
                namespace: "default".into(),
                deny: true,
                destination_ips: vec![newcomer_ip.into(), v6_of(newcomer_ip).into()],
                destination_ports: vec![9080],
            }],
            later: vec![
                later("ratings-v9", newcomer_ip, true),
                later("batch-job", outsider_ip, false),
            ],
            ..Default::default()
        }
    })?;
    let (w2, agent) = (lab.w2(), lab.agent2());
    let (sleep, curl) = (w2.pod("sleep"), lab.w1().pod("curl"));
    let newcomer = w2.start_pod("ratings-v9", "default", newcomer_ip, true)?;
    let outsider = w2.start_pod("batch-job", "default", outsider_ip, false)?;
    // The pod serves and sends before its veth exists (nothing reaches it, nothing leaves).
    let server = TcpServer::start(&newcomer.ns, "ratings-v9", 9080)?;
    let legacy = TcpServer::start(&sleep.ns, "sleep", 9090)?;
    let short = Duration::from_millis(200);
    let knocks = [
        RequestStream::start_timeout(&sleep.ns, sa(newcomer.ip, 9080), short)?,
        RequestStream::start_timeout(&curl.ns, sa(newcomer.ip, 9080), short)?,
    ];
    let outbound = RequestStream::start_timeout(&newcomer.ns, sa(sleep.ip, 9090), short)?;
    w2.plug_pod(&newcomer)?;
    w2.plug_pod(&outsider)?;
    // The waits are polls for the agent's work: what must not happen meanwhile (a knock
    // served, the outsider let through) is asserted on its own.
    eventually("both new veths held", SET_UP_WITHIN, || {
        Ok(agent.metric("zdivert_links_held")? == 2.0)
    })?;
    // The API tells the agent about the pods later: SYNs knock all the while.
    for stream in knocks.iter().chain([&outbound]) {
        stream.wait_more(3)?;
    }
    let held_outsider = request(&outsider.ns, sa(sleep.ip, 9090));
    assert!(
        held_outsider.is_err(),
        "a held veth let TCP through: {held_outsider:?}"
    );
    agent.describe(&w2.pods_file_with(&[&newcomer, &outsider]))?;
    eventually("both veths classified", SET_UP_WITHIN, || {
        Ok(agent.metric("zdivert_links_held")? == 0.0)
    })?;
    // Captured from here on: the knocks reach ztunnel, which denies them.
    lab.zt2().wait_access(2, |a| {
        a.dst().is_some_and(|d| d.ip() == IpAddr::from(newcomer.ip))
            && a.direction() == "inbound"
            && a.denied()
    })?;
    eventually("the captured pod gets out", SET_UP_WITHIN, || {
        Ok(legacy
            .seen()
            .iter()
            .any(|p| p.ip() == IpAddr::from(newcomer.ip)))
    })?;
    let knocked: Vec<_> = knocks.into_iter().flat_map(RequestStream::stop).collect();
    let sent = outbound.stop();

    assert!(
        server.seen().is_empty(),
        "the new pod was reached around ztunnel: {:?}",
        server.seen()
    );
    assert!(
        knocked.len() >= 10 && knocked.iter().all(Result::is_err),
        "DENY did not hold on every knock: {knocked:?}"
    );
    // Every connection the legacy pod took from the new one, ztunnel made.
    let from_newcomer = |ip: IpAddr| ip == IpAddr::from(newcomer.ip);
    let reached = legacy
        .seen()
        .into_iter()
        .filter(|p| from_newcomer(p.ip()))
        .count();
    assert!(
        reached > 0,
        "the new pod never got out once captured: {sent:?}"
    );
    lab.zt2().wait_access(reached, |a| {
        a.direction() == "outbound"
            && a.src_ip().is_some_and(from_newcomer)
            && a.dst() == Some(sa(sleep.ip, 9090))
    })?;
    let proxied = lab
        .zt2()
        .access_log()
        .into_iter()
        .filter(|a| a.direction() == "outbound" && a.src_ip().is_some_and(from_newcomer))
        .count();
    assert_eq!(
        proxied, reached,
        "connections from the new pod that ztunnel did not make reached the legacy pod"
    );
    // The outsider, released, talks directly (the server sees its own address).
    let reply = request(&outsider.ns, sa(sleep.ip, 9090))?;
    assert_eq!(reply.peer.ip(), IpAddr::from(outsider.ip));
    // What stopped the early SYNs was the hold.
    if mode.is_ebpf() {
        let dropped = agent.counter("hold", "dropped_unclassified")?;
        assert!(dropped > 0, "the hold dropped nothing");
    }
    Ok(())
}
