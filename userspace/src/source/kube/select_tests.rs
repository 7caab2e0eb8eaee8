//! The selection rules, table by table.
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
                let got = sel
                    .state
                    .pods
                    .get(&id)
                    .unwrap_or_else(|| panic!("{id} not captured: {:?}", sel.skipped.get(&id)));
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
                let mut p = ztunnel_pod("z-elsewhere", "10.244.1.10", "2026-01-01T00:00:00Z", true);
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

#[test]
fn pods_outside_the_mesh_are_listed_so_their_new_veths_are_released() {
    let namespaces = [ns("ambient", Some("ambient")), ns("plain", None)];
    let pods = [
        pod("ambient", "a", "10.244.2.3", json!({})),
        pod("plain", "b", "10.244.2.4", json!({})),
        pod(
            "ambient",
            "opted-out",
            "10.244.2.5",
            json!({ "metadata": { "labels": { DATAPLANE_MODE: "none" } } }),
        ),
        ztunnel_pod("ztunnel-new", "10.244.2.9", "2026-01-02T00:00:00Z", false),
        // Finished: its address may be another pod's by now, so it releases nothing.
        pod(
            "plain",
            "done",
            "10.244.2.6",
            json!({ "status": { "phase": "Succeeded" } }),
        ),
        // Two ambient pods on one address: neither is captured, and neither releases its veth.
        pod("ambient", "c1", "10.244.2.7", json!({})),
        pod("ambient", "c2", "10.244.2.7", json!({})),
    ];
    let sel = run(&pods, &namespaces);
    let outside: Vec<String> = sel.state.outside.iter().map(|ip| ip.to_string()).collect();
    assert_eq!(outside, ["10.244.2.4", "10.244.2.5", "10.244.2.9"]);
    assert!(
        sel.state.held_links.is_empty(),
        "a source never holds links"
    );
}
