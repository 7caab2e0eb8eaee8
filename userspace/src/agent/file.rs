//! The file source: a node description re-read whenever it changes. A bad file is logged and
//! not sent, so the last good state stays.
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::Sender,
    },
    time::{Duration, SystemTime},
};

use super::health::Health;
use crate::source::file;

/// What the file looked like when last read; a change of any part means a re-read.
fn signature(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Polls `path` until `stop`, sending every good version of it.
pub fn watch(
    path: PathBuf,
    poll: Duration,
    states: Sender<super::Input>,
    health: &Health,
    stop: &AtomicBool,
) {
    let mut seen = None;
    while !stop.load(Ordering::Relaxed) {
        let sig = signature(&path);
        if sig != seen {
            seen = sig;
            match file::read(&path) {
                Ok(state) => {
                    if states.send(state.into()).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    health.source_error();
                    log::error!("{}; keeping the last good state", e.chain());
                }
            }
        }
        std::thread::sleep(poll);
    }
}
