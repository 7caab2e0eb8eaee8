//! TCX attachments: pinned links, swapped in place with `bpf_link_update` on adoption.
use std::path::Path;

use aya::programs::{
    LinkOrder, SchedClassifier,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
};

use super::{Attachment, unpin};
use crate::error::Result;

pub(super) fn attach(prog: &mut SchedClassifier, dir: &Path, a: &Attachment) -> Result<()> {
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
        .map_err(|e| a.error(e.to_string()))?;
    let link = prog.take_link(id).map_err(|e| a.error(e.to_string()))?;
    let fd_link = FdLink::try_from(link).map_err(|e| a.error(e.to_string()))?;
    fd_link
        .pin(&pin)
        .map_err(|e| a.error(format!("pinning at {}: {e}", pin.display())))?;
    Ok(())
}
