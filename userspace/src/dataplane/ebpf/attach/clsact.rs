//! tc clsact attachments through netlink, for kernels without TCX. A filter cannot be pinned, so
//! the record is the program it runs, pinned before the filter is created (a crash in between
//! leaves a record of nothing, never a filter nobody knows of). The filter sits at a fixed
//! priority and handle: adoption replaces its program in place (cls_bpf swaps it under RCU, no
//! packet sees no filter), and removal finds it without the agent's memory.
use std::path::Path;

use aya::programs::{
    SchedClassifier,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};

use super::{Attachment, PinnedAttachment, unpin};
use crate::{
    error::{Error, Result},
    netns,
    nl::Netlink,
};

/// First in the clsact chain: nothing may decide about a pod's packet before capture does.
pub const PRIORITY: u16 = 1;
/// "zd": ours, whoever else has filters at this priority.
pub const HANDLE: u32 = 0x7a64;
/// A re-record in progress: pinned under this prefix, then renamed over the record.
pub const REPIN_PREFIX: &str = "new_";

pub(super) fn attach(prog: &mut SchedClassifier, dir: &Path, a: &Attachment) -> Result<()> {
    let pin = dir.join(a.pin_name());
    let recorded = pin.exists();
    if !recorded {
        prog.pin(&pin)
            .map_err(|e| a.error(format!("pinning at {}: {e}", pin.display())))?;
    }
    let result = attach_filter(prog, a);
    match (&result, recorded) {
        // Re-record under the program now attached, atomically, so the old one can go.
        (Ok(()), true) => repin(prog, dir, a)?,
        (Err(_), false) => unpin(dir, &a.pin_name())?,
        _ => {}
    }
    result
}

fn attach_filter(prog: &mut SchedClassifier, a: &Attachment) -> Result<()> {
    match tc::qdisc_add_clsact(&a.ifname) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(a.error(format!("adding the clsact qdisc: {e}"))),
    }
    let ty = a.hook.attach_type();
    let ours = SchedClassifierLink::attached(&a.ifname, ty, PRIORITY, HANDLE.into(), None)
        .map_err(|e| a.error(e.to_string()))?;
    // Replace our filter's program if the filter is there, else create it.
    let id = match prog.attach_to_link(ours) {
        Ok(id) => id,
        Err(_) => prog
            .attach_with_options(
                &a.ifname,
                ty,
                TcAttachOptions::Netlink(NlOptions {
                    priority: PRIORITY,
                    handle: TcHandle::from(HANDLE),
                    classid: None,
                }),
            )
            .map_err(|e| a.error(e.to_string()))?,
    };
    // Dropping aya's handle would delete the filter: it must outlive this process.
    std::mem::forget(prog.take_link(id).map_err(|e| a.error(e.to_string()))?);
    Ok(())
}

fn repin(prog: &mut SchedClassifier, dir: &Path, a: &Attachment) -> Result<()> {
    let pin = dir.join(a.pin_name());
    // bpffs refuses names with a dot; `pinned` ignores this one (no hook is called "new").
    let tmp = dir.join(format!("{REPIN_PREFIX}{}", a.pin_name()));
    let bpffs = |e: String| Error::Bpffs {
        path: pin.clone(),
        reason: e,
    };
    let _ = std::fs::remove_file(&tmp);
    prog.pin(&tmp).map_err(|e| bpffs(e.to_string()))?;
    std::fs::rename(&tmp, &pin).map_err(|e| bpffs(e.to_string()))
}

/// Deletes the recorded filter (if it is still there and still ours), the clsact qdisc when no
/// filter is left on it, then the record. A netns that is gone took its filters with it.
pub(super) fn detach(dir: &Path, name: &str, p: &PinnedAttachment) -> Result<()> {
    let here = netns::inode(Path::new("/proc/thread-self/ns/net"))?;
    let remove = || -> Result<()> { remove_filter(&Netlink::new()?, p) };
    if p.netns_inode == here {
        remove()?;
    } else if let Some(ns) = netns::find_by_inode(p.netns_inode) {
        netns::run_in(&ns, remove)??;
    }
    unpin(dir, name)
}

fn remove_filter(nl: &Netlink, p: &PinnedAttachment) -> Result<()> {
    let egress = p.hook.attach_type() == aya::programs::TcAttachType::Egress;
    let ours = nl.tc_filters(p.ifindex, egress)?.into_iter().any(|f| {
        f.priority == PRIORITY && f.handle == HANDLE && f.name.as_deref() == Some(p.hook.program())
    });
    if ours {
        nl.delete_tc_filter(p.ifindex, egress, PRIORITY, HANDLE)?;
    }
    if nl.tc_filters(p.ifindex, false)?.is_empty() && nl.tc_filters(p.ifindex, true)?.is_empty() {
        nl.delete_clsact(p.ifindex)?;
    }
    Ok(())
}
