//! Each redirected pod as `zdivert status` shows it, with what was done to its redirection
//! behind the agent's back: every time a recheck found part of it gone from the kernel and put
//! it back, counted for that pod. A pod that fights back (deletes its redirection in a loop)
//! degrades only itself, and is named in the log, in
//! `zdivert_pod_redirections_repaired_total{namespace,pod}` and in status.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use crate::{state::PodId, zds::InPodWorkload};

type Labels = Vec<(&'static str, String)>;

/// One pod in the file `zdivert status` reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub pod: String,
    pub netns: PathBuf,
    /// Times part of its redirection was found gone and put back.
    pub repairs: u64,
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
        s += &format!("  {} (netns {}){repairs}\n", r.pod, r.netns.display());
    }
    s
}

pub struct PodRecords {
    file: PathBuf,
    repairs: BTreeMap<PodId, u64>,
    metric: Family<Labels, Counter>,
    written: Option<Vec<PodRecord>>,
}

impl PodRecords {
    pub fn new(file: PathBuf) -> PodRecords {
        PodRecords {
            file,
            repairs: BTreeMap::new(),
            metric: Family::default(),
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
        let records: Vec<PodRecord> = redirected
            .iter()
            .map(|(id, w)| PodRecord {
                pod: id.to_string(),
                netns: w.netns.clone(),
                repairs: self.repairs.get(id).copied().unwrap_or(0),
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
