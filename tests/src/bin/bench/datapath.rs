//! The data path through the real ztunnel, same node and cross node, side by side in each round:
//! (a) direct, nothing captured (the limit); (b) eBPF capture; (c) the iptables fallback; and,
//! through the real in-pod ztunnel, (d) in-pod eBPF against (e) istio-cni's in-pod rules. The
//! client is productpage-v1; the servers reviews-v1 (same node, HBONE through this node's
//! ztunnel) and details-v1 (the other node, HBONE between the two ztunnels).
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use zdivert_tests::{
    agent::{Agent, Mode, zds_socket},
    load::{self, Server},
    topology::{Pod, Topology},
    ztunnel::{MeshConfig, Ztunnel},
};

use crate::stats::Samples;

const PORT: u16 = 7000;

pub struct Sizes {
    pub transactions: usize,
    pub churn: Duration,
    pub bulk: Duration,
    pub rounds: usize,
}

fn start_agents(topo: &Topology, mode: Mode) -> Result<Vec<Agent>> {
    topo.nodes
        .iter()
        .map(|node| Agent::start_ready(node, mode, &["--health-addr", "off"]))
        .collect()
}

pub fn run(sizes: &Sizes, samples: &mut Samples) -> Result<()> {
    let topo = Topology::article()?;
    let (w2, w1) = (topo.worker2(), topo.worker());
    let (_, same, cross) = endpoints(&topo);
    let _servers = (
        Server::start(&same.ns, PORT)?,
        Server::start(&cross.ns, PORT)?,
    );
    let mesh = MeshConfig::default();
    let mut z2 = Ztunnel::start(&topo, w2, &mesh)?;
    let mut z1 = Ztunnel::start(&topo, w1, &mesh)?;
    for round in 0..sizes.rounds {
        // The captured variants alternate order between rounds, so drift favours neither.
        let captured: [&str; 2] = if round % 2 == 0 {
            ["b-ebpf", "c-iptables"]
        } else {
            ["c-iptables", "b-ebpf"]
        };
        for variant in ["a-direct", captured[0], captured[1]] {
            // Each variant starts from fresh ztunnels: no HBONE connection pooled under one
            // variant carries another's traffic (switching modes under live connections is
            // the tests' business, not the figures').
            z2.restart()?;
            z1.restart()?;
            let _agents = match variant {
                "b-ebpf" => start_agents(&topo, Mode::Ebpf)?,
                "c-iptables" => start_agents(&topo, Mode::Iptables)?,
                _ => vec![],
            };
            measure(&topo, variant, &z2, sizes, samples)?;
            eprintln!("bench: data path round {} {variant} done", round + 1);
        }
    }
    Ok(())
}

/// The figures of one variant, same node and cross node, each connection checked to have gone
/// through ztunnel (`z2`, the client's node's) or not, as the variant says.
fn measure(
    topo: &Topology,
    variant: &str,
    z2: &Ztunnel,
    sizes: &Sizes,
    samples: &mut Samples,
) -> Result<()> {
    let (client, same, cross) = endpoints(topo);
    let client_ns = client.ns.path();
    let target = |cross_node: bool| {
        SocketAddr::new(if cross_node { cross.ip } else { same.ip }.into(), PORT)
    };
    for cross_node in [false, true] {
        let dst = target(cross_node);
        let case = format!(
            "{}/{variant}",
            if cross_node {
                "cross-node"
            } else {
                "same-node"
            }
        );
        // The path is what the variant says: through ztunnel or not (its access log
        // records each connection when it closes).
        let before = z2.access_log().len();
        let mut rr = load::request_response(&client_ns, dst, sizes.transactions)
            .with_context(|| format!("{case}: request/response"))?;
        std::thread::sleep(Duration::from_millis(200));
        let through = z2.access_log().len() > before;
        ensure!(
            through == (variant != "a-direct"),
            "{case}: through ztunnel: {through}"
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
        )
        .with_context(|| format!("{case}: churn"))?;
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
            let bps = load::bulk(&client_ns, dst, streams, sizes.bulk)
                .with_context(|| format!("{case}: bulk, {streams} streams"))?;
            let metric = if streams == 1 { "bulk_1" } else { "bulk_4" };
            samples.add("datapath", &case, metric, "Gbit/s", bps / 1e9);
        }
    }
    Ok(())
}

/// The client, the same-node server and the cross-node server.
fn endpoints(topo: &Topology) -> (&Pod, &Pod, &Pod) {
    (
        topo.worker2().pod("productpage-v1"),
        topo.worker2().pod("reviews-v1"),
        topo.worker().pod("details-v1"),
    )
}

/// In-pod ztunnel: (d) the programs in the pods against (e) istio-cni's rules, each round from
/// fresh agents and fresh in-pod ztunnels (started after the agents: they connect to them).
pub fn run_in_pod(sizes: &Sizes, samples: &mut Samples) -> Result<()> {
    let topo = Topology::article()?;
    let (_, same, cross) = endpoints(&topo);
    let _servers = (
        Server::start(&same.ns, PORT)?,
        Server::start(&cross.ns, PORT)?,
    );
    let mesh = MeshConfig::default();
    for round in 0..sizes.rounds {
        let variants: [(&str, Mode); 2] = if round % 2 == 0 {
            [
                ("d-inpod-ebpf", Mode::InPodEbpf),
                ("e-inpod-iptables", Mode::InPodIptables),
            ]
        } else {
            [
                ("e-inpod-iptables", Mode::InPodIptables),
                ("d-inpod-ebpf", Mode::InPodEbpf),
            ]
        };
        for (variant, mode) in variants {
            let _agents = start_agents(&topo, mode)?;
            let mut ztunnels = Vec::new();
            for node in [topo.worker2(), topo.worker()] {
                let z = Ztunnel::start_in_pod(
                    &topo,
                    node,
                    &node.ztunnel,
                    &mesh,
                    &zds_socket(&node.name),
                )?;
                ztunnels.push(z);
            }
            for (z, node) in ztunnels.iter_mut().zip([topo.worker2(), topo.worker()]) {
                z.wait_ready()?;
                zdivert_tests::inpod::wait_ztunnel_in(node.pods.values().filter(|p| p.ambient))?;
            }
            measure(&topo, variant, &ztunnels[0], sizes, samples)?;
            eprintln!("bench: in-pod data path round {} {variant} done", round + 1);
        }
    }
    Ok(())
}
