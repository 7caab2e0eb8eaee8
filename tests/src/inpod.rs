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

/// The agent on `node` in `--ztunnel-mode inpod`, serving ZDS on `socket`, redirecting in the
/// pods with eBPF (`Mode::Ebpf`) or istio-cni's rules (`Mode::Iptables`).
pub fn start_agent(node: &Node, socket: &Path, mode: Mode) -> Result<Agent> {
    let socket = socket.display().to_string();
    let extra = ["--ztunnel-mode", "inpod", "--zds-socket", socket.as_str()];
    Agent::start_with(node, &description(node, &[]), mode, &extra)
}

/// What of a redirection, of either kind, `pod`'s netns holds: istio-cni's chains, the reply
/// rule and its route, zdivert's programs (TC and sk_lookup), lo's sysctls. Empty once the pod
/// is released.
pub fn redirection_in(pod: &Pod) -> Result<Vec<String>> {
    let mut held = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = pod.ns.cmd(save, &[])?;
        held.extend(
            rules
                .lines()
                .filter(|l| l.contains("ISTIO"))
                .map(|l| format!("{save}: {l}")),
        );
    }
    for family in ["-4", "-6"] {
        let rules = pod.ns.cmd("ip", &[family, "rule"])?;
        held.extend(rules.lines().filter(|l| l.contains("0x111")).map(String::from));
        let routes = pod.ns.cmd("ip", &[family, "route", "show", "table", "100"])?;
        held.extend(routes.lines().map(|l| format!("table 100: {l}")));
    }
    let programs = pod.ns.cmd("bpftool", &["net", "show"])?;
    held.extend(
        programs
            .lines()
            .filter(|l| l.contains("zd_pod"))
            .map(String::from),
    );
    for key in ["accept_local", "route_localnet"] {
        let value = zdivert::netns::run_in(&pod.ns.path(), || {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/lo/{key}"))
        })??;
        if value.trim() != "0" {
            held.push(format!("lo {key} = {}", value.trim()));
        }
    }
    Ok(held)
}
