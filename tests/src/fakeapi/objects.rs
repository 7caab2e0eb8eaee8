//! API objects for the simulated nodes: what a cluster would show for the article's pods.
use serde_json::{Value, json};

use crate::topology::{Node, Pod};

pub fn namespace(name: &str, dataplane_mode: Option<&str>) -> Value {
    let labels = match dataplane_mode {
        Some(mode) => json!({ "istio.io/dataplane-mode": mode }),
        None => json!({}),
    };
    json!({ "kind": "Namespace", "apiVersion": "v1",
            "metadata": { "name": name, "labels": labels }, "status": { "phase": "Active" } })
}

/// A Running, Ready pod scheduled on `node` with these addresses.
pub fn pod_on(node: &str, namespace: &str, name: &str, ips: &[String]) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({ "ip": ip })).collect();
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": { "namespace": namespace, "name": name, "labels": { "app": name } },
        "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "app" }] },
        "status": {
            "phase": "Running",
            "podIP": ips.first(),
            "podIPs": pod_ips,
            "conditions": [{ "type": "Ready", "status": "True" }],
        },
    })
}

/// A simulated pod of `node`, with its two addresses, and the uid and service account the
/// mesh's XDS gives it (in-pod ztunnel knows a pod handed to it by its uid).
pub fn pod(node: &Node, p: &Pod) -> Value {
    let mut v = pod_on(
        &node.name,
        &p.namespace,
        &p.name,
        &[p.ip.to_string(), p.ip6.to_string()],
    );
    v["metadata"]["uid"] = crate::ztunnel::workload_uid(p).into();
    v["spec"]["serviceAccountName"] = crate::ztunnel::service_account(p).into();
    v
}

/// The node's ztunnel pod: `app=ztunnel` in istio-system, Ready.
pub fn ztunnel(node: &Node) -> Value {
    let z = &node.ztunnel;
    let name = format!("ztunnel-{}", node.article_name);
    ztunnel_on(&node.name, &name, &[z.ip.to_string(), z.ip6.to_string()])
}

pub fn ztunnel_on(node: &str, name: &str, ips: &[String]) -> Value {
    let mut z = pod_on(node, "istio-system", name, ips);
    z["metadata"]["labels"] = json!({ "app": "ztunnel" });
    z
}

/// Everything on `node`: its namespaces (unlabelled), its pods and its ztunnel.
pub fn node_objects(node: &Node) -> Vec<Value> {
    let mut namespaces: Vec<&str> = node.pods.values().map(|p| p.namespace.as_str()).collect();
    namespaces.push("istio-system");
    namespaces.sort();
    namespaces.dedup();
    let mut out: Vec<Value> = namespaces.into_iter().map(|n| namespace(n, None)).collect();
    out.extend(node.pods.values().map(|p| pod(node, p)));
    out.push(ztunnel(node));
    out
}
