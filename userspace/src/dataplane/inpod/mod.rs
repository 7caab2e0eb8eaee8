//! In-pod mode (`--ztunnel-mode inpod`): ztunnel opens its listeners inside each ambient pod's
//! netns, which this dataplane hands it over ZDS, and the pod's traffic is redirected there:
//! with eBPF programs in the pod's netns (`programs`), or with istio-cni's rules
//! (`istio_cni.rs`). The redirection goes in before the `add`, so a pod is never handed over
//! unredirected; until ztunnel listens, its redirected TCP is refused (fail closed).
pub mod istio_cni;
mod newest;
pub mod pods;
pub mod programs;
mod routing;
pub mod rules;
mod senders;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Instant,
};

use super::{Dataplane, Report, ZtunnelState};
use crate::{
    error::{Error, Result},
    netns,
    state::{NodeState, PodId, PodSpec},
    zds::{InPodWorkload, Server, WorkloadInfo},
};

/// How long a pod's redirection, once checked in full, is taken as it was left: an apply costs
/// nothing per pod already set up (a CNI ADD applies the whole node). Shorter than the resync
/// (30 s by default), so that every periodic apply checks every pod in the kernel: what was
/// taken away behind the agent's back is put back within a resync.
pub(crate) const RECHECK: std::time::Duration = std::time::Duration::from_secs(25);

/// How a pod's traffic reaches the ztunnel listening in its netns.
pub enum Redirection {
    Ebpf(Box<programs::PodPrograms>),
    Iptables(rules::PodRules),
}

impl Redirection {
    /// Returns how much of an earlier redirection was found gone and put back.
    fn redirect(&mut self, ns: &Path, ips: &[IpAddr]) -> Result<usize> {
        match self {
            Redirection::Ebpf(p) => p.redirect(ns, ips),
            Redirection::Iptables(r) => r.redirect(ns),
        }
    }

    fn release(&mut self, ns: &Path) -> Result<()> {
        match self {
            Redirection::Ebpf(p) => p.release(ns),
            Redirection::Iptables(r) => r.release(ns),
        }
    }
}

pub struct InPod {
    server: Server,
    redirection: Redirection,
    /// Pods whose netns holds our redirection, as ztunnel was given them.
    redirected: BTreeMap<PodId, InPodWorkload>,
    records: pods::PodRecords,
}

impl InPod {
    /// Serves ZDS on `socket`, keeping the peers' states and the pods' records in `state_dir`
    /// for `zdivert status`.
    pub fn new(
        socket: &Path,
        state_dir: &Path,
        node: &str,
        redirection: Redirection,
    ) -> Result<InPod> {
        let server = Server::start(socket).map_err(|source| Error::Zds {
            path: socket.into(),
            source,
        })?;
        server.publish_to(&crate::zds::status_file(state_dir, node));
        if let Redirection::Ebpf(p) = &redirection {
            server.on_acked(p.on_acked());
        }
        Ok(InPod {
            server,
            redirection,
            redirected: BTreeMap::new(),
            records: pods::PodRecords::new(pods::file(state_dir, node)),
        })
    }

    /// Where `spec`'s pod is: the netns its source names (the CNI plugin's, from the runtime);
    /// for a pod redirected before, the netns it had, as long as it holds the pod's address (a
    /// netns that went or lost the address is never replaced by another that holds it: that
    /// could be a new pod given the address, or one that took it); else, for pods that
    /// predate the plugin, the one netns that holds its address, unless the runtime gave that
    /// netns to another pod (`claimed`: a new pod given the address of one whose API object
    /// is still there).
    fn netns_of(
        &self,
        id: &PodId,
        spec: &PodSpec,
        claimed: &BTreeMap<u64, &PodId>,
        holders: &BTreeMap<IpAddr, Vec<PathBuf>>,
    ) -> Result<PathBuf> {
        if let Some(ns) = &spec.netns {
            return Ok(ns.clone());
        }
        let first = spec.ips.first().copied();
        if let Some(last) = self.redirected.get(id).filter(|w| w.uid == spec.uid) {
            return match first {
                Some(ip) if netns::has_address(&last.netns, ip) => Ok(last.netns.clone()),
                _ => Err(Error::PodNetnsLost {
                    pod: id.to_string(),
                    netns: last.netns.clone(),
                }),
            };
        }
        // An address two namespaces hold (a pod being replaced, or one pretending) is
        // nobody's: taking either could hand ztunnel the wrong pod.
        let found = match first.and_then(|ip| holders.get(&ip)).map(Vec::as_slice) {
            Some([one]) => one.clone(),
            Some(many) if many.len() > 1 => {
                return Err(Error::PodAddressAmbiguous {
                    pod: id.to_string(),
                    holders: many.len(),
                });
            }
            _ => {
                return Err(Error::PodNetnsNotFound {
                    pod: id.to_string(),
                });
            }
        };
        match netns::inode(&found).ok().and_then(|i| claimed.get(&i)) {
            Some(owner) if *owner != id => Err(Error::PodNetnsClaimed {
                pod: id.to_string(),
                owner: owner.to_string(),
            }),
            _ => Ok(found),
        }
    }

    fn ztunnel_state(&self, state: &NodeState) -> ZtunnelState {
        let peers = self.server.peers().len();
        let Some(pod) = state.ztunnel.as_ref().map(|z| z.pod.clone()) else {
            return match peers {
                0 => ZtunnelState::Absent,
                peers => ZtunnelState::Connected { peers },
            };
        };
        if peers == 0 {
            // The node's ztunnel is not connected (starting, or its process exited): looked at
            // again soon, as a node-level ztunnel that does not listen.
            return ZtunnelState::NotListening {
                pod,
                missing: crate::ztunnel::LISTENERS.to_vec(),
            };
        }
        // ztunnel listens in every pod it serves; the first one stands for all.
        let Some(netns) = self.redirected.values().next().map(|w| &w.netns) else {
            return ZtunnelState::Connected { peers };
        };
        match crate::ztunnel::listening(netns).map(|p| crate::ztunnel::missing(&p)) {
            Ok(missing) if missing.is_empty() => ZtunnelState::Ready {
                pod,
                netns: netns.clone(),
            },
            Ok(missing) => ZtunnelState::NotListening { pod, missing },
            Err(_) => ZtunnelState::NotListening {
                pod,
                missing: crate::ztunnel::LISTENERS.to_vec(),
            },
        }
    }
}

impl Dataplane for InPod {
    fn name(&self) -> &'static str {
        match self.redirection {
            Redirection::Ebpf(_) => "in-pod (ebpf)",
            Redirection::Iptables(_) => "in-pod (iptables)",
        }
    }

    fn apply(&mut self, state: &NodeState) -> Result<Report> {
        let mut report = Report::default();
        let mut redirected = BTreeMap::new();
        // The netns the runtime gave pods (through the CNI plugin): never another pod's.
        let claimed: BTreeMap<u64, &PodId> = state
            .sandboxes
            .iter()
            .filter_map(|(id, ns)| Some((netns::inode(ns).ok()?, id)))
            .collect();
        // Pods found by address (they predate the plugin), all in one pass over the node.
        let wanted: std::collections::BTreeSet<IpAddr> = state
            .pods
            .iter()
            .filter(|(id, spec)| spec.netns.is_none() && !self.redirected.contains_key(*id))
            .flat_map(|(_, spec)| spec.ips.first().copied())
            .collect();
        let holders = netns::holders_of(&wanted);
        for (id, spec) in &state.pods {
            let ns = match self.netns_of(id, spec, &claimed, &holders) {
                Ok(ns) => ns,
                Err(e) => {
                    // Fail closed: a pod whose netns cannot be told now keeps the redirection
                    // and the ztunnel it had. Releasing it would let whoever made its address
                    // ambiguous strip its capture.
                    if let Some(last) = self.redirected.get(id) {
                        redirected.insert(id.clone(), last.clone());
                    }
                    report.failed.push((id.clone(), e));
                    continue;
                }
            };
            match self.redirection.redirect(&ns, &spec.ips) {
                Ok(repaired) => {
                    report.repaired += repaired;
                    self.records.repaired(id, repaired);
                    if self.records.listeners_due(id) {
                        match crate::ztunnel::foreign_listeners(&ns) {
                            Ok(ports) => self.records.foreign_listeners(id, ports),
                            Err(e) => log::warn!("pod {id}: its listeners: {}", e.chain()),
                        }
                    }
                }
                Err(e) => {
                    report.failed.push((id.clone(), e));
                    continue;
                }
            }
            let workload = InPodWorkload {
                uid: spec.uid.clone(),
                info: WorkloadInfo {
                    name: id.name.clone(),
                    namespace: id.namespace.clone(),
                    service_account: spec.service_account.clone(),
                },
                netns: ns,
                ips: spec.ips.clone(),
            };
            redirected.insert(id.clone(), workload);
            report.captured.push(id.clone());
        }
        self.server.set(
            redirected
                .values()
                .map(|w| (w.uid.clone(), w.clone()))
                .collect(),
        );
        for (id, w) in &self.redirected {
            if !redirected.contains_key(id)
                && w.netns.exists()
                && let Err(e) = self.redirection.release(&w.netns)
            {
                log::warn!("{id} left the mesh: {}", e.chain());
            }
        }
        self.redirected = redirected;
        self.records.publish(&self.redirected);
        match &mut self.redirection {
            Redirection::Ebpf(p) => {
                if let Err(e) = p.remove_stale() {
                    log::warn!("removing the programs of pods gone: {}", e.chain());
                }
            }
            // A netns inode is reused once its netns is gone: a new pod's must not pass for
            // one checked lately.
            Redirection::Iptables(r) => r.forget_others(
                &self
                    .redirected
                    .values()
                    .filter_map(|w| netns::inode(&w.netns).ok())
                    .collect(),
            ),
        }
        report.ztunnel = self.ztunnel_state(state);
        Ok(report)
    }

    fn recheck(&mut self, ns: &Path) {
        let Ok(inode) = netns::inode(ns) else { return };
        match &mut self.redirection {
            Redirection::Ebpf(p) => p.recheck(inode),
            Redirection::Iptables(r) => r.recheck(inode),
        }
    }

    fn confirm(&mut self, pod: &PodId, deadline: Instant) -> Result<()> {
        let uid = self
            .redirected
            .get(pod)
            .map(|w| w.uid.clone())
            .ok_or_else(|| Error::NotAcked {
                pod: pod.to_string(),
                why: "not redirected".into(),
            })?;
        self.server
            .wait_acked(&uid, deadline)
            .map_err(|why| Error::NotAcked {
                pod: pod.to_string(),
                why,
            })
    }

    /// The start window is not covered in in-pod mode yet: new veths are not held.
    fn hold(&mut self, _links: &[crate::nl::Link]) -> Result<()> {
        Ok(())
    }

    fn held(&self) -> Result<Vec<u32>> {
        Ok(vec![])
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.server.metrics().register(registry);
        self.records.register(registry);
        if let Redirection::Ebpf(p) = &self.redirection {
            p.register_metrics(registry);
        }
    }
}

/// Which redirection an in-pod agent runs and why, for `zdivert status`:
/// `<state dir>/<node>.inpod-redirection`, written when the agent chooses it.
pub fn choice_file(state_dir: &Path, node: &str) -> std::path::PathBuf {
    state_dir.join(format!("{node}.inpod-redirection"))
}

pub fn record_choice(state_dir: &Path, node: &str, choice: &str) -> Result<()> {
    let path = choice_file(state_dir, node);
    std::fs::create_dir_all(state_dir)
        .and_then(|()| std::fs::write(&path, choice))
        .map_err(|source| crate::error::Error::StateFile { path, source })
}

pub fn read_choice(state_dir: &Path, node: &str) -> Option<String> {
    std::fs::read_to_string(choice_file(state_dir, node)).ok()
}
