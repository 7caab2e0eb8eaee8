//! What the fallback must remember across restarts, in `<state-dir>/<node>/iptables.json`: the
//! backend and tunnel it chose, where ztunnel's netns was, and the value every sysctl had before
//! we changed it, so that `zdivert cleanup` (with no agent running) can put each one back.
use std::path::{Path, PathBuf};

use super::{layout::Sysctl, tables::Backend};
use crate::{
    error::{Error, Result},
    nl::TunnelKind,
};

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub backend: Option<Backend>,
    pub tunnel: Option<TunnelKind>,
    pub tunnel_port: Option<u16>,
    /// ztunnel's netns holding our links, rules and routes.
    pub ztunnel_netns: Option<SavedNetns>,
    /// Sysctls we changed, with their original values.
    pub sysctls: Vec<SavedSysctl>,
    /// Why the fallback runs: `--mode iptables`, or what the kernel lacked for eBPF.
    #[serde(default)]
    pub chosen_because: Option<String>,
    /// The rules the last apply made, for `zdivert status` to find each with its counter.
    #[serde(default)]
    pub applied: Vec<AppliedRule>,
    /// The node's iptables tables (`ip:nat`, `ip6:mangle`, …) before the fallback first ran:
    /// cleanup deletes the others once they are empty. `None`: not known (an older state file).
    #[serde(default)]
    pub tables_before: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppliedRule {
    /// `node` or `ztunnel`.
    pub netns: String,
    pub v6: bool,
    pub table: String,
    /// As `iptables-save` prints it.
    pub rule: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedNetns {
    pub path: PathBuf,
    pub inode: u64,
    /// Its iptables tables before the fallback first wrote there (`ip:mangle`, …): cleanup
    /// deletes the others once they are empty. `None`: not known yet, or an older state file.
    #[serde(default)]
    pub tables_before: Option<Vec<String>>,
}

impl SavedNetns {
    /// The same namespace, whatever is known of its tables.
    pub fn same(&self, other: &SavedNetns) -> bool {
        (&self.path, self.inode) == (&other.path, other.inode)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSysctl {
    pub netns_inode: u64,
    pub path: String,
    pub original: String,
}

pub struct StateFile {
    pub path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path, node: &str) -> Self {
        StateFile {
            path: state_dir.join(node).join("iptables.json"),
        }
    }

    fn err(&self, source: std::io::Error) -> Error {
        Error::StateFile {
            path: self.path.clone(),
            source,
        }
    }

    fn format_err(&self, source: serde_json::Error) -> Error {
        Error::StateFileFormat {
            path: self.path.clone(),
            source,
        }
    }

    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    pub fn load(&self) -> Result<Saved> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| self.format_err(e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Written before the kernel changes it describes, atomically (temp file + rename).
    pub fn store(&self, saved: &Saved) -> Result<()> {
        let dir = self.path.parent().expect("state file has a directory");
        std::fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(saved).map_err(|e| self.format_err(e))?;
        std::fs::write(&tmp, bytes).map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))
    }

    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.err(e)),
        }
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::Sysctl {
            path: path.into(),
            source: e,
        })
}

fn write(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| Error::Sysctl {
        path: path.into(),
        source,
    })
}

/// Sets `want` in the calling thread's netns (`netns_inode`), recording each original value
/// first (interfaces `ephemeral` says we create ourselves are not recorded: they go away with
/// their link), and puts back the ones we set earlier in this netns that are no longer wanted.
pub fn apply_sysctls(
    file: &StateFile,
    saved: &mut Saved,
    netns_inode: u64,
    want: &[Sysctl],
    ephemeral: &[&str],
) -> Result<()> {
    for s in want {
        let path = s.path();
        let current = read(&path)?;
        if current == s.value {
            continue;
        }
        let known = saved
            .sysctls
            .iter()
            .any(|r| r.netns_inode == netns_inode && r.path == path);
        if !known && !ephemeral.contains(&s.iface.as_str()) {
            saved.sysctls.push(SavedSysctl {
                netns_inode,
                path: path.clone(),
                original: current,
            });
            file.store(saved)?;
        }
        write(&path, s.value)?;
    }
    let wanted: Vec<String> = want.iter().map(Sysctl::path).collect();
    restore_sysctls(file, saved, netns_inode, |p| !wanted.iter().any(|w| w == p))
}

/// Puts back the original value of every recorded sysctl of this netns that `which` selects
/// (an interface that is gone needs nothing), and forgets it.
pub fn restore_sysctls(
    file: &StateFile,
    saved: &mut Saved,
    netns_inode: u64,
    which: impl Fn(&str) -> bool,
) -> Result<()> {
    let (restore, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut saved.sysctls)
        .into_iter()
        .partition(|r| r.netns_inode == netns_inode && which(&r.path));
    saved.sysctls = keep;
    let changed = !restore.is_empty();
    for r in restore {
        if Path::new(&r.path).exists() {
            write(&r.path, &r.original)?;
        }
    }
    if changed {
        file.store(saved)?;
    }
    Ok(())
}
