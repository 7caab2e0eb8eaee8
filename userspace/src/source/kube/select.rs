//! Which pods of this node are ambient, and which pod is this node's ztunnel: a pure function of
//! the API objects, as istio-cni decided it. Everything it leaves out is listed with the reason,
//! so that a pod that "should" be captured and is not can be explained.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::state::{NodeState, PodId, PodSpec, ZtunnelSpec};

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const REDIRECTION: &str = "ambient.istio.io/redirection";
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectConfig {
    pub node: String,
    /// Where the ztunnel DaemonSet runs.
    pub ztunnel_namespace: String,
    /// The label that marks ztunnel pods (`app=ztunnel`).
    pub ztunnel_label: (String, String),
}

impl SelectConfig {
    pub fn new(node: &str, ztunnel_namespace: &str) -> Self {
        SelectConfig {
            node: node.into(),
            ztunnel_namespace: ztunnel_namespace.into(),
            ztunnel_label: ("app".into(), "ztunnel".into()),
        }
    }
}

/// Why a pod of this node is not captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    NotAmbient,
    /// `istio.io/dataplane-mode=none` or `ambient.istio.io/redirection: disabled`.
    OptedOut,
    HostNetwork,
    /// Injected with a sidecar: it has its own redirection.
    Sidecar,
    Ztunnel,
    NoIp,
    /// Succeeded or Failed: its address may already belong to another pod.
    Finished(String),
    OtherNode,
    BadIp(String),
    /// Another pod claims the same address; capturing either could let one pass for the other.
    IpConflict(PodId),
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NotAmbient => write!(f, "not ambient"),
            Skip::OptedOut => write!(f, "opted out"),
            Skip::HostNetwork => write!(f, "hostNetwork"),
            Skip::Sidecar => write!(f, "has a sidecar"),
            Skip::Ztunnel => write!(f, "is a ztunnel"),
            Skip::NoIp => write!(f, "no IP yet"),
            Skip::Finished(phase) => write!(f, "phase {phase}"),
            Skip::OtherNode => write!(f, "on another node"),
            Skip::BadIp(ip) => write!(f, "`{ip}` in status.podIPs is not an IP address"),
            Skip::IpConflict(other) => write!(f, "shares an address with {other}"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// ztunnel's netns is left to the node facts (`None`: found by its address).
    pub state: NodeState,
    pub skipped: BTreeMap<PodId, Skip>,
}

fn id(pod: &Pod) -> PodId {
    PodId {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
    }
}

fn label<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// `status.podIPs`, or `status.podIP` from API servers that predate it.
fn pod_ips(pod: &Pod) -> Result<Vec<IpAddr>, Skip> {
    let status = pod.status.as_ref();
    let listed: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|p| p.ip.as_str()).collect())
        .filter(|v: &Vec<&str>| !v.is_empty())
        .or_else(|| status.and_then(|s| s.pod_ip.as_deref()).map(|ip| vec![ip]))
        .unwrap_or_default();
    if listed.is_empty() {
        return Err(Skip::NoIp);
    }
    listed
        .into_iter()
        .map(|s| s.parse().map_err(|_| Skip::BadIp(s.to_string())))
        .collect()
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_ztunnel(cfg: &SelectConfig, pod: &Pod) -> bool {
    pod.metadata.namespace.as_deref() == Some(cfg.ztunnel_namespace.as_str())
        && label(&pod.metadata, &cfg.ztunnel_label.0) == Some(cfg.ztunnel_label.1.as_str())
}

/// Whether `pod` is an ambient pod; the namespace decides unless the pod says otherwise.
fn ambient(pod: &Pod, namespace: Option<&Namespace>) -> Result<(), Skip> {
    let pod_mode = label(&pod.metadata, DATAPLANE_MODE);
    if pod_mode == Some("none") || annotation(pod, REDIRECTION) == Some("disabled") {
        return Err(Skip::OptedOut);
    }
    let ns_mode = namespace.and_then(|ns| label(&ns.metadata, DATAPLANE_MODE));
    match pod_mode.or(ns_mode) {
        Some("ambient") => Ok(()),
        _ => Err(Skip::NotAmbient),
    }
}

fn capturable(
    cfg: &SelectConfig,
    pod: &Pod,
    namespaces: &HashMap<&str, &Namespace>,
) -> Result<Vec<IpAddr>, Skip> {
    let namespace = pod
        .metadata
        .namespace
        .as_deref()
        .and_then(|n| namespaces.get(n).copied());
    member(cfg, pod, namespace)?;
    pod_ips(pod)
}

/// Whether `pod` (in `namespace`) belongs in the mesh, whatever its addresses: what the CNI
/// plugin's ADD asks before the pod has any. The service account on success.
pub fn member(
    cfg: &SelectConfig,
    pod: &Pod,
    namespace: Option<&Namespace>,
) -> Result<String, Skip> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.node_name.as_deref()) != Some(cfg.node.as_str()) {
        return Err(Skip::OtherNode);
    }
    if is_ztunnel(cfg, pod) {
        return Err(Skip::Ztunnel);
    }
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Err(Skip::HostNetwork);
    }
    if annotation(pod, SIDECAR_STATUS).is_some() {
        return Err(Skip::Sidecar);
    }
    if let Some(p @ ("Succeeded" | "Failed")) = phase(pod) {
        return Err(Skip::Finished(p.into()));
    }
    ambient(pod, namespace)?;
    Ok(spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_default())
}

/// This node's ztunnel: the newest Ready `app=ztunnel` pod in its namespace with an address.
fn ztunnel(cfg: &SelectConfig, pods: &[&Pod]) -> Option<ZtunnelSpec> {
    pods.iter()
        .filter(|p| is_ztunnel(cfg, p))
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(cfg.node.as_str()))
        .filter(|p| is_ready(p) && !matches!(phase(p), Some("Succeeded" | "Failed")))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((*p, pod_ips(p).ok()?)))
        .max_by(|(a, _), (b, _)| {
            (&a.metadata.creation_timestamp, id(a)).cmp(&(&b.metadata.creation_timestamp, id(b)))
        })
        .map(|(p, ips)| ZtunnelSpec {
            pod: id(p),
            ips,
            netns: None,
        })
}

/// The desired state of `cfg.node` from the pods (ideally already node-scoped) and namespaces.
pub fn select(cfg: &SelectConfig, pods: &[&Pod], namespaces: &[&Namespace]) -> Selection {
    let namespaces: HashMap<&str, &Namespace> = namespaces
        .iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, *ns)))
        .collect();
    let mut sel = Selection {
        state: NodeState {
            node: cfg.node.clone(),
            ztunnel: ztunnel(cfg, pods),
            ..NodeState::default()
        },
        skipped: BTreeMap::new(),
    };
    // Which pod (or ztunnel) holds each address; a second live claimant disqualifies both.
    let mut owners: HashMap<IpAddr, PodId> = HashMap::new();
    if let Some(z) = &sel.state.ztunnel {
        owners.extend(z.ips.iter().map(|ip| (*ip, z.pod.clone())));
    }
    for pod in pods {
        let pid = id(pod);
        match capturable(cfg, pod, &namespaces) {
            Ok(ips) => {
                let clash = ips.iter().find_map(|ip| owners.get(ip).cloned());
                if let Some(other) = clash {
                    if sel.state.pods.remove(&other).is_some() {
                        sel.skipped
                            .insert(other.clone(), Skip::IpConflict(pid.clone()));
                    }
                    sel.skipped.insert(pid, Skip::IpConflict(other));
                    continue;
                }
                owners.extend(ips.iter().map(|ip| (*ip, pid.clone())));
                let spec = PodSpec {
                    ips,
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                    service_account: pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_default(),
                    netns: None,
                };
                sel.state.pods.insert(pid, spec);
            }
            Err(why) => {
                // Pods that live outside the mesh: their veths leave the start-window hold.
                if matches!(
                    why,
                    Skip::NotAmbient | Skip::OptedOut | Skip::Sidecar | Skip::Ztunnel
                ) && let Ok(ips) = pod_ips(pod)
                {
                    sel.state.outside.extend(ips);
                }
                sel.skipped.insert(pid, why);
            }
        }
    }
    sel
}

#[cfg(test)]
#[path = "select_tests.rs"]
mod tests;
