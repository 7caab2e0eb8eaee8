//! The fixture shared by the integration tests: both article nodes, the real ztunnel and an agent
//! on each, all torn down on drop (agents first: they remove their pins).
#![allow(dead_code)]
use anyhow::Result;
pub use zdivert_tests::agent::Mode;
use zdivert_tests::{
    agent::Agent,
    topology::{Node, Topology},
    ztunnel::{MeshConfig, Ztunnel},
};

pub struct Lab {
    pub agents: Vec<Agent>,
    /// The real ztunnel on each node.
    pub ztunnels: Vec<Ztunnel>,
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
    agent.wait_set_up(node, with_ztunnel)
}

impl Lab {
    /// Both nodes, each with the real ztunnel told `mesh` and an agent in `mode`.
    pub fn real(mode: Mode, mesh: impl FnOnce(&Topology) -> MeshConfig) -> Result<Lab> {
        Self::real_with(mode, mesh, &[], &[])
    }

    /// With more environment for ztunnel and more `run` options for the agents. In the in-pod
    /// modes the agents go first: each ztunnel connects to its agent's ZDS socket.
    pub fn real_with(
        mode: Mode,
        mesh: impl FnOnce(&Topology) -> MeshConfig,
        ztunnel_env: &[(&str, &str)],
        agent_options: &[&str],
    ) -> Result<Lab> {
        let topo = Topology::article()?;
        let mesh = mesh(&topo);
        let mut lab = Lab {
            agents: vec![],
            ztunnels: vec![],
            mesh,
            topo,
        };
        if mode.is_in_pod() {
            for node in &lab.topo.nodes {
                let agent = Agent::start_with(node, &node.pods_file(true), mode, agent_options)?;
                lab.agents.push(agent);
                lab.wait_ready(node, true)?;
            }
            for node in &lab.topo.nodes {
                let socket = zdivert_tests::agent::zds_socket(&node.name);
                let ztunnel = Ztunnel::start_in_pod_with(
                    &lab.topo,
                    node,
                    &node.ztunnel,
                    &lab.mesh,
                    &socket,
                    ztunnel_env,
                )?;
                lab.ztunnels.push(ztunnel);
            }
            for (node, ztunnel) in lab.topo.nodes.iter().zip(&mut lab.ztunnels) {
                ztunnel.wait_ready()?;
                zdivert_tests::inpod::wait_ztunnel_in(node.pods.values().filter(|p| p.ambient))?;
            }
            return Ok(lab);
        }
        for node in &lab.topo.nodes {
            lab.ztunnels.push(Ztunnel::start_with(
                &lab.topo,
                node,
                &lab.mesh,
                ztunnel_env,
            )?);
        }
        for node in lab.topo.nodes.iter() {
            let agent = Agent::start_with(node, &node.pods_file(true), mode, agent_options)?;
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
