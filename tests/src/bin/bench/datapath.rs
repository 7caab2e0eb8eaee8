//! The data path, same node and cross node, side by side in each round: (a) direct, nothing
//! captured; (b) explicit proxy through the stand-in ztunnel; (c) eBPF capture; (d) the iptables
//! fallback. The client is productpage-v1; the servers reviews-v1 (same node) and details-v1
//! (the other node).
use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, ensure};
use zdivert_tests::{
    agent::Agent,
    fallback,
    load::{self, Server},
    standin::{Explicit, HBONE, Standin},
    topology::{Node, Topology},
};

use crate::stats::Samples;

const PORT: u16 = 7000;
const EXPLICIT_SAME: u16 = 16001;
const EXPLICIT_CROSS: u16 = 16002;

pub struct Sizes {
    pub transactions: usize,
    pub churn: Duration,
    pub bulk: Duration,
    pub rounds: usize,
}

fn standin(node: &Node, explicit: Vec<Explicit>) -> Result<Standin> {
    let mut cfg = zdivert_tests::standin_config(node, vec![]);
    cfg.explicit = explicit;
    Standin::start(&node.ztunnel.ns, cfg)
}

fn start_agents(topo: &Topology, mode: &str) -> Result<Vec<Agent>> {
    let mut agents = vec![];
    for node in &topo.nodes {
        let agent =
            Agent::start_with(node, &node.pods_file(true), mode, &["--health-addr", "off"])?;
        let pods = node.pods.values().filter(|p| p.ambient).count();
        match mode {
            "iptables" => fallback::wait_layout(node, pods, true)?,
            _ => {
                agent.wait_ready(pods * 2, pods * 2 + 2)?;
            }
        }
        agents.push(agent);
    }
    Ok(agents)
}

fn sa(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

pub fn run(sizes: &Sizes, samples: &mut Samples) -> Result<()> {
    let topo = Topology::article()?;
    let (w2, w1) = (topo.worker2(), topo.worker());
    let (client, same, cross) = (
        w2.pod("productpage-v1"),
        w2.pod("reviews-v1"),
        w1.pod("details-v1"),
    );
    let _servers = (
        Server::start(&same.ns, PORT)?,
        Server::start(&cross.ns, PORT)?,
    );
    let z2 = standin(
        w2,
        vec![
            Explicit {
                port: EXPLICIT_SAME,
                target: sa(same.ip, PORT),
                via: None,
            },
            Explicit {
                port: EXPLICIT_CROSS,
                target: sa(cross.ip, PORT),
                via: Some(sa(w1.ztunnel.ip, HBONE)),
            },
        ],
    )?;
    let _z1 = standin(w1, vec![])?;
    let client_ns = client.ns.path();
    let target = |variant: &str, cross_node: bool| match (variant, cross_node) {
        ("b-explicit", false) => sa(w2.ztunnel.ip, EXPLICIT_SAME),
        ("b-explicit", true) => sa(w2.ztunnel.ip, EXPLICIT_CROSS),
        (_, false) => sa(same.ip, PORT),
        (_, true) => sa(cross.ip, PORT),
    };
    for round in 0..sizes.rounds {
        // The captured variants alternate order between rounds, so drift favours neither.
        let captured: [&str; 2] = if round % 2 == 0 {
            ["c-ebpf", "d-iptables"]
        } else {
            ["d-iptables", "c-ebpf"]
        };
        for variant in ["a-direct", "b-explicit", captured[0], captured[1]] {
            let _agents = match variant {
                "c-ebpf" => start_agents(&topo, "ebpf")?,
                "d-iptables" => start_agents(&topo, "iptables")?,
                _ => vec![],
            };
            for cross_node in [false, true] {
                let dst = target(variant, cross_node);
                let case = format!(
                    "{}/{variant}",
                    if cross_node {
                        "cross-node"
                    } else {
                        "same-node"
                    }
                );
                // The path is what the variant says: through the stand-in or not.
                let before = z2.records().len();
                let mut rr = load::request_response(&client_ns, dst, sizes.transactions)?;
                let through = z2.records().len() > before;
                ensure!(
                    through == (variant != "a-direct"),
                    "{case}: through the stand-in ztunnel: {through}"
                );
                samples.add(
                    "datapath",
                    &case,
                    "rr_p50",
                    "µs",
                    load::quantile(&mut rr, 0.5).as_secs_f64() * 1e6,
                );
                samples.add(
                    "datapath",
                    &case,
                    "rr_p99",
                    "µs",
                    load::quantile(&mut rr, 0.99).as_secs_f64() * 1e6,
                );
                let mut churn = load::churn(
                    std::slice::from_ref(&client_ns),
                    dst,
                    16,
                    load::Amount::For(sizes.churn),
                )?;
                samples.add(
                    "datapath",
                    &case,
                    "conn_per_s",
                    "conn/s",
                    churn.connections as f64 / churn.elapsed.as_secs_f64(),
                );
                samples.add(
                    "datapath",
                    &case,
                    "conn_p99",
                    "ms",
                    load::quantile(&mut churn.times, 0.99).as_secs_f64() * 1e3,
                );
                samples.add(
                    "datapath",
                    &case,
                    "conn_failures",
                    "conn",
                    churn.failures as f64,
                );
                for streams in [1, 4] {
                    let bps = load::bulk(&client_ns, dst, streams, sizes.bulk)?;
                    let metric = if streams == 1 { "bulk_1" } else { "bulk_4" };
                    samples.add("datapath", &case, metric, "Gbit/s", bps / 1e9);
                }
                z2.clear();
            }
            eprintln!("bench: data path round {} {variant} done", round + 1);
        }
    }
    Ok(())
}
