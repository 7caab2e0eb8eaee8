//! Program attachments as pinned TCX links: the pin is the state. An attachment exists exactly
//! while its pin does, so a restarted (or SIGKILLed) agent drops nothing, and adopts each pinned
//! link by atomically swapping in its freshly loaded program (`bpf_link_update`): no gap.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};

use crate::{
    error::{Error, Result},
    netns,
};

/// A packet path and where its program attaches (DESIGN.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Ingress of an ambient pod's host veth.
    PodOutbound,
    /// Egress of an ambient pod's host veth.
    PodInbound,
    /// Ingress of ztunnel's host veth.
    ZtunnelReturn,
    /// Ingress of ztunnel's eth0, inside its netns.
    ZtunnelTproxy,
}

impl Hook {
    pub const ALL: [Hook; 4] = [
        Hook::PodOutbound,
        Hook::PodInbound,
        Hook::ZtunnelReturn,
        Hook::ZtunnelTproxy,
    ];

    pub fn program(self) -> &'static str {
        match self {
            Hook::PodOutbound => "zd_outbound",
            Hook::PodInbound => "zd_inbound",
            Hook::ZtunnelReturn => "zd_zt_return",
            Hook::ZtunnelTproxy => "zd_zt_tproxy",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::PodInbound => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        }
    }

    fn direction(self) -> &'static str {
        match self.attach_type() {
            TcAttachType::Egress => "egress",
            _ => "ingress",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Hook::PodOutbound => "out",
            Hook::PodInbound => "in",
            Hook::ZtunnelReturn => "ztret",
            Hook::ZtunnelTproxy => "ztproxy",
        }
    }

    fn from_tag(tag: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.tag() == tag)
    }
}

/// One program on one interface. `netns_inode` tells interfaces of different namespaces apart
/// (ztunnel's eth0 vs the node's veths); `netns` is where to find the interface by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub hook: Hook,
    pub netns_inode: u64,
    pub ifindex: u32,
    pub ifname: String,
    /// `None`: the agent's own netns (the node's).
    pub netns: Option<PathBuf>,
}

impl Attachment {
    /// The pin's file name: `<tag>_<netns inode>_<ifindex>`.
    pub fn pin_name(&self) -> String {
        pin_name(self.hook, self.netns_inode, self.ifindex)
    }
}

fn pin_name(hook: Hook, netns_inode: u64, ifindex: u32) -> String {
    format!("{}_{}_{}", hook.tag(), netns_inode, ifindex)
}

/// A pin name parsed back: what `cleanup` and `status` know without the agent's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedAttachment {
    pub hook: Hook,
    pub netns_inode: u64,
    pub ifindex: u32,
}

impl fmt::Display for PinnedAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on ifindex {} (netns {})",
            self.hook.program(),
            self.ifindex,
            self.netns_inode
        )
    }
}

pub fn parse_pin_name(name: &str) -> Option<PinnedAttachment> {
    let mut parts = name.split('_');
    let hook = Hook::from_tag(parts.next()?)?;
    let netns_inode = parts.next()?.parse().ok()?;
    let ifindex = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some(PinnedAttachment {
        hook,
        netns_inode,
        ifindex,
    })
}

pub fn pinned(dir: &Path) -> Result<BTreeMap<String, PinnedAttachment>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(Error::Bpffs {
                path: dir.into(),
                reason: e.to_string(),
            });
        }
    };
    Ok(entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            parse_pin_name(&name).map(|p| (name, p))
        })
        .collect())
}

/// Detaches by removing the pin (the last reference to the link).
pub fn unpin(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Bpffs {
            path,
            reason: e.to_string(),
        }),
    }
}

/// Keeps the links in `dir` equal to `desired`: adopts (program swap) or creates what is
/// desired, never touching links of other owners. `adopted` remembers which pins this process
/// already swapped, so a steady-state apply does no link syscalls at all.
pub fn ensure(
    ebpf: &mut Ebpf,
    dir: &Path,
    desired: &[Attachment],
    adopted: &mut BTreeSet<String>,
) -> Vec<(Attachment, Error)> {
    let mut failures = Vec::new();
    for a in desired {
        let name = a.pin_name();
        if adopted.contains(&name) && dir.join(&name).exists() {
            continue;
        }
        let result = match a.netns.clone() {
            None => attach_one(ebpf, dir, a),
            Some(ns) => netns::run_in(&ns, || attach_one(ebpf, dir, a)).and_then(|r| r),
        };
        match result {
            Ok(()) => {
                adopted.insert(name);
            }
            Err(e) => failures.push((a.clone(), e)),
        }
    }
    failures
}

/// Removes every pinned link in `dir` that is not desired.
pub fn remove_stale(
    dir: &Path,
    desired: &[Attachment],
    adopted: &mut BTreeSet<String>,
) -> Result<()> {
    let keep: BTreeSet<String> = desired.iter().map(Attachment::pin_name).collect();
    for name in pinned(dir)?.into_keys().filter(|n| !keep.contains(n)) {
        unpin(dir, &name)?;
        adopted.remove(&name);
    }
    Ok(())
}

fn attach_one(ebpf: &mut Ebpf, dir: &Path, a: &Attachment) -> Result<()> {
    let program = a.hook.program();
    let err = |reason: String| Error::Attach {
        program,
        interface: a.ifname.clone(),
        direction: a.hook.direction(),
        reason,
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program)
        .ok_or_else(|| err("program missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| err(e.to_string()))?;
    let pin = dir.join(a.pin_name());

    // Adopt: swap our program into the existing link, atomically.
    if pin.exists() {
        let adopted = PinnedLink::from_pin(&pin)
            .map_err(|e| e.to_string())
            .and_then(|p| SchedClassifierLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
            .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()))
            .and_then(|id| prog.take_link(id).map_err(|e| e.to_string()));
        match adopted {
            // Dropping our fd leaves the link alive: the pin holds it.
            Ok(_link) => return Ok(()),
            // A defunct link (its interface went away and came back with this index): replace.
            Err(reason) => {
                log::warn!("replacing unusable pinned link {}: {reason}", pin.display());
                unpin(dir, &a.pin_name())?;
            }
        }
    }

    let id = prog
        .attach_with_options(
            &a.ifname,
            a.hook.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| err(e.to_string()))?;
    let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
    let fd_link = FdLink::try_from(link).map_err(|e| err(e.to_string()))?;
    fd_link
        .pin(&pin)
        .map_err(|e| err(format!("pinning at {}: {e}", pin.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_and_reject_foreign_files() {
        for hook in Hook::ALL {
            let name = pin_name(hook, 4026531840, 17);
            assert_eq!(
                parse_pin_name(&name),
                Some(PinnedAttachment {
                    hook,
                    netns_inode: 4026531840,
                    ifindex: 17
                })
            );
        }
        for bad in ["out_1", "out_1_2_3", "nope_1_2", "out_x_2", "PODS"] {
            assert_eq!(parse_pin_name(bad), None, "{bad}");
        }
    }
}
