//! The CNI plugin's pods in the reconcile loop. A pod the plugin adds is applied at once, with
//! the netns the runtime gave, and stays in the desired state until its DEL: the source learns
//! of it later (its address reaches the API server, then comes back through the watch), and its
//! netns is never looked for by address.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Instant,
};

use crate::state::{NodeState, PodId, PodSpec};

#[derive(Debug)]
pub enum Command {
    /// Capture the pod (its spec carries the runtime's netns and the addresses IPAM gave).
    Add(PodSpec),
    /// A pod outside the mesh started in this netns: nothing to do but remember whose it is.
    Outside(PathBuf),
    Del,
    /// Whether the pod is still captured as ADD left it.
    Check,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Add(_) | Command::Outside(_) => "ADD",
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

/// The pods the plugin added, by pod; kept in a file (`--state-dir`), so that a restarted
/// agent still knows which netns the runtime gave each pod: the plugin does not ADD them again.
#[derive(Debug, Default)]
pub struct Overlay {
    pods: BTreeMap<PodId, PodSpec>,
    /// Pods outside the mesh, by their netns.
    outside: BTreeMap<PodId, PathBuf>,
    file: Option<PathBuf>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    pod: PodId,
    spec: PodSpec,
    #[serde(default)]
    outside: bool,
}

impl Overlay {
    /// The pods an earlier agent kept in `file`, whose netns are still there.
    pub fn load(file: PathBuf) -> Overlay {
        let saved: Vec<Saved> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::warn!(
                    "cni: {}: {e}; starting without the plugin's pods",
                    file.display()
                );
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                log::warn!("cni: {}: {e}", file.display());
                Vec::new()
            }
        };
        let mut overlay = Overlay {
            file: Some(file),
            ..Overlay::default()
        };
        for s in saved {
            match (s.spec.netns.clone(), s.outside) {
                (Some(netns), _) if !netns.exists() => {}
                (Some(netns), true) => {
                    overlay.outside.insert(s.pod, netns);
                }
                (Some(_), false) => {
                    overlay.pods.insert(s.pod, s.spec);
                }
                (None, _) => {}
            }
        }
        overlay
    }

    /// The file where the pods are kept.
    pub fn file_for(state_dir: &Path, node: &str) -> PathBuf {
        state_dir.join(format!("{node}.cni-pods.json"))
    }

    /// Writes the pods to the file, replaced whole. A failed write is logged: the pods stay
    /// in memory, and an agent restarted meanwhile falls back to the address scan for them.
    fn save(&self) {
        let Some(file) = &self.file else { return };
        let ambient = self.pods.iter().map(|(pod, spec)| Saved {
            pod: pod.clone(),
            spec: spec.clone(),
            outside: false,
        });
        let outside = self.outside.iter().map(|(pod, netns)| Saved {
            pod: pod.clone(),
            spec: PodSpec {
                netns: Some(netns.clone()),
                ..PodSpec::default()
            },
            outside: true,
        });
        let saved: Vec<Saved> = ambient.chain(outside).collect();
        let tmp = file.with_extension("tmp");
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&tmp, bytes)
            })
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = written {
            log::warn!("cni: keeping the plugin's pods in {}: {e}", file.display());
        }
    }

    pub fn add(&mut self, pod: PodId, spec: PodSpec) {
        self.outside.remove(&pod);
        self.pods.insert(pod, spec);
        self.save();
    }

    pub fn add_outside(&mut self, pod: PodId, netns: PathBuf) {
        self.pods.remove(&pod);
        self.outside.insert(pod, netns);
        self.save();
    }

    pub fn remove(&mut self, pod: &PodId) {
        let had = self.pods.remove(pod).is_some() | self.outside.remove(pod).is_some();
        if had {
            self.save();
        }
    }

    pub fn contains(&self, pod: &PodId) -> bool {
        self.pods.contains_key(pod)
    }

    /// The source's `state` with the plugin's pods: a pod the source does not list yet, or
    /// lists with another uid (a StatefulSet pod's previous incarnation), is the plugin's; one
    /// it lists as the same pod takes the plugin's netns. A pod the source has since put
    /// outside the mesh (relabelled) leaves it.
    pub fn merge(&mut self, state: &NodeState) -> NodeState {
        let relabelled: Vec<PodId> = self
            .pods
            .iter()
            .filter(|(_, spec)| spec.ips.iter().any(|ip| state.outside.contains(ip)))
            .map(|(pod, _)| pod.clone())
            .collect();
        let relabelled_none = relabelled.is_empty();
        for pod in relabelled {
            if let Some(netns) = self.pods.remove(&pod).and_then(|s| s.netns) {
                self.outside.insert(pod, netns);
            }
        }
        if !relabelled_none {
            self.save();
        }
        let mut merged = state.clone();
        merged.sandboxes = self.outside.clone();
        for (pod, added) in &self.pods {
            if let Some(netns) = &added.netns {
                merged.sandboxes.insert(pod.clone(), netns.clone());
            }
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
    fn a_restarted_agent_finds_the_pods_whose_netns_are_still_there() {
        let dir = std::env::temp_dir().join(format!("zdivert-overlay-{}", std::process::id()));
        let file = dir.join("node.cni-pods.json");
        let mut overlay = Overlay::load(file.clone());
        overlay.add(
            pod("alive"),
            spec("u1", "10.0.0.1", Some("/proc/self/ns/net")),
        );
        overlay.add(
            pod("gone"),
            spec("u2", "10.0.0.2", Some("/proc/self/ns/no-such")),
        );
        let reloaded = Overlay::load(file.clone());
        assert!(reloaded.contains(&pod("alive")));
        assert!(
            !reloaded.contains(&pod("gone")),
            "its sandbox went while no agent ran"
        );
        overlay.remove(&pod("alive"));
        assert!(!Overlay::load(file).contains(&pod("alive")));
        std::fs::remove_dir_all(dir).unwrap();
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
        let merged = overlay.merge(&source);
        assert!(!merged.pods.contains_key(&pod("relabelled")));
        assert!(!overlay.contains(&pod("relabelled")));
        // Its netns is still its own: no other pod is given it by address.
        assert_eq!(
            merged.sandboxes[&pod("relabelled")],
            PathBuf::from("/run/netns/c")
        );
    }
}
