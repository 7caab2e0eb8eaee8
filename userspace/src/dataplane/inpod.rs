//! In-pod mode (`--ztunnel-mode inpod`): ztunnel opens its listeners inside each ambient pod's
//! netns, which this dataplane hands it over ZDS, and the pod's traffic is redirected there with
//! istio-cni's rules (`iptables::inpod`). The rules go in before the `add`, so a pod is never
//! handed over unredirected; until ztunnel listens, its redirected TCP is refused (fail closed).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use super::{
    Dataplane, Report, ZtunnelState,
    iptables::{Backend, inpod},
};
use crate::{
    error::{Error, Result},
    netns,
    state::{NodeState, PodId},
    zds::{InPodWorkload, Server, WorkloadInfo},
};

pub struct InPod {
    server: Server,
    backend: Backend,
    dns_capture: bool,
    /// Pods whose netns holds our rules, and where.
    redirected: BTreeMap<PodId, PathBuf>,
}

impl InPod {
    pub fn new(socket: &Path, dns_capture: bool) -> Result<InPod> {
        let server = Server::start(socket).map_err(|source| Error::Zds {
            path: socket.into(),
            source,
        })?;
        Ok(InPod {
            server,
            backend: {
                let (backend, why) = super::iptables::detect_backend();
                log::info!("iptables backend {backend:?}: {why}");
                backend
            },
            dns_capture,
            redirected: BTreeMap::new(),
        })
    }

    fn ztunnel_state(&self, state: &NodeState) -> ZtunnelState {
        let peers = self.server.peers().len();
        if peers == 0 {
            return ZtunnelState::Absent;
        }
        let pod = state.ztunnel.as_ref().map_or_else(
            || PodId {
                namespace: "istio-system".into(),
                name: "ztunnel".into(),
            },
            |z| z.pod.clone(),
        );
        // ztunnel listens in every pod it serves; the first one stands for all.
        let Some(netns) = self.redirected.values().next() else {
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
        "in-pod (iptables)"
    }

    fn apply(&mut self, state: &NodeState) -> Result<Report> {
        let mut report = Report::default();
        let mut workloads = BTreeMap::new();
        let mut redirected = BTreeMap::new();
        for (id, spec) in &state.pods {
            let found = spec
                .netns
                .clone()
                .or_else(|| spec.ips.iter().find_map(|ip| netns::holding(*ip)));
            let Some(ns) = found else {
                report.failed.push((
                    id.clone(),
                    Error::PodNetnsNotFound {
                        pod: id.to_string(),
                    },
                ));
                continue;
            };
            if let Err(e) = inpod::apply(&ns, self.backend, self.dns_capture) {
                report.failed.push((id.clone(), e));
                continue;
            }
            let workload = InPodWorkload {
                uid: spec.uid.clone(),
                info: WorkloadInfo {
                    name: id.name.clone(),
                    namespace: id.namespace.clone(),
                    service_account: spec.service_account.clone(),
                },
                netns: ns.clone(),
            };
            workloads.insert(spec.uid.clone(), workload);
            redirected.insert(id.clone(), ns);
            report.captured.push(id.clone());
        }
        self.server.set(workloads);
        for (id, ns) in &self.redirected {
            if !redirected.contains_key(id)
                && ns.exists()
                && let Err(e) = inpod::remove(ns, self.backend)
            {
                log::warn!("{id} left the mesh: {}", e.chain());
            }
        }
        self.redirected = redirected;
        report.ztunnel = self.ztunnel_state(state);
        Ok(report)
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
    }
}
