//! The Kubernetes source: a node-scoped reflector on pods (`spec.nodeName=$NODE_NAME`) and one on
//! namespaces, feeding the pure [`select::select`]. Nothing is sent before both have listed
//! once; during a relist (410 Gone, a dropped watch) the reflectors keep serving the previous
//! list until the new one is complete, and while the API server is unreachable nothing is sent
//! at all: the kernel keeps the last good state.
use std::{
    sync::{Arc, mpsc::Sender},
    time::Duration,
};

use futures::{StreamExt as _, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _, reflector,
        utils::ResetTimerBackoff,
        watcher::{self, Event, watcher},
    },
};

use crate::{agent::health::Health, state::NodeState};

/// The pods captured by the last successful apply (`None` before the first).
pub type CapturedRx =
    tokio::sync::watch::Receiver<Option<std::collections::BTreeSet<crate::state::PodId>>>;

pub mod annotate;
pub mod select;

use select::{SelectConfig, select};

/// Retries of a failed list or watch: quick at first, doubling to at most 5 s, back to quick
/// after a minute without errors; with jitter (up to the delay again), so that a DaemonSet's
/// agents do not all retry in the same instant after an API server outage.
fn backoff() -> ResetTimerBackoff<watcher::ExponentialBackoff> {
    let jittered = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(jittered.into(), Duration::from_secs(60))
}

/// What one watcher event means here, once its reflector has stored it: which resource, and
/// whether the stores are settled (see [`settled`]) or the watch failed.
type Change = (Resource, Result<Option<bool>, watcher::Error>);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Resource {
    Pods,
    Namespaces,
}

/// Watches until the runtime stops, sending each new desired state. With `captured` (the pods
/// the dataplane captured after each apply), also keeps the pods' status annotation in step.
pub async fn run(
    client: Client,
    cfg: SelectConfig,
    states: Sender<crate::agent::Input>,
    health: Arc<Health>,
    captured: Option<CapturedRx>,
) {
    let node_pods = watcher::Config::default().fields(&format!("spec.nodeName={}", cfg.node));
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let (pods_changed, pods_changed_rx) = tokio::sync::watch::channel(());
    if let Some(captured) = captured {
        tokio::spawn(annotate::run(
            client.clone(),
            pod_store.clone(),
            captured,
            pods_changed_rx,
        ));
    }
    let pods = reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), node_pods),
    )
    .backoff(backoff())
    .map(|r| -> Change { (Resource::Pods, r.map(|e| settled(&e))) });
    let namespaces = reflector(
        ns_writer,
        watcher(Api::<Namespace>::all(client), watcher::Config::default()),
    )
    .backoff(backoff())
    .map(|r| -> Change { (Resource::Namespaces, r.map(|e| settled(&e))) });
    let mut changes = std::pin::pin!(stream::select(pods, namespaces));
    let (mut pods_listed, mut namespaces_listed) = (false, false);
    let mut last: Option<NodeState> = None;
    while let Some((resource, settled)) = changes.next().await {
        let listed = match resource {
            Resource::Pods => &mut pods_listed,
            Resource::Namespaces => &mut namespaces_listed,
        };
        match settled {
            Err(e) => {
                health.source_error();
                log::warn!(
                    "watch on {resource:?}: {e}; the kernel keeps its state while this retries"
                );
                continue;
            }
            // Half a relist: the store still holds the previous complete list.
            Ok(None) => continue,
            Ok(Some(init_done)) => *listed |= init_done,
        }
        if !(pods_listed && namespaces_listed) {
            continue;
        }
        let pods = pod_store.state();
        let nss = ns_store.state();
        let sel = select(
            &cfg,
            &pods.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
            &nss.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        );
        pods_changed.send_replace(());
        if last.as_ref() == Some(&sel.state) {
            continue;
        }
        for (pod, why) in &sel.skipped {
            log::debug!("{pod}: not captured: {why}");
        }
        if states.send(sel.state.clone().into()).is_err() {
            return;
        }
        last = Some(sel.state);
    }
}

/// Whether the stores are settled after `event`: `None` in the middle of a (re)list, else
/// `Some(true)` when a list just completed.
fn settled<K>(event: &Event<K>) -> Option<bool> {
    match event {
        Event::Init | Event::InitApply(_) => None,
        Event::InitDone => Some(true),
        Event::Apply(_) | Event::Delete(_) => Some(false),
    }
}
