//! The CNI plugin's pods in the reconcile loop. A pod the plugin adds is applied at once, with
//! the netns the runtime gave, and stays in the desired state until its DEL: the source learns
//! of it later (its address reaches the API server, then comes back through the watch), and its
//! netns is never looked for by address.
use std::{collections::BTreeMap, sync::mpsc, time::Instant};

use crate::state::{NodeState, PodId, PodSpec};

#[derive(Debug)]
pub enum Command {
    /// Capture the pod (its spec carries the runtime's netns and the addresses IPAM gave).
    Add(PodSpec),
    Del,
    /// Whether the pod is still captured as ADD left it.
    Check,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Add(_) => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

/// One request of the CNI plugin, with where its answer goes.
#[derive(Debug)]
pub struct Request {
    pub pod: PodId,
    pub command: Command,
    /// When the plugin stops waiting: work for it after that is wasted.
    pub deadline: Instant,
    pub reply: mpsc::Sender<Result<(), String>>,
}

impl Request {
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    pub fn answer(self, outcome: Result<(), String>) {
        // The plugin may have given up already; it then retries.
        let _ = self.reply.send(outcome);
    }
}

/// The pods the plugin added, by pod.
#[derive(Debug, Default)]
pub struct Overlay {
    pods: BTreeMap<PodId, PodSpec>,
}

impl Overlay {
    pub fn add(&mut self, pod: PodId, spec: PodSpec) {
        self.pods.insert(pod, spec);
    }

    pub fn remove(&mut self, pod: &PodId) {
        self.pods.remove(pod);
    }

    pub fn contains(&self, pod: &PodId) -> bool {
        self.pods.contains_key(pod)
    }

    /// The source's `state` with the plugin's pods: a pod the source does not list yet, or
    /// lists with another uid (a StatefulSet pod's previous incarnation), is the plugin's; one
    /// it lists as the same pod takes the plugin's netns. A pod the source has since put
    /// outside the mesh (relabelled) leaves it.
    pub fn merge(&mut self, state: &NodeState) -> NodeState {
        self.pods
            .retain(|_, spec| !spec.ips.iter().any(|ip| state.outside.contains(ip)));
        let mut merged = state.clone();
        for (pod, added) in &self.pods {
            match merged.pods.get_mut(pod) {
                Some(listed) if listed.uid == added.uid => listed.netns = added.netns.clone(),
                _ => {
                    merged.pods.insert(pod.clone(), added.clone());
                }
            }
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodId {
        PodId {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn spec(uid: &str, ip: &str, netns: Option<&str>) -> PodSpec {
        PodSpec {
            ips: vec![ip.parse().unwrap()],
            uid: uid.into(),
            service_account: "sa".into(),
            netns: netns.map(Into::into),
        }
    }

    #[test]
    fn the_plugins_pods_join_the_sources_with_the_runtimes_netns() {
        let mut source = NodeState::default();
        source
            .pods
            .insert(pod("listed"), spec("u1", "10.0.0.1", None));
        source
            .pods
            .insert(pod("reborn"), spec("old", "10.0.0.2", None));
        let mut overlay = Overlay::default();
        overlay.add(pod("listed"), spec("u1", "10.0.0.1", Some("/run/netns/a")));
        overlay.add(pod("reborn"), spec("new", "10.0.0.9", Some("/run/netns/b")));
        overlay.add(pod("unknown"), spec("u3", "10.0.0.3", Some("/run/netns/c")));
        let merged = overlay.merge(&source);
        assert_eq!(
            merged.pods[&pod("listed")],
            spec("u1", "10.0.0.1", Some("/run/netns/a"))
        );
        // The source still has the previous pod of that name: the runtime's is the live one.
        assert_eq!(
            merged.pods[&pod("reborn")],
            spec("new", "10.0.0.9", Some("/run/netns/b"))
        );
        assert_eq!(
            merged.pods[&pod("unknown")],
            spec("u3", "10.0.0.3", Some("/run/netns/c"))
        );
    }

    #[test]
    fn a_pod_the_source_puts_outside_leaves_the_overlay() {
        let mut source = NodeState::default();
        source.outside.insert("10.0.0.3".parse().unwrap());
        let mut overlay = Overlay::default();
        overlay.add(
            pod("relabelled"),
            spec("u3", "10.0.0.3", Some("/run/netns/c")),
        );
        assert!(!overlay.merge(&source).pods.contains_key(&pod("relabelled")));
        assert!(!overlay.contains(&pod("relabelled")));
    }
}
