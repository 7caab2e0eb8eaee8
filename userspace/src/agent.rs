//! The reconcile loop for a file source: level-triggered (the whole desired state is applied,
//! never a delta), on every change of the file and periodically, retrying failures sooner. A bad
//! file is logged and the last good state stays in the kernel.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime},
};

use crate::{dataplane::Dataplane, source::file, state::NodeState};

pub struct FileLoop {
    pub path: PathBuf,
    pub resync: Duration,
    pub poll: Duration,
}

/// What the file looked like when last read; a change of any part triggers a reconcile.
fn signature(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl FileLoop {
    pub fn run(&self, dp: &mut dyn Dataplane, stop: &AtomicBool) {
        let mut seen = None;
        let mut last_good: Option<NodeState> = None;
        let mut next_sync = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let sig = signature(&self.path);
            if sig != seen {
                seen = sig;
                match file::read(&self.path) {
                    Ok(state) => {
                        if last_good.as_ref() != Some(&state) {
                            log::info!(
                                "node description changed: {} ambient pods",
                                state.pods.len()
                            );
                        }
                        last_good = Some(state);
                    }
                    Err(e) => log::error!("{e}; keeping the last good state"),
                }
                next_sync = Instant::now();
            }
            if Instant::now() >= next_sync {
                next_sync = Instant::now() + self.resync;
                if let Some(state) = &last_good
                    && !reconcile(dp, state)
                {
                    next_sync = Instant::now() + Duration::from_secs(1);
                }
            }
            std::thread::sleep(self.poll);
        }
    }
}

/// Applies `state` and logs the outcome; false if anything needs a retry.
pub fn reconcile(dp: &mut dyn Dataplane, state: &NodeState) -> bool {
    match dp.apply(state) {
        Ok(report) => {
            for (pod, e) in &report.failed {
                log::warn!("{pod}: {e}");
            }
            if !report.ztunnel_ready {
                log::warn!("no usable ztunnel: ambient pods' TCP is dropped until one is ready");
            }
            log::debug!(
                "{} dataplane: {} pods captured",
                dp.name(),
                report.captured.len()
            );
            report.failed.is_empty()
        }
        Err(e) => {
            log::error!("{} dataplane: {e}", dp.name());
            false
        }
    }
}
