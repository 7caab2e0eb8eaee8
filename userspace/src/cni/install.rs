//! `zdivert install-cni`: what the DaemonSet's install container does on each node.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use serde_json::Value;

use super::conflist::{self, ConflistError, PLUGIN_TYPE};

/// How often the configuration directory is looked at for a primary CNI that rewrote its file.
const RECHECK: Duration = Duration::from_secs(1);

/// Copies the plugin into `bin_dir` under its type's name, replacing any older one whole (a
/// runtime running the old binary keeps it until it exits).
pub fn copy_plugin(plugin: &Path, bin_dir: &Path) -> Result<PathBuf, ConflistError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConflistError::Io { path, source }
    };
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    std::fs::copy(plugin, &tmp).map_err(io(plugin))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &target).map_err(io(&target))?;
    log::info!("install-cni: {} installed", target.display());
    Ok(target)
}

/// Chains `entry` into `conf_dir`'s primary configuration, and with `once` returns; else puts
/// it back whenever it goes (the primary CNI rewrote its file) until `stop`. The entry is left
/// in place when stopping: pods started while no agent runs then fail (and are retried) rather
/// than start uncaptured.
pub fn keep_chained(
    conf_dir: &Path,
    entry: &Value,
    once: bool,
    stop: &AtomicBool,
) -> Result<(), ConflistError> {
    let mut waiting_said = false;
    while !stop.load(Ordering::Relaxed) {
        match conflist::ensure(conf_dir, entry) {
            Ok(Some(file)) => log::info!("install-cni: chained into {}", file.display()),
            Ok(None) => {}
            Err(e @ ConflistError::NoPrimary { .. }) if !once => {
                if !waiting_said {
                    log::info!("install-cni: {e}: waiting for the primary CNI");
                    waiting_said = true;
                }
            }
            Err(e) if once => return Err(e),
            Err(e) => log::warn!("install-cni: {e}"),
        }
        if once {
            return Ok(());
        }
        std::thread::sleep(RECHECK);
    }
    Ok(())
}
