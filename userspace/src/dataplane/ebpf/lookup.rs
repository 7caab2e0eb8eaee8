//! The sk_lookup programs: in ztunnel's netns (`ebpf/src/ztunnel_lookup.rs`) and, in in-pod mode,
//! in each ambient pod's (`ebpf/src/pod_lookup.rs`). They answer the listener lookup the kernel
//! makes when a SYN retires one of ztunnel's TIME_WAIT sockets. Links are pinned as
//! `links/<prefix><netns inode>`, so they outlive the agent like the TC links.
use std::{fs::File, path::Path};

use aya::{
    Ebpf,
    programs::{ProgramError, SkLookup, links::FdLink},
};

use super::PinDirs;
use crate::error::{Error, Result};

/// Whose netns a lookup program is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Ztunnel,
    /// An ambient pod's, in in-pod mode.
    Pod,
}

impl Lookup {
    pub const ALL: [Lookup; 2] = [Lookup::Ztunnel, Lookup::Pod];

    pub fn program(self) -> &'static str {
        match self {
            Lookup::Ztunnel => zdivert_common::program::ZTUNNEL_LOOKUP,
            Lookup::Pod => zdivert_common::program::POD_LOOKUP,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Lookup::Ztunnel => "lookup_",
            Lookup::Pod => "podlookup_",
        }
    }

    pub fn pin_name(self, netns_inode: u64) -> String {
        format!("{}{netns_inode}", self.prefix())
    }
}

/// The netns inodes of every pinned lookup link of this kind.
pub fn pinned(dirs: &PinDirs, kind: Lookup) -> Vec<(String, u64)> {
    std::fs::read_dir(&dirs.links)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let inode = name.strip_prefix(kind.prefix())?.parse().ok()?;
            Some((name, inode))
        })
        .collect()
}

pub fn program(ebpf: &mut Ebpf, kind: Lookup) -> Result<&mut SkLookup> {
    let program = kind.program();
    ebpf.program_mut(program)
        .ok_or(Error::ProgramMissing { program })?
        .try_into()
        .map_err(|source| Error::Program { program, source })
}

/// Loads the program of `kind` into the kernel.
pub fn load(ebpf: &mut Ebpf, kind: Lookup) -> Result<()> {
    program(ebpf, kind)?
        .load()
        .map_err(|e| super::rejected(kind.program(), e))
}

/// Attaches this process's program to the netns at `netns` and pins the link over any earlier
/// one: the rename replaces the old link in one step, and both answer alike meanwhile.
pub fn attach(
    ebpf: &mut Ebpf,
    dirs: &PinDirs,
    kind: Lookup,
    netns: &Path,
    netns_inode: u64,
) -> Result<()> {
    let attach_err = |source: crate::error::Cause| Error::Attach {
        program: kind.program(),
        interface: format!("netns {}", netns.display()),
        direction: "sk_lookup",
        source,
    };
    let ns = File::open(netns).map_err(|source| Error::Netns {
        path: netns.into(),
        source,
    })?;
    let prog = program(ebpf, kind)?;
    let id = prog.attach(&ns).map_err(|e| attach_err(e.into()))?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(|e: ProgramError| attach_err(e.into()))?
        .into();
    let pin = dirs.links.join(kind.pin_name(netns_inode));
    let tmp = dirs.links.join(format!(
        "{}{}",
        super::attach::REPIN_PREFIX,
        kind.pin_name(netns_inode)
    ));
    let _ = std::fs::remove_file(&tmp);
    link.pin(&tmp).map_err(|source| Error::Pin {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &pin).map_err(|source| Error::Bpffs { path: pin, source })
}

/// Detaches every pinned lookup link of this kind but those of the netns in `keep`.
pub fn remove_others(dirs: &PinDirs, kind: Lookup, keep: &[u64]) -> Result<usize> {
    let mut removed = 0;
    for (name, inode) in pinned(dirs, kind) {
        if !keep.contains(&inode) {
            super::attach::unpin(&dirs.links, &name)?;
            removed += 1;
        }
    }
    Ok(removed)
}
