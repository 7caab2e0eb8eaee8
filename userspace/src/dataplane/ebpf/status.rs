//! `zdivert status` in eBPF mode: the pinned maps, links and counters, decoded.
use std::{fmt::Write as _, net::IpAddr, path::Path};

use serde::Serialize;

use super::{PinDirs, attach, maps};
use crate::{dataplane::status::mac, error::Result};

#[derive(Debug, Serialize)]
pub struct Status {
    pub node: String,
    pub pins: String,
    pub ztunnel: Option<ZtunnelStatus>,
    pub pods: Vec<PodStatus>,
    pub node_ips: Vec<IpAddr>,
    pub links: Vec<String>,
    /// In-pod mode: each redirected pod netns (by inode), its path if a process or name still
    /// holds it, and its attachments.
    pub pod_netns: Vec<PodNetnsStatus>,
    pub counters: Vec<Counter>,
}

#[derive(Debug, Serialize)]
pub struct PodNetnsStatus {
    pub inode: u64,
    pub path: Option<String>,
    pub attachments: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ZtunnelStatus {
    /// ztunnel's listeners (:15001, :15006, :15008) that are not there now: while any is
    /// missing, what they would take is dropped.
    pub missing_listeners: Option<Vec<u16>>,
    pub host_ifindex: u32,
    pub mac: String,
    pub ipv4: Option<IpAddr>,
    pub ipv6: Option<IpAddr>,
}

#[derive(Debug, Serialize)]
pub struct PodStatus {
    pub ip: IpAddr,
    pub host_ifindex: u32,
    pub host_mac: String,
}

#[derive(Debug, Serialize)]
pub struct Counter {
    pub path: &'static str,
    pub outcome: &'static str,
    pub packets: u64,
}

pub fn read(bpffs: &Path, node: &str) -> Result<Status> {
    let dirs = PinDirs::new(bpffs, node);
    let snap = maps::snapshot(&dirs.maps)?;
    let pinned = attach::all_pinned(&dirs)?;
    // ztunnel's netns, by the inode its tproxy attachment was recorded with.
    let ztunnel_netns = pinned
        .iter()
        .find(|(_, _, p)| p.hook == attach::Hook::ZtunnelTproxy)
        .and_then(|(_, _, p)| crate::netns::find_by_inode(p.netns_inode));
    let missing_listeners = ztunnel_netns
        .and_then(|ns| crate::ztunnel::listening(&ns).ok())
        .map(|ports| crate::ztunnel::missing(&ports));
    let ztunnel = snap.ztunnel.map(|z| ZtunnelStatus {
        missing_listeners,
        host_ifindex: z.host_ifindex,
        mac: mac(&z.mac),
        ipv4: (z.flags & zdivert_common::ZTUNNEL_F_V4 != 0).then(|| IpAddr::from(z.ipv4)),
        ipv6: (z.flags & zdivert_common::ZTUNNEL_F_V6 != 0).then(|| IpAddr::from(z.ipv6)),
    });
    let mut pod_netns: Vec<PodNetnsStatus> = Vec::new();
    for (_, mode, p) in &pinned {
        if !matches!(
            p.hook,
            attach::Hook::InPodEgress | attach::Hook::InPodIngress | attach::Hook::InPodLoopback
        ) {
            continue;
        }
        let what = format!(
            "{} {} on ifindex {} via {mode}",
            p.hook.program(),
            p.hook.direction(),
            p.ifindex
        );
        match pod_netns.iter_mut().find(|n| n.inode == p.netns_inode) {
            Some(n) => n.attachments.push(what),
            None => pod_netns.push(PodNetnsStatus {
                inode: p.netns_inode,
                path: crate::netns::find_by_inode(p.netns_inode).map(|n| n.display().to_string()),
                attachments: vec![what],
            }),
        }
    }
    // Each guard goes with the pod netns whose eth0 its host veth is the peer of.
    for (_, mode, p) in pinned
        .iter()
        .filter(|(_, _, p)| p.hook == attach::Hook::InPodGuard)
    {
        let what = format!(
            "{} {} on host ifindex {} via {mode}",
            p.hook.program(),
            p.hook.direction(),
            p.ifindex
        );
        let owner = pod_netns.iter_mut().find(|n| {
            n.path
                .as_deref()
                .is_some_and(|path| peers_of(Path::new(path)).contains(&p.ifindex))
        });
        if let Some(n) = owner {
            n.attachments.push(what);
        }
    }
    Ok(Status {
        node: node.into(),
        pins: dirs.root.display().to_string(),
        ztunnel,
        pods: snap
            .pods
            .iter()
            .map(|(ip, e)| PodStatus {
                ip: *ip,
                host_ifindex: e.host_ifindex,
                host_mac: mac(&e.host_mac),
            })
            .collect(),
        node_ips: snap.node_ips,
        links: pinned
            .iter()
            .map(|(_, mode, p)| format!("{p} via {mode}"))
            .collect(),
        pod_netns,
        counters: snap
            .counters
            .into_iter()
            .map(|(path, outcome, packets)| Counter {
                path,
                outcome,
                packets,
            })
            .collect(),
    })
}

/// The peers' indexes of the veths in the netns at `path`.
fn peers_of(path: &Path) -> Vec<u32> {
    crate::netns::run_in(path, || -> Result<Vec<u32>> {
        Ok(crate::nl::Netlink::new()?
            .links()?
            .into_iter()
            .filter(|l| l.is_veth)
            .filter_map(|l| l.peer_index)
            .collect())
    })
    .ok()
    .and_then(|r| r.ok())
    .unwrap_or_default()
}

impl Status {
    /// In-pod mode's view: the node-level maps and ztunnel entry are not used there, so only
    /// each pod netns's redirection and the in-pod programs' counters.
    pub fn render_in_pod(&self) -> String {
        let mut s = format!(
            "pods redirected by eBPF programs ({} netns):\n",
            self.pod_netns.len()
        );
        for n in &self.pod_netns {
            let _ = writeln!(
                s,
                "  netns {} ({}):",
                n.inode,
                n.path.as_deref().unwrap_or("gone")
            );
            for a in &n.attachments {
                let _ = writeln!(s, "    {a}");
            }
        }
        let _ = writeln!(s, "packets (in-pod programs):");
        for c in self.counters.iter().filter(|c| c.path.starts_with("pod_")) {
            let _ = writeln!(s, "  {:<15} {:<28} {}", c.path, c.outcome, c.packets);
        }
        s
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "node {}, mode ebpf (pinned under {})",
            self.node, self.pins
        );
        match &self.ztunnel {
            Some(z) => {
                let ips: Vec<String> = z
                    .ipv4
                    .iter()
                    .chain(&z.ipv6)
                    .map(|i| i.to_string())
                    .collect();
                let _ = writeln!(
                    s,
                    "ztunnel: {} via host ifindex {}, eth0 {}",
                    ips.join(", "),
                    z.host_ifindex,
                    z.mac
                );
                let listening = match z.missing_listeners.as_deref() {
                    None => "its netns was not found".to_string(),
                    Some([]) => "listening on :15001, :15006, :15008".to_string(),
                    Some(missing) => format!(
                        "NOT listening on {} (starting, or exited): that traffic is dropped",
                        missing
                            .iter()
                            .map(|p| format!(":{p}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                let _ = writeln!(s, "  {listening}");
            }
            None => {
                let _ = writeln!(
                    s,
                    "ztunnel: none (ambient pods' TCP is dropped: fail closed)"
                );
            }
        }
        let _ = writeln!(s, "ambient pod addresses ({}):", self.pods.len());
        for p in &self.pods {
            let _ = writeln!(
                s,
                "  {:<24} host ifindex {:<5} gateway mac {}",
                p.ip, p.host_ifindex, p.host_mac
            );
        }
        let ips: Vec<String> = self.node_ips.iter().map(|i| i.to_string()).collect();
        let _ = writeln!(s, "node addresses (not captured): {}", ips.join(", "));
        let _ = writeln!(s, "attachments ({}):", self.links.len());
        for l in &self.links {
            let _ = writeln!(s, "  {l}");
        }
        let _ = writeln!(s, "packets:");
        for c in &self.counters {
            let _ = writeln!(s, "  {:<15} {:<22} {}", c.path, c.outcome, c.packets);
        }
        s
    }
}
