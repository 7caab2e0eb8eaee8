//! The iptables fallback against the article: every line it shows is in the kernel after apply
//! (golden), applying again changes nothing, pods come and go under load, cleanup and mode
//! switches leave nothing behind, and geneve is used where the kernel has it.
mod common;

use std::time::Duration;

use anyhow::Context as _;

use common::{Lab, Mode, scenarios::from_to};
use zdivert_tests::{
    agent::Agent,
    apps::{RequestStream, TcpServer, request, sa},
    fallback::{self, Dump, missing, sysctl_lines},
    snapshot::{assert_same, clsact_filters, pins, snapshot, sysctls, tables, tcx_programs},
    topology::{Node, Topology},
    ztunnel::{MeshConfig, Ztunnel},
};

#[test]
fn every_line_the_article_shows_is_there_and_applying_again_changes_nothing() -> anyhow::Result<()>
{
    let topo = Topology::article()?;
    let node = topo.worker2();
    // kube-proxy was there first: our nat jump must still come before its Service DNAT.
    node.ns
        .cmd("iptables", &["-t", "nat", "-N", "KUBE-SERVICES"])?;
    node.ns.cmd(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
    )?;
    // vxlan, named: `auto` takes geneve where the kernel has it (`geneve_tunnels_where_…`
    // checks those lines), and this test must check the same lines on every kernel.
    let mut agent = Agent::start_with(
        node,
        &node.pods_file(true),
        Mode::Iptables,
        &["--tunnel", "vxlan"],
    )?;
    fallback::wait_layout(node, 5, true)?;
    fallback::assert_article_lines(node, "vxlan")?;
    let nat = node.ns.cmd("iptables-save", &["-t", "nat"])?;
    let ours = nat.find("-A PREROUTING -j ztunnel-PREROUTING").unwrap();
    let kube = nat.find("-A PREROUTING -m comment").unwrap();
    assert!(ours < kube, "our jump precedes KUBE-SERVICES:\n{nat}");
    let (sys_node, sys_zt) = sysctl_lines(node);
    let (have_node, have_zt) = (sysctls(&node.ns)?, sysctls(&node.ztunnel.ns)?);
    assert_eq!(missing(&have_node, &sys_node), Vec::<String>::new());
    assert_eq!(missing(&have_zt, &sys_zt), Vec::<String>::new());

    // `zdivert status` shows the fallback: why, the sets, every rule of the layout present.
    let st = agent.status()?;
    assert_eq!(st["mode"], "iptables", "{st}");
    assert_eq!(st["chosen_because"], "--mode iptables");
    assert_eq!(st["missing_rules"], 0, "{st}");
    let rules = st["rules"].as_array().map_or(0, Vec::len);
    assert!(rules > 20, "only {rules} rules recorded: {st}");
    let pods_set = st["ipsets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "ztunnel-pods-ips")
        .and_then(|s| s["members"].as_array())
        .map_or(0, Vec::len);
    assert_eq!(pods_set, 5, "{st}");
    assert!(
        st["tunnel_links"]
            .as_array()
            .is_some_and(|l| l.len() == 4 && l.iter().all(|l| l["present"] == true)),
        "{st}"
    );
    assert_eq!(
        st["ztunnel_netns"][0]
            .as_str()
            .map(std::path::PathBuf::from),
        Some(node.ztunnel.ns.path())
    );
    // A rule taken away shows as missing until an apply puts it back. Without ztunnel the
    // agent applies every 2 s, and under emulation taking the rule away and reading the status
    // take longer: the agent is stopped (SIGSTOP) meanwhile, so no apply comes between.
    let pid = agent.pid().context("the agent's pid")? as i32;
    // SAFETY: signals to our own child; SIGCONT follows before anything can fail.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let taken = node.ns.cmd(
        "iptables",
        &[
            "-t",
            "mangle",
            "-D",
            "ztunnel-PREROUTING",
            "-p",
            "udp",
            "-j",
            "MARK",
            "--set-xmark",
            "0x220/0x220",
        ],
    );
    let st = agent.status();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    taken?;
    let st = st?;
    assert_eq!(st["missing_rules"], 1, "{st}");
    agent.wait_reconciles(agent.metric("zdivert_reconciles_total")? as u64 + 2)?;
    assert_eq!(
        agent.status()?["missing_rules"],
        0,
        "the next apply puts it back"
    );

    // A restarted agent applies the same state: nothing changes, not even an interface index.
    let before = (snapshot(&node.ns)?, snapshot(&node.ztunnel.ns)?);
    agent.restart()?;
    // ztunnel is not running here, so the agent looks again every 2 s: two applies, not one.
    agent.wait_reconciles(2)?;
    fallback::wait_layout(node, 5, true)?;
    assert_same(&before.0, &snapshot(&node.ns)?, "the node");
    assert_same(&before.1, &snapshot(&node.ztunnel.ns)?, "ztunnel's netns");
    Ok(())
}

#[test]
fn pods_join_and_leave_while_connections_run() -> anyhow::Result<()> {
    let lab = Lab::real(Mode::Iptables, |_| MeshConfig::default())?;
    let (w2, pp, rv1, rv2) = (
        lab.w2(),
        lab.w2().pod("productpage-v1"),
        lab.w2().pod("reviews-v1"),
        lab.w2().pod("reviews-v2"),
    );
    let _s1 = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let _s2 = TcpServer::start(&rv2.ns, "reviews-v2", 9080)?;
    let stream = RequestStream::start(&pp.ns, sa(rv1.ip, 9080))?;
    let agent = &lab.agents[0];
    let table100 = |n: &Node| n.ns.ip("route show table 100");
    let pp_route = table100(w2)?
        .lines()
        .find(|l| l.starts_with(&format!("{} ", pp.ip)))
        .map(str::to_string);

    // reviews-v2 leaves ambient: one ipset entry and one route go, nothing else changes.
    let without_v2 = w2.pods_file_without(true, &["reviews-v2"]);
    assert_ne!(without_v2, w2.pods_file(true));
    agent.describe(&without_v2)?;
    fallback::wait_layout(w2, 4, true)?;
    assert!(!fallback::ipset_members(w2).contains(&rv2.ip.to_string()));
    let sleep = w2.pod("sleep");
    let dst = sa(rv2.ip, 9080);
    let via_ztunnel = || {
        let log = lab.zt2().access_log();
        log.iter()
            .filter(|a| from_to(sleep, dst, "inbound")(a))
            .count()
    };
    let r = request(&sleep.ns, dst)?;
    assert_eq!(r.server, "reviews-v2");
    // A captured connection after it: once ztunnel logged that one, it would have logged this.
    request(&sleep.ns, sa(rv1.ip, 9080))?;
    lab.zt2()
        .wait_access(1, from_to(sleep, sa(rv1.ip, 9080), "inbound"))?;
    assert_eq!(via_ztunnel(), 0, "sleep → reviews-v2 is no longer captured");

    // ...and joins again.
    agent.describe(&w2.pods_file(true))?;
    fallback::wait_layout(w2, 5, true)?;
    request(&sleep.ns, dst)?;
    lab.zt2().wait_access(1, from_to(sleep, dst, "inbound"))?;

    let results = stream.stop();
    common::assert_none_failed(&results, 10);
    lab.zt2()
        .wait_access(results.len(), from_to(pp, sa(rv1.ip, 9080), "inbound"))?;
    let pp_after = table100(w2)?
        .lines()
        .find(|l| l.starts_with(&format!("{} ", pp.ip)))
        .map(str::to_string);
    assert_eq!(pp_route, pp_after, "other pods' routes untouched");
    Ok(())
}

/// Whether nothing of the fallback is in `node`'s two namespaces.
fn no_fallback_residue(node: &Node) -> anyhow::Result<()> {
    let d = Dump::take(node)?;
    for needle in [
        "ztunnel-",
        "istioin",
        "istioout",
        "fwmark 0x100",
        "lookup 100\n",
        "Name:",
    ] {
        assert!(
            !d.node.contains(needle),
            "{needle} left on the node:\n{}",
            d.node
        );
    }
    // (The eBPF mode has its own rule 20000 and local route in ztunnel's netns.)
    for needle in ["pistio", "0x4d3", "TPROXY"] {
        assert!(
            !d.ztunnel.contains(needle),
            "{needle} left in ztunnel's netns:\n{}",
            d.ztunnel
        );
    }
    Ok(())
}

fn no_ebpf_residue(node: &Node, agent: &Agent) -> anyhow::Result<()> {
    for ns in [&node.ns, &node.ztunnel.ns] {
        let attached = tcx_programs(ns)? + &clsact_filters(ns)?;
        assert!(
            !attached.contains("zd_"),
            "programs left attached:\n{attached}"
        );
    }
    // (Rule 20000 in ztunnel's netns stays: the fallback's layout has the same one.)
    assert_eq!(pins(&agent.node), Vec::<String>::new());
    Ok(())
}

#[test]
fn switching_ebpf_to_iptables_to_ebpf_leaves_no_residue() -> anyhow::Result<()> {
    let mut lab = Lab::real(Mode::Ebpf, |_| MeshConfig::default())?;
    let node_sysctls = sysctls(&lab.w2().ns)?;
    let zt_sysctls = sysctls(&lab.w2().ztunnel.ns)?;
    let check_traffic = |lab: &Lab| -> anyhow::Result<()> {
        let (pp, rv1) = (lab.w2().pod("productpage-v1"), lab.w2().pod("reviews-v1"));
        let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
        let dst = sa(rv1.ip, 9080);
        let before = lab.zt2().access_log().len();
        let r = request(&pp.ns, dst)?;
        assert_eq!(r.peer.ip(), pp.ip);
        lab.zt2()
            .wait_access(1, |a| from_to(pp, dst, "inbound")(a) && a.error().is_none())?;
        lab.zt2().wait_access(before + 2, |_| true)?;
        // Full-size segments on the HBONE connection ztunnel pooled under the previous mode:
        // the fallback's smaller tunnels must tell ztunnel's socket, not the pod.
        let _sink = zdivert_tests::load::Server::start(&rv1.ns, 7000)?;
        let bulk = zdivert_tests::load::bulk(
            &pp.ns.path(),
            sa(rv1.ip, 7000),
            1,
            std::time::Duration::from_millis(500),
        );
        assert!(bulk.is_ok(), "bulk on a pooled HBONE connection: {bulk:?}");
        Ok(())
    };
    check_traffic(&lab)?;

    lab.agents[0].restart_in(Mode::Iptables)?;
    lab.wait_ready(lab.w2(), true)?;
    no_ebpf_residue(lab.w2(), &lab.agents[0])?;
    check_traffic(&lab)?;

    lab.agents[0].restart_in(Mode::Ebpf)?;
    lab.wait_ready(lab.w2(), true)?;
    no_fallback_residue(lab.w2())?;
    assert_eq!(sysctls(&lab.w2().ns)?, node_sysctls, "sysctls restored");
    assert_eq!(sysctls(&lab.w2().ztunnel.ns)?, zt_sysctls);
    check_traffic(&lab)?;
    Ok(())
}

#[test]
fn cleanup_after_sigkill_restores_everything_including_sysctls() -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    // Values the fallback must change, and put back.
    node.ns.sysctl("net.ipv4.conf.all.rp_filter", "2")?;
    node.ns.sysctl(
        &format!(
            "net.ipv4.conf.{}.rp_filter",
            node.pod("reviews-v1").host_veth
        ),
        "1",
    )?;
    node.ztunnel
        .ns
        .sysctl("net.ipv4.conf.eth0.rp_filter", "1")?;
    let before = (snapshot(&node.ns)?, snapshot(&node.ztunnel.ns)?);
    let tables_before = tables(&node.ns)?;
    let ztunnel_tables_before = tables(&node.ztunnel.ns)?;

    let mut agent = Agent::start_mode(node, &node.pods_file(true), Mode::Iptables)?;
    fallback::wait_layout(node, 5, true)?;
    assert_ne!(snapshot(&node.ns)?, before.0);
    assert_ne!(
        tables(&node.ns)?,
        tables_before,
        "the fallback's tables exist"
    );
    agent.kill();
    let out = agent.cleanup()?;
    assert!(out.contains("removed the iptables layout"), "{out}");
    // The snapshot counts an empty table as absent; the tables the fallback made are gone.
    assert_eq!(tables(&node.ns)?, tables_before, "tables left behind");
    assert_eq!(
        tables(&node.ztunnel.ns)?,
        ztunnel_tables_before,
        "tables left behind in ztunnel's netns"
    );
    assert_same(&before.0, &snapshot(&node.ns)?, "the node");
    assert_same(&before.1, &snapshot(&node.ztunnel.ns)?, "ztunnel's netns");
    Ok(())
}

#[test]
#[ignore = "this machine's kernel has no geneve (CONFIG_GENEVE unset): vxlan carries the other \
            tests; run with --ignored on a kernel that has it"]
fn geneve_tunnels_where_the_kernel_has_geneve() -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let _z = Ztunnel::start(&topo, node, &MeshConfig::default())?;
    let _agent = Agent::start_with(
        node,
        &node.pods_file(true),
        Mode::Iptables,
        &["--tunnel", "geneve"],
    )?;
    fallback::wait_layout(node, 5, true)?;
    fallback::assert_article_lines(node, "geneve")?;
    let (pp, rv1) = (node.pod("productpage-v1"), node.pod("reviews-v1"));
    let _server = TcpServer::start(&rv1.ns, "reviews-v1", 9080)?;
    let reply = request(&pp.ns, sa(rv1.ip, 9080))?;
    assert_eq!(reply.peer.ip(), pp.ip);
    _z.wait_access(1, from_to(pp, sa(rv1.ip, 9080), "inbound"))?;
    Ok(())
}

fn auto_choice(node: &Node, extra: &[&str], run_extra: &[&str]) -> anyhow::Result<String> {
    let pods = std::env::temp_dir().join(format!("{}-auto.yaml", node.name));
    std::fs::write(&pods, node.pods_file(true))?;
    let mut child = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path().display()))
        .arg(zdivert_tests::agent::zdivert_bin())
        .args(extra)
        .args(["--node", &node.name, "run", "--mode", "auto", "--pods-file"])
        .arg(&pods)
        .args(run_extra)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Its log up to the line that says which dataplane it set up.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            log += &line;
            log.push('\n');
            if line.contains("dataplane for node") {
                let _ = tx.send(());
            }
        }
        log
    });
    let chosen = rx.recv_timeout(Duration::from_secs(20));
    child.kill()?;
    child.wait()?;
    let log = reader.join().expect("log reader");
    anyhow::ensure!(chosen.is_ok(), "no dataplane set up within 20 s:\n{log}");
    let _ = std::fs::remove_file(&pods);
    let cleanup = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path().display()))
        .arg(zdivert_tests::agent::zdivert_bin())
        .args(extra)
        .args(["--node", &node.name, "cleanup"])
        .output()?;
    anyhow::ensure!(cleanup.status.success(), "cleanup failed");
    Ok(log)
}

#[test]
fn auto_mode_picks_ebpf_where_it_runs_and_says_why_it_falls_back() -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let log = auto_choice(node, &[], &[])?;
    assert!(log.contains("mode auto: eBPF"), "{log}");
    // By default, TCX where the kernel has it (6.6+), tc clsact before.
    let default = zdivert::dataplane::ebpf::attach::AttachMode::for_kernel();
    assert!(
        log.contains("ebpf dataplane for node")
            && log.contains(&format!("attached through {default}")),
        "{log}"
    );
    // The probe attaches the way the agent will.
    let log = auto_choice(node, &[], &["--attach", "netlink"])?;
    assert!(
        log.contains("mode auto: eBPF (programs load, tc clsact attaches"),
        "{log}"
    );
    assert!(log.contains("attached through tc clsact"), "{log}");

    // No bpffs where the agent is told to pin: the programs cannot be kept, so: the fallback.
    let not_bpffs = std::env::temp_dir().join(format!("{}-nobpffs", node.name));
    std::fs::create_dir_all(&not_bpffs)?;
    let log = auto_choice(node, &["--bpffs", not_bpffs.to_str().unwrap()], &[])?;
    std::fs::remove_dir_all(&not_bpffs)?;
    assert!(
        log.contains("mode auto: iptables fallback, because") && log.contains("not a bpffs mount"),
        "{log}"
    );
    assert!(log.contains("iptables dataplane for node"), "{log}");
    Ok(())
}
