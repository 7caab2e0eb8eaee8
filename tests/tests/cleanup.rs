//! `zdivert cleanup` leaves both namespaces of a node and bpffs exactly as they were, even after
//! the agent was SIGKILLed (so it had no chance to clean up itself).
mod common;

use aya::programs::{SchedClassifier, TcAttachType};
use zdivert_tests::{
    agent::{Agent, zdivert_bin},
    ns::{Netns, run},
    topology::Topology,
};

/// What zdivert could have changed in a netns: links, TCX/clsact attachments, rules, routes.
fn snapshot(ns: &Netns) -> anyhow::Result<String> {
    let mut s = String::new();
    for args in [
        "-d link show",
        "rule show",
        "-6 rule show",
        "route show table all",
        "-6 route show table all",
    ] {
        s += &format!("## ip {args}\n{}", ns.ip(args)?);
    }
    s += &format!("## tcx\n{}", tcx_programs(ns)?);
    Ok(s)
}

/// The programs attached through TCX to every interface of `ns`, as the kernel reports them
/// (this bpftool predates TCX and shows nothing).
fn tcx_programs(ns: &Netns) -> anyhow::Result<String> {
    let links = ns.ip("-o link show")?;
    let names: Vec<String> = links
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_string())
        })
        .collect();
    ns.exec(move || -> anyhow::Result<String> {
        let mut out = String::new();
        for name in names {
            for (dir, ty) in [
                ("ingress", TcAttachType::Ingress),
                ("egress", TcAttachType::Egress),
            ] {
                let (_, progs) = SchedClassifier::query_tcx(&name, ty)?;
                let progs: Vec<String> = progs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_string())
                    .collect();
                out += &format!("{name} {dir}: {}\n", progs.join(" "));
            }
        }
        Ok(out)
    })
}

fn pins(node: &str) -> Vec<String> {
    let root = std::path::Path::new("/sys/fs/bpf/zdivert/v1").join(node);
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            out.push(e.path().display().to_string());
            stack.push(e.path());
        }
    }
    out
}

#[test]
fn cleanup_after_sigkill_restores_both_namespaces_and_bpffs() -> anyhow::Result<()> {
    let topo = Topology::article()?;
    let node = topo.worker2();
    let before = (snapshot(&node.ns)?, snapshot(&node.ztunnel.ns)?);

    let mut agent = Agent::start(node, &node.pods_file(true))?;
    let (a, l) = common::expected(node, true);
    agent.wait_ready(a, l)?;
    let during = (snapshot(&node.ns)?, snapshot(&node.ztunnel.ns)?);
    assert_ne!(
        during.0, before.0,
        "the agent attached programs on the node"
    );
    assert!(
        during.1.contains("20000:") && during.1.contains("fwmark 0x400/0xfff lookup 100"),
        "{}",
        during.1
    );
    assert!(
        during.1.contains("local default dev lo table 100"),
        "{}",
        during.1
    );
    assert_eq!(
        pins(&agent.node).len(),
        2 + 4 + l,
        "maps/, links/, 4 maps, {l} links"
    );

    agent.kill();
    // Pinned state survives the agent: still attached.
    assert_eq!(snapshot(&node.ns)?, during.0);
    let out = run(
        zdivert_bin().to_str().unwrap(),
        &["--node", &agent.node, "cleanup"],
    )?;
    assert!(
        out.contains(&format!(
            "removed {l} links, 4 maps, tproxy routing in 1 ztunnel netns"
        )),
        "{out}"
    );

    assert_eq!(snapshot(&node.ns)?, before.0);
    assert_eq!(snapshot(&node.ztunnel.ns)?, before.1);
    assert!(pins(&agent.node).is_empty(), "{:?}", pins(&agent.node));
    assert!(
        !std::path::Path::new("/sys/fs/bpf/zdivert/v1")
            .join(&agent.node)
            .exists()
    );
    Ok(())
}
