//! The eBPF dataplane attached through tc clsact filters (netlink), as on kernels without TCX
//! (the shared packet-path scenarios run in this mode from `paths.rs`): where the programs sit, adoption by a restarted agent, a
//! switch of mechanism under traffic, and pods leaving. This kernel has TCX, so the agent is told
//! `--attach netlink`; the kernel path is the one an older kernel takes.
mod common;

use common::{Lab, Mode, scenarios::from_to};
use zdivert_tests::{
    SET_UP_WITHIN,
    apps::{RequestStream, TcpServer, request, sa},
    eventually,
    ns::Netns,
    snapshot::{clsact_filters, tcx_programs},
    topology::Node,
    ztunnel::MeshConfig,
};

const MODE: Mode = Mode::EbpfClsact;

/// `(interface, direction, program, program id)` of our filters (priority 1, handle 0x7a64) in
/// `ns`, as `tc filter show` prints them.
fn our_filters(ns: &Netns) -> anyhow::Result<Vec<(String, String, String, u32)>> {
    let mut out = Vec::new();
    let text = clsact_filters(ns)?;
    let mut at = None;
    for line in text.lines() {
        if let Some(head) = line.strip_suffix(':')
            && let Some((ifname, dir)) = head.split_once(' ')
        {
            at = Some((ifname.to_string(), dir.to_string()));
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
        };
        if let (Some((ifname, dir)), Some(&"1"), Some(&"0x7a64"), Some(id)) =
            (&at, after("pref"), after("handle"), after("id"))
        {
            let prog = words
                .iter()
                .find(|w| w.starts_with("zd_"))
                .map_or("?".to_string(), |w| w.split(':').next().unwrap_or(w).into());
            out.push((ifname.clone(), dir.clone(), prog, id.parse()?));
        }
    }
    out.sort();
    Ok(out)
}

/// Every program where the article's node wants it, as one filter each, and nothing on TCX.
fn assert_placed(node: &Node) -> anyhow::Result<()> {
    let mut want: Vec<(String, String, String)> = vec![(
        node.ztunnel.host_veth.clone(),
        "ingress".into(),
        "zd_zt_return".into(),
    )];
    for p in node.pods.values().filter(|p| p.ambient) {
        want.push((p.host_veth.clone(), "ingress".into(), "zd_outbound".into()));
        want.push((p.host_veth.clone(), "egress".into(), "zd_inbound".into()));
    }
    want.sort();
    let have: Vec<_> = our_filters(&node.ns)?
        .into_iter()
        .map(|(i, d, p, _)| (i, d, p))
        .collect();
    assert_eq!(have, want, "filters on the node");
    let zt: Vec<_> = our_filters(&node.ztunnel.ns)?
        .into_iter()
        .map(|(i, d, p, _)| (i, d, p))
        .collect();
    assert_eq!(
        zt,
        vec![("eth0".into(), "ingress".into(), "zd_zt_tproxy".into())],
        "filters in ztunnel's netns"
    );
    for ns in [&node.ns, &node.ztunnel.ns] {
        let tcx = tcx_programs(ns)?;
        assert!(!tcx.contains("zd_"), "nothing through TCX:\n{tcx}");
    }
    Ok(())
}

#[test]
fn programs_sit_in_clsact_filters_and_a_restarted_agent_swaps_them_in_place() -> anyhow::Result<()>
{
    let mut lab = Lab::real(MODE, |_| MeshConfig::default())?;
    let w2 = lab.w2();
    assert_placed(w2)?;
    let links = lab.agent2().status()?["links"].clone();
    let links = links.as_array().cloned().unwrap_or_default();
    assert!(
        !links.is_empty()
            && links
                .iter()
                .all(|l| l.as_str().is_some_and(|s| s.ends_with("via tc clsact"))),
        "{links:?}"
    );
    let ids = |ns: &Netns| -> anyhow::Result<Vec<u32>> {
        Ok(our_filters(ns)?.into_iter().map(|f| f.3).collect())
    };
    let before = (ids(&w2.ns)?, ids(&w2.ztunnel.ns)?);

    // SIGKILL: the filters stay (nothing is detached on a crash), and the next agent replaces
    // each filter's program rather than adding a second filter.
    lab.agents[0].restart()?;
    let w2 = lab.w2();
    eventually(
        "every filter runs the new agent's program",
        SET_UP_WITHIN,
        || {
            let now = (ids(&w2.ns)?, ids(&w2.ztunnel.ns)?);
            Ok(now.0.len() == before.0.len()
                && now.0.iter().zip(&before.0).all(|(n, b)| n != b)
                && now.1.len() == 1
                && now.1 != before.1)
        },
    )?;
    assert_placed(w2)?;
    // Each record now holds the program its filter runs: the old programs are not kept alive.
    let pins = zdivert_tests::snapshot::pins(&lab.agents[0].node);
    let records: Vec<&String> = pins.iter().filter(|p| p.contains("/filters/")).collect();
    let (_, l) = common::expected(w2, true);
    assert_eq!(records.len(), l, "{pins:?}");
    let mut pinned_ids = std::collections::BTreeSet::new();
    for r in records {
        let out = zdivert_tests::ns::run("bpftool", &["-j", "prog", "show", "pinned", r])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        pinned_ids.insert(v["id"].as_u64().unwrap_or(0) as u32);
    }
    let attached_ids: std::collections::BTreeSet<u32> = ids(&w2.ns)?
        .into_iter()
        .chain(ids(&w2.ztunnel.ns)?)
        .collect();
    assert_eq!(pinned_ids, attached_ids);

    let (pp, rv1) = (w2.pod("productpage-v1"), w2.pod("reviews-v1"));
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let r = request(&pp.ns, sa(rv1.ip, 9080))?;
    assert_eq!(r.peer.ip(), pp.ip);
    lab.zt2()
        .wait_access(1, from_to(pp, sa(rv1.ip, 9080), "inbound"))?;
    Ok(())
}

/// TCX → clsact → TCX with connections running: each switch puts the new attachments in place
/// before it removes the old, so no connection gets past ztunnel or fails.
#[test]
fn switching_between_tcx_and_clsact_under_traffic_fails_no_connection() -> anyhow::Result<()> {
    let mut lab = Lab::real(Mode::Ebpf, |_| MeshConfig::default())?;
    let w2 = lab.topo.worker2();
    let (pp, rv1) = (w2.pod("productpage-v1"), w2.pod("reviews-v1"));
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let dst = sa(rv1.ip, 9080);
    let stream = RequestStream::start(&pp.ns, dst)?;
    let (_, l) = common::expected(w2, true);
    let only_via = |lab: &Lab, mechanism: &str| -> anyhow::Result<bool> {
        let st = lab.agent2().status()?;
        let links: Vec<String> = st["links"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str().map(str::to_string))
            .collect();
        Ok(links.len() == l && links.iter().all(|s| s.ends_with(mechanism)))
    };

    stream.wait_more(10)?;
    lab.agents[0].restart_in(MODE)?;
    eventually("all attachments via tc clsact", SET_UP_WITHIN, || {
        only_via(&lab, "via tc clsact")
    })?;
    assert_placed(w2)?;
    stream.wait_more(10)?;

    lab.agents[0].restart_in(Mode::Ebpf)?;
    eventually("all attachments via tcx", SET_UP_WITHIN, || {
        only_via(&lab, "via tcx")
    })?;
    for ns in [&w2.ns, &w2.ztunnel.ns] {
        let tc = clsact_filters(ns)?;
        assert!(
            !tc.contains("zd_") && !tc.contains("clsact"),
            "filters and their clsact qdiscs are gone:\n{tc}"
        );
    }
    stream.wait_more(10)?;

    let results = stream.stop();
    common::assert_none_failed(&results, 20);
    lab.zt2()
        .wait_access(results.len(), from_to(pp, dst, "inbound"))?;
    Ok(())
}

#[test]
fn a_pod_leaving_ambient_loses_its_filters_and_its_clsact_qdisc() -> anyhow::Result<()> {
    let lab = Lab::real(MODE, |_| MeshConfig::default())?;
    let (w2, rv2, sleep) = (lab.w2(), lab.w2().pod("reviews-v2"), lab.w2().pod("sleep"));
    let _server = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;
    let qdisc_on = |ifname: &str| -> anyhow::Result<bool> {
        Ok(w2
            .ns
            .cmd("tc", &["qdisc", "show", "dev", ifname])?
            .contains("clsact"))
    };
    assert!(qdisc_on(&rv2.host_veth)?);

    let without_v2 = w2.pods_file_without(true, &["reviews-v2"]);
    assert_ne!(without_v2, w2.pods_file(true));
    lab.agent2().describe(&without_v2)?;
    let (a, l) = common::expected(w2, true);
    lab.agent2().wait_ready((a - 1) * 2, l - 2)?;
    assert!(
        !our_filters(&w2.ns)?
            .iter()
            .any(|(i, ..)| *i == rv2.host_veth),
        "{:?}",
        our_filters(&w2.ns)?
    );
    assert!(
        !qdisc_on(&rv2.host_veth)?,
        "the clsact qdisc went with them"
    );
    let dst = sa(rv2.ip, 9080);
    request(&sleep.ns, dst)?;
    // A captured connection after it: once ztunnel logged that one, it would have logged this.
    let rv1 = w2.pod("reviews-v1");
    let _rv1_server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    request(&sleep.ns, sa(rv1.ip, 9080))?;
    lab.zt2()
        .wait_access(1, from_to(sleep, sa(rv1.ip, 9080), "inbound"))?;
    assert_eq!(
        lab.zt2()
            .access_log()
            .iter()
            .filter(|a| from_to(sleep, dst, "inbound")(a))
            .count(),
        0,
        "sleep → reviews-v2 is no longer captured"
    );

    lab.agent2().describe(&w2.pods_file(true))?;
    lab.agent2().wait_ready(a * 2, l)?;
    assert_placed(w2)?;
    request(&sleep.ns, dst)?;
    lab.zt2().wait_access(1, from_to(sleep, dst, "inbound"))?;
    Ok(())
}
