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

/// The kubeconfig the plugin reads the API server with while the agent is down, made from the
/// pod's own service account (`KUBERNETES_SERVICE_HOST`, its token and CA), as istio-cni's
/// install-cni writes one. The token is rotated: the file follows it (see `keep_chained`).
pub struct PluginKubeconfig {
    pub path: PathBuf,
    pub account: PathBuf,
}

/// Where a pod finds its service account.
pub const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl PluginKubeconfig {
    /// The kubeconfig's text for the current token; `None` outside a cluster.
    pub fn render(&self) -> Result<Option<String>, ConflistError> {
        match (
            std::env::var("KUBERNETES_SERVICE_HOST"),
            std::env::var("KUBERNETES_SERVICE_PORT"),
        ) {
            (Ok(host), Ok(port)) => self.render_for(&host, &port).map(Some),
            _ => Ok(None),
        }
    }

    /// For the API server at `host`:`port`.
    pub fn render_for(&self, host: &str, port: &str) -> Result<String, ConflistError> {
        let read = |name: &str| {
            let path = self.account.join(name);
            std::fs::read_to_string(&path).map_err(|source| ConflistError::Io { path, source })
        };
        let (token, ca) = (read("token")?, read("ca.crt")?);
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        // An IPv6 service address goes in brackets.
        let host = match host.contains(':') {
            true => format!("[{host}]"),
            false => host.to_string(),
        };
        Ok(format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: local\n  cluster:\n    server: https://{host}:{port}\n    \
             certificate-authority-data: {ca}\n\
             users:\n- name: zdivert-cni\n  user:\n    token: \"{}\"\n\
             contexts:\n- name: zdivert-cni\n  context:\n    cluster: local\n    user: zdivert-cni\n\
             current-context: zdivert-cni\n",
            token.trim()
        ))
    }

    /// Writes it (0600: it holds a token) if it changed.
    fn refresh(&self) -> Result<(), ConflistError> {
        let Some(text) = self.render()? else {
            return Ok(());
        };
        if std::fs::read_to_string(&self.path).ok().as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        let io = |source| ConflistError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        log::info!("install-cni: {} written", self.path.display());
        Ok(())
    }
}

/// Whether zdivert is being uninstalled, asked when install-cni stops: its DaemonSet is gone or
/// being deleted, or its service account can no longer read it (deleted with the rest). A
/// rolling update leaves the DaemonSet in place: the entry stays, and pods started meanwhile
/// wait for the new agent. An API server that cannot be asked also keeps the entry.
pub async fn uninstalling(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<bool, String> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    match kube::Api::<DaemonSet>::namespaced(client, namespace)
        .get_opt(name)
        .await
    {
        Ok(None) => Ok(true),
        Ok(Some(ds)) => Ok(ds.metadata.deletion_timestamp.is_some()),
        Err(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => Ok(true),
        Err(e) => Err(e.to_string()),
    }
}

/// Chains `entry` into `conf_dir`'s primary configuration, and with `once` returns; else puts
/// it back whenever it goes (the primary CNI rewrote its file) until `stop`. The plugin's
/// kubeconfig, if any, is kept up to date with the service account's token. The entry is left
/// in place when stopping: pods started while no agent runs then fail (and are retried) rather
/// than start uncaptured.
pub fn keep_chained(
    conf_dir: &Path,
    entry: &Value,
    kubeconfig: Option<&PluginKubeconfig>,
    once: bool,
    stop: &AtomicBool,
) -> Result<(), ConflistError> {
    let mut waiting_said = false;
    while !stop.load(Ordering::Relaxed) {
        match kubeconfig.map(PluginKubeconfig::refresh) {
            Some(Err(e)) if once => return Err(e),
            Some(Err(e)) => log::warn!("install-cni: {e}"),
            _ => {}
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugins_kubeconfig_is_one_kube_reads() {
        let dir = std::env::temp_dir().join(format!("zdivert-sa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "tok3n\n").unwrap();
        std::fs::write(dir.join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let k = PluginKubeconfig {
            path: dir.join("kubeconfig"),
            account: dir.clone(),
        };
        for (host, server) in [
            ("10.96.0.1", "https://10.96.0.1:443"),
            ("fd00::1", "https://[fd00::1]:443"),
        ] {
            let text = k.render_for(host, "443").unwrap();
            let parsed: kube::config::Kubeconfig = serde_yaml::from_str(&text).unwrap();
            let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
            assert_eq!(cluster.server.as_deref(), Some(server));
            let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
            assert!(
                user.token.is_some() && text.contains("token: \"tok3n\""),
                "{text}"
            );
            assert_eq!(parsed.current_context.as_deref(), Some("zdivert-cni"));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
