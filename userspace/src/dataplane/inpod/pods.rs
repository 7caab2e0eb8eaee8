//! Each redirected pod as `zdivert status` shows it, with what its own processes did against
//! its redirection: every time a recheck found part of it gone from the kernel and put it back,
//! and the listeners on ztunnel's ports that are not ztunnel's. A pod that fights back (deletes
//! its redirection in a loop, binds ztunnel's ports) degrades only itself, and is named in the
//! log, in `zdivert_pod_redirections_repaired_total{namespace,pod}` and
//! `zdivert_pod_foreign_listeners{namespace,pod}`, and in status.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Instant,
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use crate::{state::PodId, zds::InPodWorkload};

type Labels = Vec<(&'static str, String)>;

const LISTENERS_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// One pod in the file `zdivert status` reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub pod: String,
    pub netns: PathBuf,
    /// Times part of its redirection was found gone and put back.
    pub repairs: u64,
    /// ztunnel's ports on which something else of the pod's listens.
    #[serde(default)]
    pub foreign_listeners: Vec<u16>,
}

/// `<state dir>/<node>.inpod-pods.json`, replaced whole after each apply that changed it.
pub fn file(state_dir: &Path, node: &str) -> PathBuf {
    state_dir.join(format!("{node}.inpod-pods.json"))
}

pub fn read(state_dir: &Path, node: &str) -> Option<Vec<PodRecord>> {
    let text = std::fs::read_to_string(file(state_dir, node)).ok()?;
    serde_json::from_str(&text).ok()
}

/// `read`, as `zdivert status` prints it.
pub fn render(records: &[PodRecord]) -> String {
    let mut s = format!("pods redirected: {}\n", records.len());
    for r in records {
        let repairs = match r.repairs {
            0 => String::new(),
            n => format!(", its redirection put back {n} times"),
        };
        let squatted = match r.foreign_listeners.as_slice() {
            [] => String::new(),
            ports => format!(
                ", something not ztunnel listens on {}",
                ports
                    .iter()
                    .map(|p| format!(":{p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        s += &format!(
            "  {} (netns {}){repairs}{squatted}\n",
            r.pod,
            r.netns.display()
        );
    }
    s
}

pub struct PodRecords {
    file: PathBuf,
    repairs: BTreeMap<PodId, u64>,
    metric: Family<Labels, Counter>,
    foreign: BTreeMap<PodId, BTreeSet<u16>>,
    foreign_metric: Family<Labels, Gauge>,
    /// When each pod's listeners were last looked at.
    listeners_checked: BTreeMap<PodId, Instant>,
    written: Option<Vec<PodRecord>>,
}

impl PodRecords {
    pub fn new(file: PathBuf) -> PodRecords {
        PodRecords {
            file,
            repairs: BTreeMap::new(),
            metric: Family::default(),
            foreign: BTreeMap::new(),
            foreign_metric: Family::default(),
            listeners_checked: BTreeMap::new(),
            written: None,
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "pod_redirections_repaired",
            "Times part of a pod's redirection was found gone from the kernel and put back, \
             by pod (a process in the pod with NET_ADMIN took it away)",
            self.metric.clone(),
        );
        registry.register(
            "pod_foreign_listeners",
            "Listeners on ztunnel's ports in a pod that are not ztunnel's (without its mark), by \
             pod: a process there hopes to take what is captured for ztunnel",
            self.foreign_metric.clone(),
        );
    }

    /// Whether `id`'s listeners are due to be looked at again: at an apply, at most every
    /// `LISTENERS_RECHECK` (one sock_diag dump of the pod's listeners).
    pub fn listeners_due(&mut self, id: &PodId) -> bool {
        let due = (self.listeners_checked.get(id)).is_none_or(|t| t.elapsed() >= LISTENERS_RECHECK);
        if due {
            self.listeners_checked.insert(id.clone(), Instant::now());
        }
        due
    }

    /// What listens on ztunnel's ports in `id` that is not ztunnel.
    pub fn foreign_listeners(&mut self, id: &PodId, ports: BTreeSet<u16>) {
        let before = self.foreign.get(id).cloned().unwrap_or_default();
        if ports != before && !ports.is_empty() {
            log::warn!(
                "pod {id}: something not ztunnel listens on ztunnel's ports {}: it gets none \
                 of the captured traffic in eBPF mode; with istio-cni's rules it may",
                ports
                    .iter()
                    .map(|p| format!(":{p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.foreign_metric
            .get_or_create(&labels(id))
            .set(ports.len() as i64);
        self.foreign.insert(id.clone(), ports);
    }

    /// `n` parts of `id`'s redirection were found gone and put back.
    pub fn repaired(&mut self, id: &PodId, n: usize) {
        if n == 0 {
            return;
        }
        let total = self.repairs.entry(id.clone()).or_default();
        *total += 1;
        self.metric.get_or_create(&labels(id)).inc();
        log::warn!(
            "pod {id}: its redirection was taken out of the kernel ({n} parts) and put back; \
             {total} times so far"
        );
    }

    /// Keeps the record of the pods redirected now: the others' counts and series go.
    pub fn publish(&mut self, redirected: &BTreeMap<PodId, InPodWorkload>) {
        let gone: Vec<PodId> = (self.repairs.keys())
            .filter(|id| !redirected.contains_key(id))
            .cloned()
            .collect();
        for id in gone {
            self.metric.remove(&labels(&id));
            self.repairs.remove(&id);
        }
        let gone: Vec<PodId> = (self.foreign.keys())
            .filter(|id| !redirected.contains_key(id))
            .cloned()
            .collect();
        for id in gone {
            self.foreign_metric.remove(&labels(&id));
            self.foreign.remove(&id);
        }
        self.listeners_checked
            .retain(|id, _| redirected.contains_key(id));
        let records: Vec<PodRecord> = redirected
            .iter()
            .map(|(id, w)| PodRecord {
                pod: id.to_string(),
                netns: w.netns.clone(),
                repairs: self.repairs.get(id).copied().unwrap_or(0),
                foreign_listeners: (self.foreign.get(id).into_iter().flatten().copied()).collect(),
            })
            .collect();
        if self.written.as_ref() == Some(&records) {
            return;
        }
        // Replaced whole, never seen half-written. A failed write is logged: status is a view.
        let tmp = self.file.with_extension("tmp");
        let written = serde_json::to_vec(&records)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.file));
        match written {
            Ok(()) => self.written = Some(records),
            Err(e) => log::warn!("in-pod status file {}: {e}", self.file.display()),
        }
    }
}

fn labels(id: &PodId) -> Labels {
    vec![
        ("namespace", id.namespace.clone()),
        ("pod", id.name.clone()),
    ]
}
