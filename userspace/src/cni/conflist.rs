//! Chaining the plugin into the primary CNI's configuration, as istio-cni's install-cni does:
//! the runtime uses the first file of its configuration directory (in lexical order), so that
//! file gets `zdivert-cni` as the last plugin of its list. A single-plugin `.conf` becomes a
//! `.conflist`. The primary CNI may rewrite its file at any time (its own agent restarting):
//! the entry is then put back. Uninstalling takes it out and leaves the rest as it was.
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's `type`, and its binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "zdivert-cni";

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("{file}: not JSON")]
    NotJson {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: neither a plugin list (`plugins`) nor a single plugin (`type`)")]
    NotCniConfig { file: PathBuf },
    #[error("{dir}: no CNI configuration yet (.conf, .conflist or .json)")]
    NoPrimary { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The entry this plugin gets in the list.
pub fn entry(
    agent_socket: &Path,
    exclude_namespaces: &[String],
    kubeconfig: Option<&Path>,
) -> Value {
    let mut e = json!({
        "type": PLUGIN_TYPE,
        "agent_socket": agent_socket,
        "exclude_namespaces": exclude_namespaces,
    });
    if let Some(k) = kubeconfig {
        e["kubeconfig"] = json!(k);
    }
    e
}

fn is_ours(plugin: &Value) -> bool {
    plugin["type"] == PLUGIN_TYPE
}

/// `config` (the file's content) with `entry` as its last plugin, once, and the name the file
/// must have (a `.conf` becomes a `.conflist`).
pub fn chain(file: &Path, config: &str, entry: &Value) -> Result<(PathBuf, Value), ConflistError> {
    let mut list = as_list(file, config)?;
    let plugins = list["plugins"]
        .as_array_mut()
        .expect("as_list makes a list");
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry.clone());
    Ok((file.with_extension("conflist"), list))
}

/// `config` without this plugin; `None` when it has none (nothing to write).
pub fn unchain(file: &Path, config: &str) -> Result<Option<Value>, ConflistError> {
    let mut list = parse(file, config)?;
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(None);
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    Ok((plugins.len() != before).then_some(list))
}

/// Whether `config` runs this plugin last, as `entry` says.
pub fn is_chained(file: &Path, config: &str, entry: &Value) -> bool {
    parse(file, config).is_ok_and(|c| {
        c["plugins"]
            .as_array()
            .and_then(|p| p.last())
            .is_some_and(|last| last == entry)
    })
}

fn parse(file: &Path, config: &str) -> Result<Value, ConflistError> {
    serde_json::from_str(config).map_err(|source| ConflistError::NotJson {
        file: file.into(),
        source,
    })
}

/// The configuration as a plugin list: a single plugin's `cniVersion` and `name` move up to
/// the list, as the runtime's own conversion does.
fn as_list(file: &Path, config: &str) -> Result<Value, ConflistError> {
    let mut c = parse(file, config)?;
    if c.get("plugins").is_some_and(Value::is_array) {
        return Ok(c);
    }
    if c.get("type").and_then(Value::as_str).is_none() {
        return Err(ConflistError::NotCniConfig { file: file.into() });
    }
    let obj = c.as_object_mut().expect("has a type");
    let version = obj.remove("cniVersion").unwrap_or(json!("0.3.1"));
    let name = obj.remove("name").unwrap_or(json!("k8s-pod-network"));
    Ok(json!({ "cniVersion": version, "name": name, "plugins": [c] }))
}

/// The file the runtime uses: the first `.conf`, `.conflist` or `.json` in lexical order.
pub fn primary(dir: &Path) -> Result<PathBuf, ConflistError> {
    let io = |source| ConflistError::Io {
        path: dir.into(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| ConflistError::NoPrimary { dir: dir.into() })
}

/// Chains the plugin into `dir`'s primary configuration if it is not there as `entry` says;
/// the file is replaced whole (written aside, renamed), never seen half-written. Returns the
/// file written, if any.
pub fn ensure(dir: &Path, entry: &Value) -> Result<Option<PathBuf>, ConflistError> {
    let file = primary(dir)?;
    let config = read(&file)?;
    if is_chained(&file, &config, entry) {
        return Ok(None);
    }
    let (target, list) = chain(&file, &config, entry)?;
    write(&target, &list)?;
    if target != file {
        std::fs::remove_file(&file).map_err(|source| ConflistError::Io { path: file, source })?;
    }
    Ok(Some(target))
}

/// Takes the plugin out of every configuration file of `dir`.
pub fn remove(dir: &Path) -> Result<Vec<PathBuf>, ConflistError> {
    let mut changed = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| ConflistError::Io {
        path: dir.into(),
        source,
    })?;
    for file in entries.flatten().map(|e| e.path()) {
        if file.extension().and_then(|e| e.to_str()) != Some("conflist") {
            continue;
        }
        if let Some(list) = unchain(&file, &read(&file)?)? {
            write(&file, &list)?;
            changed.push(file);
        }
    }
    Ok(changed)
}

fn read(file: &Path) -> Result<String, ConflistError> {
    std::fs::read_to_string(file).map_err(|source| ConflistError::Io {
        path: file.into(),
        source,
    })
}

fn write(file: &Path, list: &Value) -> Result<(), ConflistError> {
    let io = |source| ConflistError::Io {
        path: file.into(),
        source,
    };
    let tmp = file.with_extension("zdivert-tmp");
    let mut bytes = serde_json::to_vec_pretty(list).expect("a JSON value serializes");
    bytes.push(b'\n');
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, file).map_err(io)
}

#[cfg(test)]
#[path = "conflist_tests.rs"]
mod tests;
