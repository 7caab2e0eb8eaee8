//! `zdivert cleanup` for the eBPF dataplane: everything of a node's, from the pins alone.
use std::path::{Path, PathBuf};

use zdivert_common::{PIN_VERSION, PIN_VERSION_BEFORE};

use super::{PinDirs, attach, attach::Hook, lookup, maps, ztunnels};
use crate::{
    error::{Error, Result},
    netns,
};

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub links: usize,
    pub maps: usize,
    pub ztunnel_netns: Vec<PathBuf>,
    /// In-pod mode: the pod netns whose programs were detached; their routing and sysctls are
    /// the in-pod dataplane's to take out (`dataplane::cleanup`).
    pub pod_netns: Vec<PathBuf>,
}

/// Removes every link, pin and ztunnel-netns rule of this node's eBPF dataplane, working from the
/// pins alone (no agent needs to run). Links go first, so no program is left without its maps.
/// Both this pin layout and the one before it (an agent of the previous version).
pub fn cleanup(bpffs: &Path, node: &str) -> Result<Cleaned> {
    let mut cleaned = Cleaned::default();
    for version in [PIN_VERSION_BEFORE, PIN_VERSION] {
        cleanup_layout(
            bpffs,
            &PinDirs::of_version(bpffs, version, node),
            &mut cleaned,
        )?;
    }
    Ok(cleaned)
}

fn cleanup_layout(bpffs: &Path, dirs: &PinDirs, cleaned: &mut Cleaned) -> Result<()> {
    if !dirs.root.exists() {
        return Ok(());
    }
    for (name, mode, pinned) in attach::all_pinned(dirs)? {
        if pinned.hook == Hook::ZtunnelTproxy
            && let Some(ns) = netns::find_by_inode(pinned.netns_inode)
        {
            // Both families: removing an absent rule is not an error.
            match ztunnels::unroute(&ns, true).or_else(|_| ztunnels::unroute(&ns, false)) {
                Ok(()) => cleaned.ztunnel_netns.push(ns),
                Err(e) => log::warn!("ztunnel netns {}: {}", ns.display(), e.chain()),
            }
        }
        attach::detach(dirs, mode, &name, &pinned)?;
        cleaned.links += 1;
        if pinned.hook == Hook::InPodIngress
            && let Some(ns) = netns::find_by_inode(pinned.netns_inode)
        {
            cleaned.pod_netns.push(ns);
        }
    }
    for kind in lookup::Lookup::ALL {
        cleaned.links += lookup::remove_others(dirs, kind, &[])?;
    }
    for name in maps::ALL {
        let path = dirs.maps.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| Error::Bpffs { path, source })?;
            cleaned.maps += 1;
        }
    }
    // A re-record or re-pin an agent did not finish (see attach::clsact, lookup).
    let dirs_with_repins = [&dirs.filters, &dirs.links];
    for e in dirs_with_repins
        .into_iter()
        .flat_map(std::fs::read_dir)
        .flatten()
        .flatten()
    {
        if e.file_name()
            .to_string_lossy()
            .starts_with(attach::REPIN_PREFIX)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
    // Remove our directories bottom-up, stopping at the first that holds something else.
    for d in [&dirs.links, &dirs.filters, &dirs.maps, &dirs.root] {
        let _ = std::fs::remove_dir(d);
    }
    let mut up = dirs.root.parent();
    while let Some(d) = up.filter(|d| d.starts_with(bpffs.join(zdivert_common::PIN_BASE))) {
        if std::fs::remove_dir(d).is_err() {
            break;
        }
        up = d.parent();
    }
    Ok(())
}
