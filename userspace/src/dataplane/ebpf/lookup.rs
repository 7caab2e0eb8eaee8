//! The sk_lookup program in ztunnel's netns (`ebpf/src/ztunnel_lookup.rs`): it answers the
//! listener lookup the kernel makes when a SYN retires one of ztunnel's TIME_WAIT sockets. Its
//! link is pinned as `links/lookup_<netns inode>`, so it outlives the agent like the TC links.
use std::{fs::File, path::Path};

use aya::{
    Ebpf,
    programs::{ProgramError, SkLookup, links::FdLink},
};

use super::PinDirs;
use crate::error::{Error, Result};

pub const PROGRAM: &str = zdivert_common::program::ZTUNNEL_LOOKUP;
const PREFIX: &str = "lookup_";

pub fn pin_name(netns_inode: u64) -> String {
    format!("{PREFIX}{netns_inode}")
}

/// The netns inodes of every pinned lookup link.
pub fn pinned(dirs: &PinDirs) -> Vec<(String, u64)> {
    std::fs::read_dir(&dirs.links)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let inode = name.strip_prefix(PREFIX)?.parse().ok()?;
            Some((name, inode))
        })
        .collect()
}

pub fn program(ebpf: &mut Ebpf) -> Result<&mut SkLookup> {
    ebpf.program_mut(PROGRAM)
        .ok_or(Error::ProgramMissing { program: PROGRAM })?
        .try_into()
        .map_err(|source| Error::Program {
            program: PROGRAM,
            source,
        })
}

/// Attaches this process's program to the netns at `netns` and pins the link over any earlier
/// one: the rename replaces the old link in one step, and both answer alike meanwhile.
pub fn attach(ebpf: &mut Ebpf, dirs: &PinDirs, netns: &Path, netns_inode: u64) -> Result<()> {
    let attach_err = |source: crate::error::Cause| Error::Attach {
        program: PROGRAM,
        interface: format!("netns {}", netns.display()),
        direction: "sk_lookup",
        source,
    };
    let ns = File::open(netns).map_err(|source| Error::Netns {
        path: netns.into(),
        source,
    })?;
    let prog = program(ebpf)?;
    let id = prog.attach(&ns).map_err(|e| attach_err(e.into()))?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(|e: ProgramError| attach_err(e.into()))?
        .into();
    let pin = dirs.links.join(pin_name(netns_inode));
    let tmp = dirs.links.join(format!(
        "{}{}",
        super::attach::REPIN_PREFIX,
        pin_name(netns_inode)
    ));
    let _ = std::fs::remove_file(&tmp);
    link.pin(&tmp).map_err(|source| Error::Pin {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &pin).map_err(|source| Error::Bpffs { path: pin, source })
}

/// Detaches every pinned lookup link but the one for `keep`.
pub fn remove_others(dirs: &PinDirs, keep: &[u64]) -> Result<usize> {
    let mut removed = 0;
    for (name, inode) in pinned(dirs) {
        if !keep.contains(&inode) {
            super::attach::unpin(&dirs.links, &name)?;
            removed += 1;
        }
    }
    Ok(removed)
}
