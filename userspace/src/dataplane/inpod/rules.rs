//! In-pod redirection with istio-cni's rules (`istio_cni.rs`), and a record of the pods that
//! hold them: `<state dir>/<node>.inpod/<netns inode>`, one empty file each, written before the
//! rules go in and removed after they are out, so that `zdivert cleanup` finds every pod netns
//! an agent touched without the agent.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Instant,
};

use super::{RECHECK, istio_cni as inpod};
use crate::{
    dataplane::iptables::{self, Backend, nftables},
    error::{Error, Result},
    netns,
};

pub struct PodRules {
    backend: Backend,
    dns_capture: bool,
    records: PathBuf,
    /// When each pod netns (by inode) was last checked in full.
    checked: BTreeMap<u64, Instant>,
}

pub fn records_dir(state_dir: &Path, node: &str) -> PathBuf {
    state_dir.join(format!("{node}.inpod"))
}

impl PodRules {
    pub fn new(state_dir: &Path, node: &str, dns_capture: bool) -> Result<PodRules> {
        let (backend, why) = iptables::detect_backend();
        log::info!("iptables backend {backend:?}: {why}");
        let records = records_dir(state_dir, node);
        std::fs::create_dir_all(&records).map_err(|source| Error::StateFile {
            path: records.clone(),
            source,
        })?;
        Ok(PodRules {
            backend,
            dns_capture,
            records,
            checked: BTreeMap::new(),
        })
    }

    /// Puts istio-cni's rules into the pod netns at `ns`, idempotently. A pod checked within
    /// `RECHECK` is not entered again (reading back the rules costs an iptables-save per family).
    /// Returns 1 if a pod redirected before had lost rules (flushed or deleted), now put back.
    pub fn redirect(&mut self, ns: &Path) -> Result<usize> {
        let inode = netns::inode(ns)?;
        if self
            .checked
            .get(&inode)
            .is_some_and(|t| t.elapsed() < RECHECK)
        {
            return Ok(0);
        }
        let record = self.records.join(inode.to_string());
        let before = record.exists();
        if !before {
            // The pod's tables before ours, so that taking the rules out also takes out the
            // tables they made the backend create.
            let backend = self.backend;
            let tables = netns::run_in(ns, || nftables::tagged_existing(backend))??;
            std::fs::write(&record, format!("{TABLES_BEFORE}\n{}\n", tables.join("\n"))).map_err(
                |source| Error::StateFile {
                    path: record.clone(),
                    source,
                },
            )?;
        }
        let missing = inpod::apply(ns, self.backend, self.dns_capture)?;
        self.checked.insert(inode, Instant::now());
        if before && missing > 0 {
            log::warn!(
                "istio-cni's rules in netns {}: {missing} lines were gone: put back",
                ns.display()
            );
            return Ok(1);
        }
        Ok(0)
    }

    /// The next `redirect` of the netns `inode` checks everything again.
    pub fn recheck(&mut self, inode: u64) {
        self.checked.remove(&inode);
    }

    /// Forgets the checks of every netns but `inodes` (the pods redirected now).
    pub fn forget_others(&mut self, inodes: &std::collections::BTreeSet<u64>) {
        self.checked.retain(|i, _| inodes.contains(i));
    }

    pub fn release(&mut self, ns: &Path) -> Result<()> {
        let inode = netns::inode(ns)?;
        self.checked.remove(&inode);
        let record = self.records.join(inode.to_string());
        take_out(ns, self.backend, &record)?;
        forget(&record)
    }
}

/// Takes istio-cni's rules out of every pod netns an agent of `node` recorded: the pod netns
/// it cleaned (those still there).
pub fn cleanup(state_dir: &Path, node: &str) -> Result<Vec<PathBuf>> {
    let dir = records_dir(state_dir, node);
    let mut cleaned = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(cleaned);
    };
    let (backend, _) = iptables::detect_backend();
    for e in entries.flatten() {
        let inode = e.file_name().to_string_lossy().parse::<u64>().ok();
        if let Some(ns) = inode.and_then(netns::find_by_inode) {
            take_out(&ns, backend, &e.path())?;
            cleaned.push(ns);
        }
        forget(&e.path())?;
    }
    let _ = std::fs::remove_dir(&dir);
    Ok(cleaned)
}

/// The first line of a pod's record, before the tables it had (records of older agents are
/// empty: nothing known, no table removed).
const TABLES_BEFORE: &str = "tables-before:";

/// Takes the rules out of the pod netns at `ns`, then the tables they made the backend create
/// (now empty), as its record says.
fn take_out(ns: &Path, backend: Backend, record: &Path) -> Result<()> {
    inpod::remove(ns, backend)?;
    let text = std::fs::read_to_string(record).unwrap_or_default();
    let mut lines = text.lines();
    if lines.next() != Some(TABLES_BEFORE) {
        return Ok(());
    }
    let before: Vec<&str> = lines.collect();
    netns::run_in(ns, || -> Result<()> {
        for v6 in [false, true] {
            for table in ["mangle", "nat"] {
                if !before.contains(&nftables::tag(v6, table).as_str()) {
                    nftables::delete_if_empty(backend, v6, table)?;
                }
            }
        }
        Ok(())
    })?
}

fn forget(record: &Path) -> Result<()> {
    match std::fs::remove_file(record) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::StateFile {
            path: record.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}
