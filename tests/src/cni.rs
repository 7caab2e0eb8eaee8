//! A container runtime's CNI side, as containerd's libcni drives a conflist: each plugin of the
//! list in turn, executed from `CNI_PATH` in the node's netns with the runtime's environment,
//! its configuration on stdin with the previous plugin's result as `prevResult`; DEL in reverse
//! order with the ADD's result. The plugins are Debian's reference plugins (ptp, host-local)
//! and `zdivert-cni`; the pod's netns is made as a runtime makes it (`ip netns add`).
use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::Result;
use serde_json::{Value, json};

use crate::{
    ns::Netns,
    topology::{Node, Pod, v6_of},
};

/// Where Debian puts the reference plugins (`containernetworking-plugins`).
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// `zdivert-cni`, built beside the agent.
pub fn plugin_bin() -> PathBuf {
    crate::agent::zdivert_bin().with_file_name("zdivert-cni")
}

/// A failed plugin: the CNI error it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub plugin: String,
    pub code: u64,
    pub msg: String,
    pub details: String,
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed: code {}: {} ({})",
            self.plugin, self.code, self.msg, self.details
        )
    }
}

impl std::error::Error for CniError {}

/// A pod as the runtime knows it.
pub struct Sandbox {
    /// Its netns, name and the address it is to get.
    pub pod: Pod,
    pub uid: String,
    pub container_id: String,
    /// The ADD's result, for DEL and CHECK.
    pub result: Option<Value>,
}

pub struct Runtime {
    node_ns: PathBuf,
    conflist: Value,
    cni_path: String,
}

impl Runtime {
    /// ptp with host-local IPAM, then `zdivert-cni` asking the agent on `agent_socket`.
    pub fn ptp(
        node: &Node,
        ipam_dir: &Path,
        agent_socket: &Path,
        kubeconfig: Option<&Path>,
    ) -> Runtime {
        let gateway = node.gateway;
        let [a, b, c, _] = gateway.octets();
        let mut zdivert = json!({
            "type": "zdivert-cni",
            "agent_socket": agent_socket,
            "timeout_secs": 10,
        });
        if let Some(k) = kubeconfig {
            zdivert["kubeconfig"] = json!(k);
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "zdivert-lab",
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": false,
                    "mtu": 1500,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": ipam_dir,
                        "ranges": [[{
                            "subnet": format!("{a}.{b}.{c}.0/24"),
                            "gateway": gateway.to_string(),
                        }]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                zdivert,
            ],
        });
        Runtime {
            node_ns: node.ns.path(),
            conflist,
            cni_path: format!(
                "{REFERENCE_PLUGINS}:{}",
                plugin_bin().parent().expect("in a directory").display()
            ),
        }
    }

    /// How long `zdivert-cni` waits for the agent's answer; `None`: the plugin's default.
    pub fn set_timeout(&mut self, secs: Option<u64>) {
        let last = self.conflist["plugins"].as_array().map_or(0, |p| p.len()) - 1;
        let plugin = &mut self.conflist["plugins"][last];
        match secs {
            Some(secs) => plugin["timeout_secs"] = json!(secs),
            None => {
                if let Some(plugin) = plugin.as_object_mut() {
                    plugin.remove("timeout_secs");
                }
            }
        }
    }

    /// A new pod's sandbox: its netns, made as a runtime makes it; host-local gives it `ip`.
    pub fn sandbox(
        &self,
        node: &Node,
        namespace: &str,
        name: &str,
        uid: &str,
        ip: Ipv4Addr,
    ) -> Result<Sandbox> {
        Ok(Sandbox {
            pod: Pod {
                name: name.into(),
                namespace: namespace.into(),
                ip,
                ip6: v6_of(ip),
                ambient: true,
                host_veth: String::new(),
                ns: Netns::new(&format!("{}-{name}", node.name))?,
            },
            uid: uid.into(),
            container_id: format!("{:016x}", rand_id()),
            result: None,
        })
    }

    /// The list for `pod`: host-local's range narrowed to the pod's one address, so that which
    /// pod gets which address is up to the test.
    fn plugins(&self, pod: &Sandbox) -> Vec<Value> {
        let mut plugins = self.conflist["plugins"].as_array().expect("a list").clone();
        let range = &mut plugins[0]["ipam"]["ranges"][0][0];
        range["rangeStart"] = json!(pod.pod.ip.to_string());
        range["rangeEnd"] = json!(pod.pod.ip.to_string());
        plugins
    }

    /// Runs one plugin with `command`; its stdout on success.
    pub fn exec(
        &self,
        plugin: &Value,
        command: &str,
        pod: &Sandbox,
        prev: Option<&Value>,
    ) -> Result<Value, CniError> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let mut config = plugin.clone();
        config["cniVersion"] = self.conflist["cniVersion"].clone();
        config["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        let failed = |code, msg: String| CniError {
            plugin: kind.clone(),
            code,
            msg,
            details: String::new(),
        };
        let bin = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(&kind))
            .find(|p| p.exists())
            .ok_or_else(|| failed(0, format!("no {kind} in CNI_PATH {}", self.cni_path)))?;
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.node_ns.display()))
            .arg(&bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", pod.pod.ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    pod.pod.namespace, pod.pod.name, pod.container_id, pod.uid
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(0, format!("exec {}: {e}", bin.display())))?;
        let stdin = serde_json::to_vec(&config).expect("JSON");
        let _ = child.stdin.take().expect("piped").write_all(&stdin);
        let out = child
            .wait_with_output()
            .map_err(|e| failed(0, format!("waiting for {kind}: {e}")))?;
        let stdout: Value = match out.stdout.is_empty() {
            true => Value::Null,
            false => serde_json::from_slice(&out.stdout).map_err(|e| {
                failed(
                    0,
                    format!(
                        "{kind} printed no JSON ({e}): {}",
                        String::from_utf8_lossy(&out.stdout)
                    ),
                )
            })?,
        };
        if out.status.success() {
            return Ok(stdout);
        }
        Err(CniError {
            plugin: kind.clone(),
            code: stdout["code"].as_u64().unwrap_or(0),
            msg: stdout["msg"].as_str().unwrap_or_default().to_string(),
            details: format!(
                "{} (stderr: {})",
                stdout["details"].as_str().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }

    /// ADD through the whole list; the pod keeps the final result.
    pub fn add(&self, pod: &mut Sandbox) -> Result<Value, CniError> {
        self.add_timed(pod).map(|(result, _)| result)
    }

    /// As `add`, with how long each plugin took.
    pub fn add_timed(
        &self,
        pod: &mut Sandbox,
    ) -> Result<(Value, Vec<(String, std::time::Duration)>), CniError> {
        let mut prev: Option<Value> = None;
        let mut took = Vec::new();
        for plugin in self.plugins(pod) {
            let started = std::time::Instant::now();
            prev = Some(self.exec(&plugin, "ADD", pod, prev.as_ref())?);
            let kind = plugin["type"].as_str().unwrap_or_default().to_string();
            took.push((kind, started.elapsed()));
        }
        pod.result = prev.clone();
        Ok((prev.unwrap_or(Value::Null), took))
    }

    /// DEL through the list in reverse, as the runtime tears a sandbox down.
    pub fn del(&self, pod: &Sandbox) -> Result<(), CniError> {
        for plugin in self.plugins(pod).iter().rev() {
            self.exec(plugin, "DEL", pod, pod.result.as_ref())?;
        }
        Ok(())
    }

    pub fn check(&self, pod: &Sandbox) -> Result<(), CniError> {
        for plugin in self.plugins(pod) {
            self.exec(&plugin, "CHECK", pod, pod.result.as_ref())?;
        }
        Ok(())
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The address ptp gave the pod (`ips[0]` of the result).
pub fn address(result: &Value) -> Option<Ipv4Addr> {
    let cidr = result["ips"][0]["address"].as_str()?;
    cidr.split('/').next()?.parse().ok()
}
