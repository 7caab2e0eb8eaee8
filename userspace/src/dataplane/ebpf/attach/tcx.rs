//! TCX attachments: pinned links, swapped in place with `bpf_link_update` on adoption, and kept
//! first on their hook. A program ahead of ours that returns a final verdict (a CNI's TCX
//! program does) would end the chain before capture runs: capture silently off, fail open.
use std::path::Path;

use aya::programs::{
    LinkOrder, SchedClassifier,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
};

use super::{super::PinDirs, Attachment, Kept, unpin};
use crate::error::{Cause, Result};

pub(super) fn attach(prog: &mut SchedClassifier, dir: &Path, a: &Attachment) -> Result<()> {
    let pin = dir.join(a.pin_name());

    // Adopt: swap our program into the existing link, atomically.
    if pin.exists() {
        let adopted = PinnedLink::from_pin(&pin)
            .map_err(Cause::from)
            .and_then(|p| SchedClassifierLink::try_from(FdLink::from(p)).map_err(Cause::from))
            .and_then(|link| prog.attach_to_link(link).map_err(Cause::from))
            .and_then(|id| prog.take_link(id).map_err(Cause::from));
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

    attach_first(prog, &pin, a)
}

/// A new link at the head of the hook, pinned at `pin`.
fn attach_first(prog: &mut SchedClassifier, pin: &Path, a: &Attachment) -> Result<()> {
    let id = prog
        .attach_with_options(
            &a.ifname,
            a.hook.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(|e| a.error(e))?;
    let link = prog.take_link(id).map_err(|e| a.error(e))?;
    let fd_link = FdLink::try_from(link).map_err(|e| a.error(e))?;
    fd_link
        .pin(pin)
        .map_err(|source| crate::error::Error::Pin {
            path: pin.to_path_buf(),
            source,
        })?;
    Ok(())
}

/// Keeps an adopted link first on its hook, as the kernel has it: put back if it is not on the
/// hook at all (its interface was replaced, or it was detached), moved to the head if
/// something runs before it.
pub(super) fn keep_first(
    prog: &mut SchedClassifier,
    dirs: &PinDirs,
    a: &Attachment,
) -> Result<Kept> {
    // By tag, the hash of the code: a copy of our program (see `move_to_head`) is ours too.
    let ours = prog.info().map_err(|e| a.error(e))?.tag();
    let (_, chain) =
        SchedClassifier::query_tcx(&a.ifname, a.hook.attach_type()).map_err(|e| a.error(e))?;
    if !chain.iter().any(|p| p.tag() == ours) {
        unpin(&dirs.links, &a.pin_name())?;
        attach_first(prog, &dirs.links.join(a.pin_name()), a)?;
        return Ok(Kept::Repaired);
    }
    match chain.first() {
        Some(first) if first.tag() != ours => {
            let ahead = first
                .name_as_str()
                .map_or_else(|| format!("program {}", first.id()), str::to_string);
            move_to_head(prog, dirs, a)?;
            Ok(Kept::Moved(ahead))
        }
        _ => Ok(Kept::First),
    }
}

/// Puts our program back at the head without a moment uncaptured. The kernel refuses a
/// program twice on one hook, so a second copy of it (loaded from the same object, on the same
/// pinned maps) goes in front first; its pin is renamed over the old link's, which detaches
/// the old link; then the new link is switched to our program in place.
pub(super) fn move_to_head(
    prog: &mut SchedClassifier,
    dirs: &PinDirs,
    a: &Attachment,
) -> Result<()> {
    let mut standby = super::super::loader(&dirs.maps)
        .load(super::super::OBJECT)
        .map_err(|e| a.error(e))?;
    let copy: &mut SchedClassifier = standby
        .program_mut(a.hook.program())
        .ok_or(crate::error::Error::ProgramMissing {
            program: a.hook.program(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| a.error(e))?;
    copy.load().map_err(|e| a.error(e))?;
    let (dir, name) = (&dirs.links, a.pin_name());
    let tmp = dir.join(format!("{}{name}", super::REPIN_PREFIX));
    let _ = std::fs::remove_file(&tmp);
    attach_first(copy, &tmp, a)?;
    let pin = dir.join(&name);
    std::fs::rename(&tmp, &pin)
        .map_err(|source| crate::error::Error::Bpffs { path: tmp, source })?;
    // The old link goes when the kernel releases it, a moment after its pin; until then our
    // program is still on the hook and the switch is refused. The copy does the same work on
    // the same maps, so if the switch never succeeds, the copy stays.
    for _ in 0..50 {
        let link = PinnedLink::from_pin(&pin)
            .map_err(|e| a.error(e))
            .and_then(|p| SchedClassifierLink::try_from(FdLink::from(p)).map_err(|e| a.error(e)))?;
        if let Ok(id) = prog.attach_to_link(link) {
            // The pin keeps the link; our handle to it can go.
            prog.take_link(id).map_err(|e| a.error(e))?;
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    log::debug!("{}: a copy of the program stays at the head", a.ifname);
    Ok(())
}
