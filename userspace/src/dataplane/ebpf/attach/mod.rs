//! Program attachments, recorded in bpffs: an attachment exists exactly while its pin does, so
//! a restarted (or SIGKILLed) agent drops nothing and adopts each one by swapping its freshly
//! loaded program in atomically. Two mechanisms, one per kernel generation:
//! - TCX (6.6+): the pin is the link itself (`links/`); removing it detaches.
//! - tc clsact through netlink (older kernels): filters cannot be pinned, so the pin is the
//!   program the filter runs (`filters/`), written before the filter exists; the filter sits at
//!   a fixed priority and handle, which is how a restarted agent finds and replaces it.
mod clsact;
mod tcx;

pub use clsact::REPIN_PREFIX;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType},
    util::KernelVersion,
};

use zdivert_common::program;

use super::PinDirs;
use crate::{
    error::{Error, Result},
    netns,
};

/// A packet path and where its program attaches (docs/design.md).
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
    /// Ingress of a new veth not classified yet (the pod start window).
    HoldOutbound,
    /// Egress of a new veth not classified yet.
    HoldInbound,
    /// In-pod mode: egress of an ambient pod's eth0, inside its netns.
    InPodEgress,
    /// In-pod mode: ingress of an ambient pod's eth0, inside its netns.
    InPodIngress,
    /// In-pod mode: ingress of an ambient pod's lo, where its egress turns segments back.
    InPodLoopback,
    /// In-pod mode: ingress of an ambient pod's host veth, in the node's netns.
    InPodGuard,
}

impl Hook {
    pub const ALL: [Hook; 10] = [
        Hook::PodOutbound,
        Hook::PodInbound,
        Hook::ZtunnelReturn,
        Hook::ZtunnelTproxy,
        Hook::HoldOutbound,
        Hook::HoldInbound,
        Hook::InPodEgress,
        Hook::InPodIngress,
        Hook::InPodLoopback,
        Hook::InPodGuard,
    ];

    pub fn program(self) -> &'static str {
        match self {
            Hook::PodOutbound => program::OUTBOUND,
            Hook::PodInbound => program::INBOUND,
            Hook::ZtunnelReturn => program::ZTUNNEL_RETURN,
            Hook::ZtunnelTproxy => program::ZTUNNEL_TPROXY,
            Hook::HoldOutbound | Hook::HoldInbound => program::HOLD,
            Hook::InPodEgress => program::POD_EGRESS,
            Hook::InPodIngress | Hook::InPodLoopback => program::POD_INGRESS,
            Hook::InPodGuard => program::POD_GUARD,
        }
    }

    pub fn is_hold(self) -> bool {
        matches!(self, Hook::HoldOutbound | Hook::HoldInbound)
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::PodInbound | Hook::HoldInbound | Hook::InPodEgress => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        }
    }

    pub fn direction(self) -> &'static str {
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
            Hook::HoldOutbound => "holdout",
            Hook::HoldInbound => "holdin",
            Hook::InPodEgress => "podeg",
            Hook::InPodIngress => "podin",
            Hook::InPodLoopback => "podlo",
            Hook::InPodGuard => "podguard",
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

    pub(crate) fn error(&self, source: impl Into<crate::error::Cause>) -> Error {
        Error::Attach {
            program: self.hook.program(),
            interface: self.ifname.clone(),
            direction: self.hook.direction(),
            source: source.into(),
        }
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
        Err(source) => {
            return Err(Error::Bpffs {
                path: dir.into(),
                source,
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

/// Removes a pin: for a TCX link its last reference, so this detaches it.
pub fn unpin(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Bpffs { path, source }),
    }
}

/// How programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX links (Linux 6.6+), pinned.
    Tcx,
    /// tc filters on a clsact qdisc, through netlink (any kernel with BPF TC).
    Netlink,
}

impl AttachMode {
    pub const ALL: [AttachMode; 2] = [AttachMode::Tcx, AttachMode::Netlink];

    /// What aya itself picks: TCX where the kernel has it (6.6), netlink clsact before.
    pub fn for_kernel() -> AttachMode {
        match KernelVersion::current() {
            Ok(v) if v < KernelVersion::new(6, 6, 0) => AttachMode::Netlink,
            _ => AttachMode::Tcx,
        }
    }

    pub fn dir(self, dirs: &PinDirs) -> &Path {
        match self {
            AttachMode::Tcx => &dirs.links,
            AttachMode::Netlink => &dirs.filters,
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Netlink => "tc clsact",
        })
    }
}

/// Every recorded attachment of a node, of both mechanisms: pin name, mechanism, what.
pub fn all_pinned(dirs: &PinDirs) -> Result<Vec<(String, AttachMode, PinnedAttachment)>> {
    let mut out = Vec::new();
    for mode in AttachMode::ALL {
        for (name, p) in pinned(mode.dir(dirs))? {
            out.push((name, mode, p));
        }
    }
    Ok(out)
}

/// What `ensure` did that is worth telling.
#[derive(Debug, Default)]
pub struct Ensured {
    pub failures: Vec<(Attachment, Error)>,
    /// Attachments moved back to the head of their hook, with what had got in front.
    pub moved_to_head: Vec<(Attachment, String)>,
    /// Attachments whose record was there but not the filter or link itself (someone deleted
    /// the qdisc, the filter or the link): put back.
    pub repaired: Vec<Attachment>,
}

/// What keeping an adopted attachment first found.
pub(super) enum Kept {
    First,
    /// Moved back in front of this.
    Moved(String),
    /// It was not on its hook at all: attached again.
    Repaired,
}

/// Makes every `desired` attachment exist through `mode`: adopts (program swap) or creates,
/// never touching attachments of other owners. `adopted` remembers which this process already
/// swapped, so a steady-state apply does no attach syscalls: one directory read, and with TCX
/// one query per hook that our program still runs first (else it is moved back to the head).
pub fn ensure(
    ebpf: &mut Ebpf,
    dirs: &PinDirs,
    mode: AttachMode,
    desired: &[Attachment],
    adopted: &mut BTreeSet<String>,
) -> Result<Ensured> {
    let dir = mode.dir(dirs);
    let present = pinned(dir)?;
    let mut out = Ensured::default();
    for a in desired {
        let name = a.pin_name();
        if adopted.contains(&name) && present.contains_key(&name) {
            let keep_first = |ebpf: &mut Ebpf| -> Result<Kept> {
                let prog = program(ebpf, a)?;
                match mode {
                    AttachMode::Tcx => tcx::keep_first(prog, dirs, a),
                    AttachMode::Netlink => clsact::keep_first(prog, a),
                }
            };
            let result = match a.netns.clone() {
                None => keep_first(ebpf),
                Some(ns) => netns::run_in(&ns, || keep_first(ebpf)).and_then(|r| r),
            };
            match result {
                Ok(Kept::Moved(ahead)) => out.moved_to_head.push((a.clone(), ahead)),
                Ok(Kept::Repaired) => out.repaired.push(a.clone()),
                Ok(Kept::First) => {}
                Err(e) => out.failures.push((a.clone(), e)),
            }
            continue;
        }
        let attach = |ebpf: &mut Ebpf| -> Result<()> {
            let prog = program(ebpf, a)?;
            match mode {
                AttachMode::Tcx => tcx::attach(prog, dir, a),
                AttachMode::Netlink => clsact::attach(prog, dir, a),
            }
        };
        let result = match a.netns.clone() {
            None => attach(ebpf),
            Some(ns) => netns::run_in(&ns, || attach(ebpf)).and_then(|r| r),
        };
        match result {
            Ok(()) => {
                adopted.insert(name);
            }
            Err(e) => out.failures.push((a.clone(), e)),
        }
    }
    Ok(out)
}

/// Detaches every attachment of `mode` that is not desired, and every one of the other
/// mechanism (left by an agent that attached differently): called after `ensure`, so a switch
/// of mechanism has the new attachments in place before the old ones go.
pub fn remove_stale(
    dirs: &PinDirs,
    mode: AttachMode,
    desired: &[Attachment],
    adopted: &mut BTreeSet<String>,
) -> Result<()> {
    let keep: BTreeSet<String> = desired.iter().map(Attachment::pin_name).collect();
    for (name, m, p) in all_pinned(dirs)? {
        if m != mode || !keep.contains(&name) {
            detach(dirs, m, &name, &p)?;
            if m == mode {
                adopted.remove(&name);
            }
        }
    }
    Ok(())
}

/// Detaches the holds of these interfaces (of the node's netns): a veth that turned out to be
/// ztunnel's must carry its traffic before the maps send anything its way.
pub fn release_holds(
    dirs: &PinDirs,
    ifindexes: &[u32],
    adopted: &mut BTreeSet<String>,
) -> Result<()> {
    for (name, m, p) in all_pinned(dirs)? {
        if p.hook.is_hold() && ifindexes.contains(&p.ifindex) {
            detach(dirs, m, &name, &p)?;
            adopted.remove(&name);
        }
    }
    Ok(())
}

/// Detaches one recorded attachment and removes its record.
pub fn detach(dirs: &PinDirs, mode: AttachMode, name: &str, p: &PinnedAttachment) -> Result<()> {
    match mode {
        AttachMode::Tcx => unpin(mode.dir(dirs), name),
        AttachMode::Netlink => clsact::detach(mode.dir(dirs), name, p),
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, a: &Attachment) -> Result<&'a mut SchedClassifier> {
    let program = a.hook.program();
    ebpf.program_mut(program)
        .ok_or(Error::ProgramMissing { program })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| a.error(e))
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
