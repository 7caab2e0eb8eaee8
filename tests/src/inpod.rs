//! In-pod mode in the lab: the node's pods as ZDS workloads (with the uids the XDS file gives
//! them), ztunnel's listeners in a pod, and the agent started in `--ztunnel-mode inpod`.
use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Result;
use zdivert::zds::{InPodWorkload, WorkloadInfo};

use crate::{
    agent::{Agent, Mode},
    topology::{Node, Pod},
    ztunnel::service_account,
};

/// The pods as ZDS workloads, keyed by uid.
pub fn workloads<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeMap<String, InPodWorkload> {
    pods.into_iter()
        .map(|p| {
            let w = InPodWorkload {
                uid: crate::ztunnel::workload_uid(p),
                info: WorkloadInfo {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: service_account(p),
                },
                netns: p.ns.path(),
            };
            (w.uid.clone(), w)
        })
        .collect()
}

/// Whether ztunnel's outbound listener is open in `pod`'s netns.
pub fn ztunnel_listens_in(pod: &Pod) -> Result<bool> {
    let out = pod.ns.cmd("ss", &["-Hltn", "sport = :15001"])?;
    Ok(out.lines().count() > 0)
}

/// Waits until ztunnel listens in each of `pods`.
pub fn wait_ztunnel_in<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Result<()> {
    for p in pods {
        crate::eventually(
            &format!("ztunnel listening in {}", p.name),
            Duration::from_secs(10),
            || ztunnel_listens_in(p),
        )?;
    }
    Ok(())
}

/// The node description for in-pod mode: each ambient pod but those named in `left`, with its
/// uid, service account and netns.
pub fn description(node: &Node, left: &[&str]) -> String {
    let mut yaml = format!("node: {}\npods:\n", node.name);
    for p in node
        .pods
        .values()
        .filter(|p| p.ambient && !left.contains(&p.name.as_str()))
    {
        yaml += &format!(
            "  - {{ name: {}, namespace: {}, ips: [{}, {}], uid: \"{}\", serviceAccount: {}, \
             netns: {} }}\n",
            p.name,
            p.namespace,
            p.ip,
            p.ip6,
            crate::ztunnel::workload_uid(p),
            service_account(p),
            p.ns.path().display()
        );
    }
    yaml
}

/// The agent on `node` in `--ztunnel-mode inpod`, serving ZDS on `socket`.
pub fn start_agent(node: &Node, socket: &Path) -> Result<Agent> {
    let socket = socket.display().to_string();
    let extra = ["--ztunnel-mode", "inpod", "--zds-socket", socket.as_str()];
    Agent::start_with(node, &description(node, &[]), Mode::Iptables, &extra)
}
