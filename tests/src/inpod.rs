//! In-pod mode in the lab: the node's pods as ZDS workloads (with the uids the XDS file gives
//! them), ztunnel's listeners in a pod, and the agent started in `--ztunnel-mode inpod`.
use std::{collections::BTreeMap, time::Duration};

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
                ips: vec![p.ip.into(), p.ip6.into()],
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

/// Waits until ztunnel listens in each of `pods`. (The agent's apply, its ZDS message and
/// ztunnel's listeners: seconds here, up to half a minute on 5.10 under emulation.)
pub fn wait_ztunnel_in<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Result<()> {
    for p in pods {
        crate::eventually(
            &format!("ztunnel listening in {}", p.name),
            Duration::from_secs(30),
            || ztunnel_listens_in(p),
        )?;
    }
    Ok(())
}

/// The agent on `node` in `--ztunnel-mode inpod` (`mode`: `InPodEbpf` or `InPodIptables`),
/// serving ZDS on `agent::zds_socket`.
pub fn start_agent(node: &Node, mode: Mode) -> Result<Agent> {
    start_agent_with(node, mode, &[])
}

/// With more `run` options (`--attach tcx`).
pub fn start_agent_with(node: &Node, mode: Mode, extra: &[&str]) -> Result<Agent> {
    anyhow::ensure!(mode.is_in_pod(), "{mode} is not an in-pod mode");
    Agent::start_with(node, &node.pods_file(true), mode, extra)
}

/// Waits until each ambient pod of `node` holds the redirection of `mode`.
pub fn wait_redirected(node: &Node, mode: Mode) -> Result<()> {
    let marker = if mode == Mode::InPodEbpf {
        "zd_pod"
    } else {
        "ISTIO"
    };
    for p in node.pods.values().filter(|p| p.ambient) {
        crate::eventually(
            &format!("{mode} redirection in {}", p.name),
            crate::SET_UP_WITHIN,
            || Ok(redirection_in(p)?.iter().any(|l| l.contains(marker))),
        )?;
    }
    Ok(())
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
        held.extend(
            rules
                .lines()
                .filter(|l| l.contains("0x111"))
                .map(String::from),
        );
        // A netns that never had the table (never redirected) says so instead of listing none.
        let routes = pod
            .ns
            .cmd("ip", &[family, "route", "show", "table", "100"])
            .or_else(
                |e| match e.to_string().contains("FIB table does not exist") {
                    true => Ok(String::new()),
                    false => Err(e),
                },
            )?;
        held.extend(routes.lines().map(|l| format!("table 100: {l}")));
    }
    held.extend(programs_in(pod)?);
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

/// zdivert's programs on `pod`'s eth0 (both ways) and lo (ingress), TCX links and tc filters,
/// as `<where>: <name>`.
pub fn programs_in(pod: &Pod) -> Result<Vec<String>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let mut filters = Vec::new();
    for (dev, dir) in [("eth0", "ingress"), ("eth0", "egress"), ("lo", "ingress")] {
        let shown = pod.ns.cmd("tc", &["filter", "show", "dev", dev, dir])?;
        filters.extend(
            shown
                .lines()
                .filter(|l| l.contains("zd_pod"))
                .map(|l| format!("{dev} {dir} filter: {}", l.trim())),
        );
    }
    zdivert::netns::run_in(&pod.ns.path(), || -> Result<Vec<String>> {
        let mut out = filters;
        for (dev, hook) in [
            ("eth0", TcAttachType::Ingress),
            ("eth0", TcAttachType::Egress),
            ("lo", TcAttachType::Ingress),
        ] {
            let programs = match SchedClassifier::query_tcx(dev, hook) {
                Ok((_, programs)) => programs,
                // A kernel before 6.6 knows no TCX (EINVAL): nothing is attached through it.
                Err(e) if crate::snapshot::errno(&e) == Some(libc::EINVAL) => continue,
                Err(e) => return Err(e.into()),
            };
            for p in programs {
                let name = p.name_as_str().unwrap_or("?").to_string();
                out.push(format!("{dev} {hook:?}: {name}"));
            }
        }
        Ok(out)
    })?
}
