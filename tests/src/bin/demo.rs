//! `cargo xtask demo`: the article's nodes in network namespaces, zdivert and the real ztunnel on
//! each, bookinfo-like traffic, and what each ztunnel's access log says about every connection.
use std::{collections::HashMap, net::IpAddr, path::Path};

use anyhow::Result;
use zdivert_tests::{
    agent::{Agent, Mode, zdivert_bin},
    apps::{TcpServer, request, sa},
    ns::{Netns, run},
    topology::{Node, Topology},
    ztunnel::{MeshConfig, Policy, Ztunnel},
};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode: Mode = match args.iter().position(|a| a == "--mode") {
        Some(i) => args.get(i + 1).map_or("ebpf", String::as_str).parse()?,
        None => Mode::Ebpf,
    };
    let topo = Topology::article()?;
    println!(
        "== the article's nodes, rebuilt in network namespaces (prefix {}), {mode} dataplane",
        topo.prefix
    );
    let mut names: HashMap<IpAddr, String> = HashMap::new();
    for n in &topo.nodes {
        let pods: Vec<String> = n
            .pods
            .values()
            .map(|p| {
                format!(
                    "{} {}{}",
                    p.name,
                    p.ip,
                    if p.ambient { "" } else { " (not ambient)" }
                )
            })
            .collect();
        println!(
            "  {}: ztunnel {}, {}",
            n.article_name,
            n.ztunnel.ip,
            pods.join(", ")
        );
        names.insert(n.ztunnel.ip.into(), format!("ztunnel@{}", n.article_name));
        names.insert(n.gateway.into(), format!("node {}", n.article_name));
        for p in n.pods.values() {
            names.insert(p.ip.into(), p.name.clone());
        }
    }
    let name = |ip: IpAddr| names.get(&ip).cloned().unwrap_or_else(|| ip.to_string());

    // One policy, to show that ztunnel decides: nobody may reach ratings-v1 on :9080.
    let mesh = MeshConfig {
        policies: vec![Policy::deny_port(topo.worker2().pod("ratings-v1"), 9080)],
        ..Default::default()
    };
    println!("  policy: {} (ztunnel enforces it)", mesh.policies[0].name);
    let ztunnels: Vec<Ztunnel> = topo
        .nodes
        .iter()
        .map(|n| Ztunnel::start(&topo, n, &mesh))
        .collect::<Result<_>>()?;
    let mut agents = Vec::new();
    for n in &topo.nodes {
        agents.push(Agent::start_ready(n, mode, &[])?);
    }
    let (w2, w1) = (topo.worker2(), topo.worker());
    let mut servers = Vec::new();
    for n in &topo.nodes {
        for p in n.pods.values().filter(|p| p.name != "productpage-v1") {
            servers.push(TcpServer::start(&p.ns, &p.name, 9080)?);
        }
    }

    println!(
        "\n== traffic (each connection, then what the ztunnels' access logs recorded about it)"
    );
    let cases = [
        (
            &w2.pod("productpage-v1").ns,
            w2.pod("productpage-v1").ip,
            w2.pod("reviews-v1").ip,
            "same node, ambient → ambient",
        ),
        (
            &w2.pod("productpage-v1").ns,
            w2.pod("productpage-v1").ip,
            w1.pod("details-v1").ip,
            "cross node, ambient → ambient",
        ),
        (
            &w2.pod("reviews-v2").ns,
            w2.pod("reviews-v2").ip,
            w2.pod("ratings-v1").ip,
            "same node, ambient → ambient, denied by policy",
        ),
        (
            &w2.pod("sleep").ns,
            w2.pod("sleep").ip,
            w2.pod("reviews-v3").ip,
            "non-ambient → ambient (inbound)",
        ),
        (
            &w2.ns,
            w2.gateway,
            w2.pod("reviews-v1").ip,
            "node (kubelet probe) → ambient: not captured",
        ),
        (
            &w2.pod("sleep").ns,
            w2.pod("sleep").ip,
            w1.pod("curl").ip,
            "non-ambient → non-ambient: not captured",
        ),
    ];
    for (ns, src, dst, what) in cases {
        let seen_before: Vec<usize> = ztunnels.iter().map(|z| z.access_log().len()).collect();
        let dst = sa(dst, 9080);
        match request(ns, dst) {
            Ok(reply) => println!(
                "\n{} {src} → {dst}   [{what}]\n  answered by {} which saw the client as {}",
                name(src.into()),
                reply.server,
                reply.peer.ip()
            ),
            Err(e) => println!(
                "\n{} {src} → {dst}   [{what}]\n  FAILED: {e:#}",
                name(src.into())
            ),
        }
        // ztunnel logs a connection when it closes, a moment after the client has its answer.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut any = false;
        for ((z, n), before) in ztunnels.iter().zip(&topo.nodes).zip(seen_before) {
            for a in z.access_log().into_iter().skip(before) {
                any = true;
                println!(
                    "  ztunnel@{} {:<8} {} ({}) → {} at {}{}",
                    n.article_name,
                    a.direction(),
                    a.src_workload(),
                    a.src_identity(),
                    a.dst_workload(),
                    a.get("dst.addr").unwrap_or("?"),
                    a.error()
                        .map(|e| format!("  error: {e}"))
                        .unwrap_or_default()
                );
            }
        }
        if !any {
            println!("  (no ztunnel involved)");
        }
    }

    if mode == Mode::Iptables {
        article_rules(w2)?;
    } else {
        println!("\n== zdivert status on {}", w2.article_name);
        print!(
            "{}",
            run(
                zdivert_bin().to_str().unwrap(),
                &["--node", &agents[0].node, "status"]
            )?
        );
        let pods_map = format!("{}/{}/maps/PODS", zdivert_common::PIN_ROOT, agents[0].node);
        println!(
            "\n== bpftool map dump pinned {pods_map}  (BTF maps: bpftool names the fields; the key is the IPv4-mapped pod IP)"
        );
        match run("bpftool", &["map", "dump", "pinned", &pods_map]) {
            Ok(out) => print!("{out}"),
            Err(e) => println!("(bpftool: {e})"),
        }
    }

    println!("\n== tearing down");
    let node_names: Vec<String> = agents.iter().map(|a| a.node.clone()).collect();
    drop(servers);
    drop(agents);
    drop(ztunnels);
    let prefix = topo.prefix.clone();
    drop(topo);
    let left_ns = run("ip", &["netns", "list"])?
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .count();
    let left_pins = node_names
        .iter()
        .filter(|n| {
            Path::new(zdivert_common::PIN_ROOT).join(n).exists()
                || Path::new("/run/zdivert").join(n).exists()
        })
        .count();
    println!("left behind: {left_ns} network namespaces, {left_pins} pin or state directories");
    anyhow::ensure!(left_ns == 0 && left_pins == 0, "the demo left state behind");
    Ok(())
}

/// The article's commands, in its order, filtered as it filters them.
fn article_rules(w2: &Node) -> Result<()> {
    let show = |ns: &Netns, who: &str, cmd: &str, args: &str, grep: &[&str]| -> Result<()> {
        let out = ns.cmd(cmd, &args.split_whitespace().collect::<Vec<_>>())?;
        println!(
            "\n~ [{who}] {cmd} {args}{}",
            if grep.is_empty() {
                String::new()
            } else {
                format!(" | grep -E '{}'", grep.join("|"))
            }
        );
        for l in out
            .lines()
            .filter(|l| grep.is_empty() || grep.iter().any(|g| l.contains(g)))
        {
            println!("{l}");
        }
        Ok(())
    };
    let (node, zt) = (&w2.ns, &w2.ztunnel.ns);
    println!(
        "\n== the iptables layout on {}, as the article lists it",
        w2.article_name
    );
    show(node, "node", "ipset", "list ztunnel-pods-ips", &[])?;
    show(
        node,
        "node",
        "iptables-save",
        "",
        &["ztunnel", "KUBE-SERVICES", "*"],
    )?;
    show(node, "node", "ip", "rule", &[])?;
    for t in ["100", "101", "102"] {
        show(node, "node", "ip", &format!("route show table {t}"), &[])?;
    }
    show(node, "node", "ip", "addr", &["istio"])?;
    show(node, "node", "ip", "-d link show istioin", &[])?;
    show(node, "node", "ip", "-d link show istioout", &[])?;
    show(zt, "ztunnel", "ip", "addr", &["pistio"])?;
    show(zt, "ztunnel", "ip", "-d link show pistioout", &[])?;
    show(zt, "ztunnel", "iptables-save", "", &["pistio", "0x4d3"])?;
    show(zt, "ztunnel", "ip", "rule", &[])?;
    show(zt, "ztunnel", "ip", "route show table 100", &[])?;
    Ok(())
}
