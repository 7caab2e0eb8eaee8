//! What every ztunnel of the lab is told, as its local XDS file: workloads from the topology,
//! Services, and AuthorizationPolicies.
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};

use crate::topology::{Pod, Topology, v6_of};

/// An AuthorizationPolicy in ztunnel's own terms: deny (or allow) connections to these
/// destination addresses and ports, for the workloads of `namespace`.
#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub deny: bool,
    pub destination_ips: Vec<IpAddr>,
    pub destination_ports: Vec<u16>,
}

impl Policy {
    /// Denies every connection to `pod`'s `port`, on both of its addresses.
    pub fn deny_port(pod: &Pod, port: u16) -> Policy {
        Policy {
            name: format!("deny-{}-{port}", pod.name),
            namespace: pod.namespace.clone(),
            deny: true,
            destination_ips: vec![pod.ip.into(), pod.ip6.into()],
            destination_ports: vec![port],
        }
    }

    fn xds(&self) -> Value {
        let nets: Vec<String> = self
            .destination_ips
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(_) => format!("{ip}/32"),
                IpAddr::V6(_) => format!("{ip}/128"),
            })
            .collect();
        json!({
            "name": self.name,
            "namespace": self.namespace,
            "scope": "Namespace",
            "action": if self.deny { "Deny" } else { "Allow" },
            "rules": [[[{ "destinationIps": nets, "destinationPorts": self.destination_ports }]]],
        })
    }
}

/// A Service: its VIP and port, and the pods behind it (by name).
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vip: IpAddr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<String>,
}

impl Service {
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// What every ztunnel of the lab is told: workloads, services and policies.
#[derive(Clone, Debug, Default)]
pub struct MeshConfig {
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    /// Workloads with their IPv4 address only. ztunnel 1.22.8 sends a Service's connection to
    /// one of the endpoint's addresses picked at random, either family
    /// (`pick_workload_destination_or_resolve`), so a dual-stack endpoint fails half of the
    /// IPv4 clients' connections.
    pub ipv4_only: bool,
    /// Pods a test starts later (`Node::start_pod`), known to ztunnel from the start, as istiod
    /// pushes a workload as soon as its pod exists.
    pub later: Vec<LaterPod>,
}

#[derive(Clone, Debug)]
pub struct LaterPod {
    /// The node's netns name (`Node::name`).
    pub node: String,
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub ambient: bool,
}

/// A pod's service account, as bookinfo names them: `reviews-v1` runs as `reviews`.
pub fn service_account(pod: &Pod) -> String {
    service_account_of(&pod.name)
}

fn service_account_of(name: &str) -> String {
    match name.rsplit_once("-v") {
        Some((app, v)) if v.chars().all(|c| c.is_ascii_digit()) => app.to_string(),
        _ => name.to_string(),
    }
}

/// The SPIFFE identity ztunnel gives `pod`.
/// The uid the XDS file gives a pod's workload; in-pod ztunnel names pods by it over ZDS.
pub fn workload_uid(pod: &Pod) -> String {
    uid_of(&pod.namespace, &pod.name)
}

fn uid_of(namespace: &str, name: &str) -> String {
    format!("cluster1//v1/Pod/{namespace}/{name}")
}

pub fn identity(pod: &Pod) -> String {
    format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        pod.namespace,
        service_account(pod)
    )
}

impl MeshConfig {
    /// ztunnel's local XDS file (JSON, which ztunnel reads as the YAML it is) for `topo`:
    /// every pod of every node, HBONE for ambient pods and TCP for the rest.
    /// The same for the in-pod build, whose policies carry `dryRun` (1.22.8 rejects the field).
    pub fn xds_in_pod(&self, topo: &Topology) -> String {
        let mut xds = self.xds_value(topo);
        if let Some(policies) = xds["policies"].as_array_mut() {
            for p in policies {
                p["dryRun"] = false.into();
            }
        }
        unquote_numeric_keys(&xds.to_string())
    }

    pub fn xds(&self, topo: &Topology) -> String {
        unquote_numeric_keys(&self.xds_value(topo).to_string())
    }

    fn xds_value(&self, topo: &Topology) -> Value {
        let mut pods: Vec<LaterPod> = topo
            .nodes
            .iter()
            .flat_map(|node| {
                node.pods.values().map(|pod| LaterPod {
                    node: node.name.clone(),
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    ip: pod.ip,
                    ambient: pod.ambient,
                })
            })
            .collect();
        pods.extend(self.later.iter().cloned());
        let mut workloads = vec![];
        for pod in &pods {
            let mut services = serde_json::Map::new();
            for s in self
                .services
                .iter()
                .filter(|s| s.endpoints.contains(&pod.name))
            {
                services.insert(
                    format!("{}/{}", s.namespace, s.hostname()),
                    json!({ s.port.to_string(): s.target_port }),
                );
            }
            workloads.push(json!({
                "uid": uid_of(&pod.namespace, &pod.name),
                "name": pod.name,
                "namespace": pod.namespace,
                "serviceAccount": service_account_of(&pod.name),
                "trustDomain": "cluster.local",
                "workloadIps": if self.ipv4_only {
                    vec![pod.ip.to_string()]
                } else {
                    vec![pod.ip.to_string(), v6_of(pod.ip).to_string()]
                },
                "protocol": if pod.ambient { "HBONE" } else { "TCP" },
                "node": pod.node,
                "network": "",
                "services": services,
            }));
        }
        let services: Vec<Value> = self
            .services
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "namespace": s.namespace,
                    "hostname": s.hostname(),
                    "vips": [format!("/{}", s.vip)],
                    "ports": { s.port.to_string(): s.target_port },
                })
            })
            .collect();
        let policies: Vec<Value> = self.policies.iter().map(Policy::xds).collect();
        json!({ "workloads": workloads, "services": services, "policies": policies })
    }
}

/// JSON object keys are strings, but ztunnel reads port maps as `u16 → u16`: YAML's flow
/// style takes `{9080: 9080}`, so numeric keys lose their quotes. (The values written here
/// hold no escaped quotes.)
fn unquote_numeric_keys(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(at) = rest.find('"') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let end = after.find('"').map_or(after.len(), |e| e);
        let (word, tail) = (&after[..end], after.get(end + 1..).unwrap_or(""));
        if let Some(value) = tail.strip_prefix(':')
            && !word.is_empty()
            && word.bytes().all(|b| b.is_ascii_digit())
        {
            // `{9080:9080}` would be one scalar: a flow mapping needs the space.
            out.push_str(word);
            out.push_str(": ");
            rest = value;
            continue;
        } else {
            out.push('"');
            out.push_str(word);
            out.push('"');
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}
