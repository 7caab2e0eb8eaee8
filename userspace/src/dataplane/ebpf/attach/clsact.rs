//! tc clsact attachments through netlink, for kernels without TCX. A filter cannot be pinned, so
//! the record is the program it runs, pinned before the filter is created (a crash in between
//! leaves a record of nothing, never a filter nobody knows of). The filter sits at priority 1
//! under one of two handles: adoption replaces its program in place (cls_bpf swaps it under RCU,
//! no packet sees no filter), and removal finds it without the agent's memory.
//!
//! Priority 1 is the first there is, but another bpf filter added at priority 1 goes in front of
//! ours (cls_bpf puts a new filter first among its priority's). Each reconcile looks at the
//! hook's order; if something runs first, ours is added again under the other handle, which puts
//! it in front, and the old one deleted: never a moment without it.
use std::path::Path;

use aya::programs::{
    SchedClassifier,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};

use super::{Attachment, Hook, Kept, PinnedAttachment, unpin};
use crate::{
    error::{Error, Result},
    netns,
    nl::{Netlink, TcFilter},
};

/// First in the clsact chain: nothing may decide about a pod's packet before capture does.
pub const PRIORITY: u16 = 1;
/// "zd" and the next: ours, whoever else has filters at this priority. A move to the front
/// switches between them.
pub const HANDLES: [u32; 2] = [0x7a64, 0x7a65];
/// A re-record in progress: pinned under this prefix, then renamed over the record.
pub const REPIN_PREFIX: &str = "new_";

pub(super) fn attach(prog: &mut SchedClassifier, dir: &Path, a: &Attachment) -> Result<()> {
    let pin = dir.join(a.pin_name());
    let recorded = pin.exists();
    if !recorded {
        prog.pin(&pin).map_err(|source| crate::error::Error::Pin {
            path: pin.to_path_buf(),
            source,
        })?;
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
        Err(e) => return Err(a.error(e)),
    }
    let ty = a.hook.attach_type();
    let order = order(&Netlink::new()?, a.ifindex, a.hook)?;
    // Replace our filter's program if the filter is there, else create it.
    let replaced = order.ours.and_then(|h| {
        let ours = SchedClassifierLink::attached(&a.ifname, ty, PRIORITY, h.into(), None).ok()?;
        prog.attach_to_link(ours).ok()
    });
    let id = match replaced {
        Some(id) => id,
        None => create(prog, a, HANDLES[0])?,
    };
    // Dropping aya's handle would delete the filter: it must outlive this process.
    std::mem::forget(prog.take_link(id).map_err(|e| a.error(e))?);
    Ok(())
}

fn create(
    prog: &mut SchedClassifier,
    a: &Attachment,
    handle: u32,
) -> Result<aya::programs::tc::SchedClassifierLinkId> {
    prog.attach_with_options(
        &a.ifname,
        a.hook.attach_type(),
        TcAttachOptions::Netlink(NlOptions {
            priority: PRIORITY,
            handle: TcHandle::from(handle),
            classid: None,
        }),
    )
    .map_err(|e| a.error(e))
}

/// Our filter on a hook, and what runs before it.
struct Order {
    ours: Option<u32>,
    ahead: Option<String>,
}

fn is_ours(f: &TcFilter, hook: Hook) -> bool {
    f.priority == PRIORITY
        && HANDLES.contains(&f.handle)
        && f.name.as_deref() == Some(hook.program())
}

/// Where our filter is among the hook's filters, in the order the kernel runs them (by
/// priority, then as cls_bpf lists them).
fn order(nl: &Netlink, ifindex: u32, hook: Hook) -> Result<Order> {
    let egress = hook.attach_type() == aya::programs::TcAttachType::Egress;
    let filters = nl.tc_filters(ifindex, egress)?;
    // Whichever of our programs it runs: capture takes a held veth's filter over in place.
    let ours = filters
        .iter()
        .position(|f| f.priority == PRIORITY && HANDLES.contains(&f.handle));
    let ahead = match ours {
        Some(0) | None => None,
        Some(i) => filters.first().map(|f| {
            let name = f.name.as_deref().unwrap_or("?");
            format!(
                "{} filter {name} (priority {}, {} before ours)",
                f.kind, f.priority, i
            )
        }),
    };
    Ok(Order {
        ours: ours.map(|i| filters[i].handle),
        ahead,
    })
}

/// Called in the attachment's netns: keeps our filter first, as the kernel has it. A filter
/// that is not there (its qdisc or itself deleted) is put back; one with something in front is
/// moved to the front.
pub(super) fn keep_first(prog: &mut SchedClassifier, a: &Attachment) -> Result<Kept> {
    let nl = Netlink::new()?;
    let order = order(&nl, a.ifindex, a.hook)?;
    let Some(old) = order.ours else {
        attach_filter(prog, a)?;
        return Ok(Kept::Repaired);
    };
    let Some(ahead) = order.ahead else {
        return Ok(Kept::First);
    };
    let new = if old == HANDLES[0] {
        HANDLES[1]
    } else {
        HANDLES[0]
    };
    let id = create(prog, a, new)?;
    std::mem::forget(prog.take_link(id).map_err(|e| a.error(e))?);
    let egress = a.hook.attach_type() == aya::programs::TcAttachType::Egress;
    nl.delete_tc_filter(a.ifindex, egress, PRIORITY, old)?;
    Ok(Kept::Moved(ahead))
}

fn repin(prog: &mut SchedClassifier, dir: &Path, a: &Attachment) -> Result<()> {
    let pin = dir.join(a.pin_name());
    // bpffs refuses names with a dot; `pinned` ignores this one (no hook is called "new").
    let tmp = dir.join(format!("{REPIN_PREFIX}{}", a.pin_name()));
    let _ = std::fs::remove_file(&tmp);
    prog.pin(&tmp).map_err(|source| Error::Pin {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &pin).map_err(|source| Error::Bpffs { path: pin, source })
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
    for f in nl.tc_filters(p.ifindex, egress)? {
        if is_ours(&f, p.hook) {
            nl.delete_tc_filter(p.ifindex, egress, PRIORITY, f.handle)?;
        }
    }
    if nl.tc_filters(p.ifindex, false)?.is_empty() && nl.tc_filters(p.ifindex, true)?.is_empty() {
        nl.delete_clsact(p.ifindex)?;
    }
    Ok(())
}
