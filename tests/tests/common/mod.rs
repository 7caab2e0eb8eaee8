//! The fixture shared by the eBPF-mode integration tests: both article nodes, a stand-in ztunnel
//! and an agent on each, all torn down on drop (agents first: they remove their pins).
#![allow(dead_code)]
use std::net::SocketAddr;

use anyhow::Result;
use zdivert_tests::{
    agent::Agent,
    fallback,
    standin::Standin,
    standin_for,
    topology::{Node, Topology},
    ztunnel::{MeshConfig, Ztunnel},
};

/// A dataplane as the tests run it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// eBPF, attached through TCX.
    Ebpf,
    /// eBPF attached through tc clsact filters, as on kernels without TCX.
    EbpfClsact,
    /// The iptables fallback.
    Iptables,
}

impl Mode {
    /// The agent's name for it (see `Agent`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::EbpfClsact => "ebpf-clsact",
            Mode::Iptables => "iptables",
        }
    }

    pub fn is_ebpf(self) -> bool {
        self != Mode::Iptables
    }
}

pub struct Lab {
    pub agents: Vec<Agent>,
    /// The real ztunnel on each node (empty when the lab runs the stand-in).
    pub ztunnels: Vec<Ztunnel>,
    pub standins: Vec<Standin>,
    pub mesh: MeshConfig,
    pub topo: Topology,
}

/// Ambient pods and attachments an agent shows when `node` is fully set up: two programs per
/// ambient pod's veth, plus ztunnel's return and tproxy programs. Each pod has two addresses.
pub fn expected(node: &Node, with_ztunnel: bool) -> (usize, usize) {
    let pods = node.pods.values().filter(|p| p.ambient).count();
    (pods, pods * 2 + if with_ztunnel { 2 } else { 0 })
}

/// Asserts that a request stream ran (more than `min` requests) and that none failed.
pub fn assert_none_failed(results: &[Result<std::net::IpAddr>], min: usize) {
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(results.len() > min, "the stream ran: {}", results.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        results.len()
    );
}

/// Waits until `agent` has set `node` up in its mode, with or without a ztunnel.
pub fn wait_set_up(agent: &Agent, node: &Node, with_ztunnel: bool) -> Result<()> {
    let (a, l) = expected(node, with_ztunnel);
    match agent.mode.as_str() {
        "iptables" => fallback::wait_layout(node, a, with_ztunnel),
        _ => agent.wait_ready(a * 2, l).map(|_| ()),
    }
}

impl Lab {
    pub fn start() -> Result<Lab> {
        Self::start_with_services(vec![])
    }

    /// With Service VIP → endpoint entries for the article node's stand-in ztunnel.
    pub fn start_with_services(services: Vec<(SocketAddr, SocketAddr)>) -> Result<Lab> {
        Self::start_mode("ebpf", services)
    }

    /// Both nodes, each with the real ztunnel told `mesh` and an agent in `mode`.
    pub fn real(mode: Mode, mesh: impl FnOnce(&Topology) -> MeshConfig) -> Result<Lab> {
        let mode = mode.as_str();
        let topo = Topology::article()?;
        let mesh = mesh(&topo);
        let mut lab = Lab {
            agents: vec![],
            ztunnels: vec![],
            standins: vec![],
            mesh,
            topo,
        };
        for node in &lab.topo.nodes {
            lab.ztunnels
                .push(Ztunnel::start(&lab.topo, node, &lab.mesh)?);
        }
        for node in lab.topo.nodes.iter() {
            let agent = Agent::start_mode(node, &node.pods_file(true), mode)?;
            lab.agents.push(agent);
            lab.wait_ready(node, true)?;
        }
        Ok(lab)
    }

    /// Both nodes with agents in `mode` (ebpf or iptables) and the stand-in ztunnel.
    pub fn start_mode(mode: &str, services: Vec<(SocketAddr, SocketAddr)>) -> Result<Lab> {
        let topo = Topology::article()?;
        let mut lab = Lab {
            agents: vec![],
            ztunnels: vec![],
            standins: vec![],
            mesh: MeshConfig::default(),
            topo,
        };
        for (i, node) in lab.topo.nodes.iter().enumerate() {
            let services = if i == 0 { services.clone() } else { vec![] };
            lab.standins.push(standin_for(node, services)?);
            let agent = Agent::start_mode(node, &node.pods_file(true), mode)?;
            lab.agents.push(agent);
            lab.wait_ready(node, true)?;
        }
        Ok(lab)
    }

    /// Waits until the agent of `node` has set it up in its mode.
    pub fn wait_ready(&self, node: &Node, with_ztunnel: bool) -> Result<()> {
        let agent = self
            .agents
            .iter()
            .find(|a| a.node == node.name)
            .expect("an agent per node");
        wait_set_up(agent, node, with_ztunnel)
    }

    pub fn w2(&self) -> &Node {
        self.topo.worker2()
    }
    pub fn w1(&self) -> &Node {
        self.topo.worker()
    }
    /// The stand-in and agent of the article's node.
    pub fn z2(&self) -> &Standin {
        &self.standins[0]
    }
    pub fn z1(&self) -> &Standin {
        &self.standins[1]
    }
    /// The real ztunnels of the article's node and of the other one.
    pub fn zt2(&self) -> &Ztunnel {
        &self.ztunnels[0]
    }
    pub fn zt1(&self) -> &Ztunnel {
        &self.ztunnels[1]
    }
    pub fn agent2(&self) -> &Agent {
        &self.agents[0]
    }
}
pub mod scenarios;
