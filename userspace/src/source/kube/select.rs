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
fn ambient(pod: &Pod, namespaces: &HashMap<&str, &Namespace>) -> Result<(), Skip> {
    let pod_mode = label(&pod.metadata, DATAPLANE_MODE);
    if pod_mode == Some("none") || annotation(pod, REDIRECTION) == Some("disabled") {
        return Err(Skip::OptedOut);
    }
    let ns_mode = pod
        .metadata
        .namespace
        .as_deref()
        .and_then(|n| namespaces.get(n))
        .and_then(|ns| label(&ns.metadata, DATAPLANE_MODE));
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
    ambient(pod, namespaces)?;
    pod_ips(pod)
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
            pods: BTreeMap::new(),
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
                sel.state.pods.insert(pid, PodSpec { ips });
            }
            Err(why) => {
                sel.skipped.insert(pid, why);
            }
        }
    }
    sel
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const NODE: &str = "ambient-worker2";

    /// A pod on NODE, Running, with one IPv4 address; `patch` is merged over it.
    fn pod(ns: &str, name: &str, ip: &str, patch: Value) -> Pod {
        let mut v = json!({
            "metadata": { "namespace": ns, "name": name, "creationTimestamp": "2026-01-01T00:00:00Z" },
            "spec": { "nodeName": NODE, "containers": [] },
            "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
        });
        merge(&mut v, patch);
        serde_json::from_value(v).unwrap()
    }

    fn merge(base: &mut Value, patch: Value) {
        match (base, patch) {
            (Value::Object(b), Value::Object(p)) => {
                for (k, v) in p {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    fn ns(name: &str, mode: Option<&str>) -> Namespace {
        let labels = mode
            .map(|m| json!({ DATAPLANE_MODE: m }))
            .unwrap_or(json!({}));
        serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } })).unwrap()
    }

    fn ztunnel_pod(name: &str, ip: &str, created: &str, ready: bool) -> Pod {
        pod(
            "istio-system",
            name,
            ip,
            json!({
                "metadata": { "labels": { "app": "ztunnel" }, "creationTimestamp": created },
                "status": { "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }] },
            }),
        )
    }

    fn run(pods: &[Pod], namespaces: &[Namespace]) -> Selection {
        let cfg = SelectConfig::new(NODE, "istio-system");
        select(
            &cfg,
            &pods.iter().collect::<Vec<_>>(),
            &namespaces.iter().collect::<Vec<_>>(),
        )
    }

    fn pid(ns: &str, name: &str) -> PodId {
        PodId {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn selection_rules() {
        let namespaces = [
            ns("ambient", Some("ambient")),
            ns("plain", None),
            ns("other", Some("sidecar")),
        ];
        // (pod, expected: Ok = captured with these IPs, Err = skipped for this reason)
        let cases: Vec<(Pod, Result<Vec<&str>, Skip>)> = vec![
            (
                pod("ambient", "a", "10.244.2.3", json!({})),
                Ok(vec!["10.244.2.3"]),
            ),
            (
                pod("plain", "b", "10.244.2.4", json!({})),
                Err(Skip::NotAmbient),
            ),
            (
                pod("other", "c", "10.244.2.5", json!({})),
                Err(Skip::NotAmbient),
            ),
            (
                pod("unlisted-ns", "d", "10.244.2.6", json!({})),
                Err(Skip::NotAmbient),
            ),
            (
                pod(
                    "plain",
                    "pod-label",
                    "10.244.2.7",
                    json!({ "metadata": { "labels": { DATAPLANE_MODE: "ambient" } } }),
                ),
                Ok(vec!["10.244.2.7"]),
            ),
            (
                pod(
                    "ambient",
                    "label-none",
                    "10.244.2.8",
                    json!({ "metadata": { "labels": { DATAPLANE_MODE: "none" } } }),
                ),
                Err(Skip::OptedOut),
            ),
            (
                pod(
                    "ambient",
                    "annot-disabled",
                    "10.244.2.9",
                    json!({ "metadata": { "annotations": { REDIRECTION: "disabled" } } }),
                ),
                Err(Skip::OptedOut),
            ),
            (
                // Our own status annotation is not an opt-in or opt-out.
                pod(
                    "ambient",
                    "annot-enabled",
                    "10.244.2.11",
                    json!({ "metadata": { "annotations": { REDIRECTION: "enabled" } } }),
                ),
                Ok(vec!["10.244.2.11"]),
            ),
            (
                pod(
                    "ambient",
                    "host-net",
                    "172.18.0.3",
                    json!({ "spec": { "hostNetwork": true } }),
                ),
                Err(Skip::HostNetwork),
            ),
            (
                pod(
                    "ambient",
                    "sidecar",
                    "10.244.2.12",
                    json!({ "metadata": { "annotations": { SIDECAR_STATUS: "{}" } } }),
                ),
                Err(Skip::Sidecar),
            ),
            (
                pod(
                    "ambient",
                    "pending",
                    "",
                    json!({ "status": { "phase": "Pending", "podIP": null, "podIPs": null } }),
                ),
                Err(Skip::NoIp),
            ),
            (
                pod(
                    "ambient",
                    "done",
                    "10.244.2.13",
                    json!({ "status": { "phase": "Succeeded" } }),
                ),
                Err(Skip::Finished("Succeeded".into())),
            ),
            (
                pod(
                    "ambient",
                    "crashed",
                    "10.244.2.14",
                    json!({ "status": { "phase": "Failed" } }),
                ),
                Err(Skip::Finished("Failed".into())),
            ),
            (
                pod(
                    "ambient",
                    "elsewhere",
                    "10.244.1.3",
                    json!({ "spec": { "nodeName": "ambient-worker" } }),
                ),
                Err(Skip::OtherNode),
            ),
            (
                pod(
                    "ambient",
                    "dual",
                    "10.244.2.15",
                    json!({ "status": { "podIPs": [{ "ip": "10.244.2.15" }, { "ip": "fd00:10:244:2::f" }] } }),
                ),
                Ok(vec!["10.244.2.15", "fd00:10:244:2::f"]),
            ),
            (
                pod(
                    "ambient",
                    "old-api",
                    "10.244.2.16",
                    json!({ "status": { "podIPs": null } }),
                ),
                Ok(vec!["10.244.2.16"]),
            ),
            (
                pod("ambient", "garbage", "10.244.2.300", json!({})),
                Err(Skip::BadIp("10.244.2.300".into())),
            ),
            (
                // Terminating pods keep running until they are gone: still captured.
                pod(
                    "ambient",
                    "terminating",
                    "10.244.2.17",
                    json!({ "metadata": { "deletionTimestamp": "2026-01-01T00:01:00Z" } }),
                ),
                Ok(vec!["10.244.2.17"]),
            ),
            (
                ztunnel_pod("ztunnel-x", "10.244.2.10", "2026-01-01T00:00:00Z", true),
                Err(Skip::Ztunnel),
            ),
        ];
        let pods: Vec<Pod> = cases.iter().map(|(p, _)| p.clone()).collect();
        let sel = run(&pods, &namespaces);
        for (p, want) in &cases {
            let id = id(p);
            match want {
                Ok(ips) => {
                    let got =
                        sel.state.pods.get(&id).unwrap_or_else(|| {
                            panic!("{id} not captured: {:?}", sel.skipped.get(&id))
                        });
                    let want: Vec<IpAddr> = ips.iter().map(|s| s.parse().unwrap()).collect();
                    assert_eq!(got.ips, want, "{id}");
                }
                Err(why) => {
                    assert!(
                        !sel.state.pods.contains_key(&id),
                        "{id} captured, want skipped: {why}"
                    );
                    assert_eq!(sel.skipped.get(&id), Some(why), "{id}");
                }
            }
        }
        assert_eq!(sel.state.node, NODE);
        assert_eq!(
            sel.state.ztunnel.as_ref().map(|z| z.pod.clone()),
            Some(pid("istio-system", "ztunnel-x"))
        );
    }

    #[test]
    fn ztunnel_is_the_newest_ready_one_on_this_node() {
        let cases: Vec<(Vec<Pod>, Option<&str>)> = vec![
            (vec![], None),
            (
                vec![ztunnel_pod(
                    "z-old",
                    "10.244.2.10",
                    "2026-01-01T00:00:00Z",
                    true,
                )],
                Some("z-old"),
            ),
            (
                vec![
                    ztunnel_pod("z-old", "10.244.2.10", "2026-01-01T00:00:00Z", true),
                    ztunnel_pod("z-new", "10.244.2.20", "2026-01-02T00:00:00Z", true),
                ],
                Some("z-new"),
            ),
            (
                // A newer one that is not Ready yet does not take over.
                vec![
                    ztunnel_pod("z-old", "10.244.2.10", "2026-01-01T00:00:00Z", true),
                    ztunnel_pod("z-new", "10.244.2.20", "2026-01-02T00:00:00Z", false),
                ],
                Some("z-old"),
            ),
            (
                vec![ztunnel_pod(
                    "z",
                    "10.244.2.10",
                    "2026-01-01T00:00:00Z",
                    false,
                )],
                None,
            ),
            (
                vec![{
                    let mut p =
                        ztunnel_pod("z-terminating", "10.244.2.10", "2026-01-01T00:00:00Z", true);
                    p.metadata.deletion_timestamp =
                        serde_json::from_value(json!("2026-01-01T00:05:00Z")).unwrap();
                    p
                }],
                None,
            ),
            (
                vec![{
                    let mut p =
                        ztunnel_pod("z-elsewhere", "10.244.1.10", "2026-01-01T00:00:00Z", true);
                    p.spec.as_mut().unwrap().node_name = Some("ambient-worker".into());
                    p
                }],
                None,
            ),
            (
                // app=ztunnel outside the configured namespace is an ordinary pod.
                vec![pod(
                    "default",
                    "fake",
                    "10.244.2.10",
                    json!({ "metadata": { "labels": { "app": "ztunnel" } }, "status": { "conditions": [{ "type": "Ready", "status": "True" }] } }),
                )],
                None,
            ),
        ];
        for (pods, want) in cases {
            let names: Vec<_> = pods.iter().map(|p| id(p).name).collect();
            let got = run(&pods, &[]).state.ztunnel.map(|z| z.pod.name);
            assert_eq!(got.as_deref(), want, "pods {names:?}");
        }
    }

    #[test]
    fn an_address_claimed_twice_captures_neither() {
        let namespaces = [ns("ambient", Some("ambient"))];
        let pods = [
            pod("ambient", "a", "10.244.2.3", json!({})),
            pod("ambient", "b", "10.244.2.3", json!({})),
            pod("ambient", "c", "10.244.2.4", json!({})),
            // Claims ztunnel's address: skipped, ztunnel stays.
            pod("ambient", "d", "10.244.2.10", json!({})),
            ztunnel_pod("z", "10.244.2.10", "2026-01-01T00:00:00Z", true),
        ];
        let sel = run(&pods, &namespaces);
        assert_eq!(
            sel.state.pods.keys().cloned().collect::<Vec<_>>(),
            vec![pid("ambient", "c")]
        );
        assert_eq!(
            sel.skipped[&pid("ambient", "a")],
            Skip::IpConflict(pid("ambient", "b"))
        );
        assert_eq!(
            sel.skipped[&pid("ambient", "b")],
            Skip::IpConflict(pid("ambient", "a"))
        );
        assert_eq!(
            sel.skipped[&pid("ambient", "d")],
            Skip::IpConflict(pid("istio-system", "z"))
        );
        assert_eq!(sel.state.ztunnel.unwrap().pod, pid("istio-system", "z"));
    }
}
