//! The status annotation istio-cni kept on pods: `ambient.istio.io/redirection: enabled` once a
//! pod's traffic is captured, removed when it no longer is. The user's own `disabled` is never
//! touched. A failed patch is retried on the next pass; it never holds up the dataplane.
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};
use serde_json::json;

use super::{CapturedRx, select::REDIRECTION};
use crate::state::PodId;

/// Passes also run this often without a change, to retry failed patches.
const RETRY: Duration = Duration::from_secs(5);

pub async fn run(
    client: Client,
    pods: Store<Pod>,
    mut captured: CapturedRx,
    mut pods_changed: tokio::sync::watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            r = captured.changed() => if r.is_err() { return },
            r = pods_changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(RETRY) => {}
        }
        let Some(captured) = captured.borrow_and_update().clone() else {
            continue;
        };
        for pod in pods.state() {
            let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name)
            else {
                continue;
            };
            let id = PodId {
                namespace: namespace.clone(),
                name: name.clone(),
            };
            let current = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION))
                .map(String::as_str);
            let value = match (captured.contains(&id), current) {
                (true, Some("enabled")) | (false, None | Some("disabled")) => continue,
                (true, _) => json!("enabled"),
                (false, Some(_)) => serde_json::Value::Null,
            };
            let patch = json!({ "metadata": { "annotations": { REDIRECTION: value } } });
            let api = Api::<Pod>::namespaced(client.clone(), namespace);
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => log::info!(
                    "{id}: {REDIRECTION} {}",
                    if value.is_null() {
                        "removed"
                    } else {
                        "enabled"
                    }
                ),
                Err(e) => log::warn!("{id}: cannot patch {REDIRECTION}: {e}; retrying"),
            }
        }
    }
}
