//! `zdivert-cni`, the plugin's side, as the CNI specification (1.1) has a runtime drive it: the
//! command and the pod in the environment, the network configuration (with the primary
//! plugin's `prevResult`) on stdin, the result or a CNI error as JSON on stdout.
//!
//! - ADD: an ambient pod is answered only once the agent captured it; the pod's result is the
//!   primary plugin's, untouched. A pod outside the mesh costs one question to the agent.
//! - Fail closed: when the agent cannot be reached, ADD fails for an ambient pod (the runtime
//!   retries) and succeeds for every other. Which pod is ambient is then asked of the API
//!   server (`kubeconfig`), or, without one, every pod outside `exclude_namespaces` fails.
//! - DEL always succeeds (the runtime would retry it forever otherwise): the agent also
//!   releases pods whose sandbox went. CHECK asks the agent.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::{Value, json};

pub use super::client::{Agent, Asked, Node};
use super::{AgentReply, AgentRequest, DEFAULT_SOCKET};

/// The specification versions whose configuration and results this plugin reads: all that
/// have `prevResult.ips` as a list.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error: its code (the specification's, 100+ ours), message and details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// The specification's error codes this plugin uses.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Ours: the agent could not capture an ambient pod, or said something unreadable.
    pub const NOT_CAPTURED: u32 = 100;
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The plugin's entry in the conflist.
#[derive(Debug, Deserialize)]
pub struct Config {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default, rename = "prevResult")]
    pub prev_result: Option<Value>,
    /// The agent's socket.
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    /// Namespaces whose pods are never held up by this plugin.
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// For when the agent cannot be reached: where to ask which pod is ambient.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// How long ADD waits for the agent's answer.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}

fn default_timeout() -> u64 {
    10
}

/// What the runtime put in the environment.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Env {
    pub fn from_process() -> Env {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }
}

/// The pod, from `CNI_ARGS` (`K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;K8S_POD_UID=…`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

pub fn pod_args(cni_args: &str) -> Result<Option<PodArgs>, CniError> {
    let mut pod = PodArgs::default();
    for pair in cni_args.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_ARGS is not KEY=VALUE pairs separated by `;`",
                format!("`{pair}`"),
            )
        })?;
        match k {
            "K8S_POD_NAMESPACE" => pod.namespace = v.into(),
            "K8S_POD_NAME" => pod.name = v.into(),
            "K8S_POD_UID" => pod.uid = v.into(),
            _ => {}
        }
    }
    // A container that is not a Kubernetes pod's: nothing of the mesh's business.
    Ok((!pod.namespace.is_empty() && !pod.name.is_empty()).then_some(pod))
}

fn require<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
    value
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, format!("{name} is not set"), ""))
}

/// The addresses the primary plugin gave (`prevResult.ips[].address`, CIDR notation).
pub fn prev_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let bad = |d: String| CniError::new(code::DECODING_FAILURE, "prevResult.ips is malformed", d);
    let Some(ips) = prev.get("ips") else {
        return Ok(vec![]);
    };
    let ips = ips.as_array().ok_or_else(|| bad("not a list".into()))?;
    ips.iter()
        .map(|entry| {
            let cidr = entry["address"]
                .as_str()
                .ok_or_else(|| bad(format!("{entry}: no `address`")))?;
            let ip = cidr.split_once('/').map_or(cidr, |(ip, _)| ip);
            ip.parse().map_err(|e| bad(format!("`{cidr}`: {e}")))
        })
        .collect()
}

/// Runs one command: what to print on stdout, or the error to print.
pub fn run(env: &Env, stdin: &[u8], agent: &dyn Agent) -> Result<Value, (CniError, String)> {
    let command = require(&env.command, "CNI_COMMAND").map_err(|e| (e, "1.1.0".into()))?;
    if command == "VERSION" {
        return Ok(json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS }));
    }
    let config: Config = serde_json::from_slice(stdin).map_err(|e| {
        (
            CniError::new(
                code::DECODING_FAILURE,
                "stdin is not a network configuration",
                e.to_string(),
            ),
            "1.1.0".to_string(),
        )
    })?;
    let version = config.cni_version.clone();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err((
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {version} is not supported"),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ),
            SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].into(),
        ));
    }
    command_for(command, env, &config, agent).map_err(|e| (e, version))
}

fn command_for(
    command: &str,
    env: &Env,
    config: &Config,
    agent: &dyn Agent,
) -> Result<Value, CniError> {
    match command {
        "ADD" => add(env, config, agent),
        "DEL" => {
            del(env, config, agent);
            Ok(Value::Null)
        }
        "CHECK" => check(env, config, agent).map(|()| Value::Null),
        // Nothing of this plugin's to collect or report (1.1's GC and STATUS).
        "GC" | "STATUS" => Ok(Value::Null),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_COMMAND {other} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"),
            "",
        )),
    }
}

fn request(
    command: &str,
    env: &Env,
    pod: &PodArgs,
    ips: Vec<IpAddr>,
) -> Result<AgentRequest, CniError> {
    Ok(AgentRequest {
        command: command.into(),
        container_id: require(&env.container_id, "CNI_CONTAINERID")?.into(),
        netns: env.netns.clone().unwrap_or_default(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        ips,
        timeout_ms: None,
    })
}

/// The pod this invocation is for, unless it is none of the mesh's business.
fn pod_in_scope(env: &Env, config: &Config) -> Result<Option<PodArgs>, CniError> {
    let Some(pod) = pod_args(env.args.as_deref().unwrap_or(""))? else {
        return Ok(None);
    };
    Ok((!config.exclude_namespaces.contains(&pod.namespace)).then_some(pod))
}

fn add(env: &Env, config: &Config, agent: &dyn Agent) -> Result<Value, CniError> {
    let prev = config.prev_result.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "no prevResult: zdivert-cni is chained after the primary plugin, never alone",
            "",
        )
    })?;
    let netns = require(&env.netns, "CNI_NETNS")?;
    require(&env.ifname, "CNI_IFNAME")?;
    let Some(pod) = pod_in_scope(env, config)? else {
        return Ok(prev);
    };
    std::fs::metadata(netns).map_err(|e| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_NETNS {netns}: {e}"),
            "",
        )
    })?;
    let req = request("ADD", env, &pod, prev_ips(&prev)?)?;
    match ask(agent, config, &req)? {
        Some(AgentReply::Done) | Some(AgentReply::Outside { .. }) => Ok(prev),
        Some(AgentReply::Failed { error }) => Err(CniError::new(
            code::NOT_CAPTURED,
            format!("{}/{}: not captured", pod.namespace, pod.name),
            error,
        )),
        None => unreachable_agent(config, agent, &pod).map(|()| prev),
    }
}

fn del(env: &Env, config: &Config, agent: &dyn Agent) {
    let Ok(Some(pod)) = pod_in_scope(env, config) else {
        return;
    };
    let Ok(req) = request("DEL", env, &pod, vec![]) else {
        return;
    };
    // Whatever the answer: the agent also releases pods whose sandbox went.
    if let Err(e) = ask(agent, config, &req) {
        eprintln!("zdivert-cni: DEL {}/{}: {}", pod.namespace, pod.name, e.msg);
    }
}

fn check(env: &Env, config: &Config, agent: &dyn Agent) -> Result<(), CniError> {
    if config.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "CHECK without prevResult",
            "",
        ));
    }
    let Some(pod) = pod_in_scope(env, config)? else {
        return Ok(());
    };
    let req = request("CHECK", env, &pod, vec![])?;
    match ask(agent, config, &req)? {
        Some(AgentReply::Done) | Some(AgentReply::Outside { .. }) => Ok(()),
        Some(AgentReply::Failed { error }) => Err(CniError::new(
            code::NOT_CAPTURED,
            format!(
                "{}/{}: not captured as ADD left it",
                pod.namespace, pod.name
            ),
            error,
        )),
        None => unreachable_agent(config, agent, &pod),
    }
}

/// The agent's answer; `None` if it could not be reached.
fn ask(
    agent: &dyn Agent,
    config: &Config,
    req: &AgentRequest,
) -> Result<Option<AgentReply>, CniError> {
    let timeout = Duration::from_secs(config.timeout_secs.max(1));
    let req = AgentRequest {
        timeout_ms: Some(timeout.as_millis() as u64),
        ..req.clone()
    };
    let answer = match agent.ask(&config.agent_socket, &req, timeout) {
        Ok(answer) => answer,
        Err(Asked::Unreachable(e)) => {
            eprintln!(
                "zdivert-cni: agent at {}: {e}",
                config.agent_socket.display()
            );
            return Ok(None);
        }
        Err(Asked::NoAnswer(e)) => {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "the agent at {} gave no answer within {timeout:?}",
                    config.agent_socket.display()
                ),
                e.to_string(),
            ));
        }
    };
    serde_json::from_str(&answer).map(Some).map_err(|e| {
        CniError::new(
            code::NOT_CAPTURED,
            format!(
                "the agent at {} answered garbage",
                config.agent_socket.display()
            ),
            format!("{e}: `{}`", answer.trim_end()),
        )
    })
}

/// The agent cannot be reached: a pod outside the mesh goes on; an ambient one (or one that
/// cannot be told) fails, and the runtime retries.
fn unreachable_agent(config: &Config, agent: &dyn Agent, pod: &PodArgs) -> Result<(), CniError> {
    let socket = config.agent_socket.display();
    let verdict = match &config.kubeconfig {
        Some(kubeconfig) => agent.ambient_per_api(kubeconfig, pod),
        None => Err("no kubeconfig to tell whether it is ambient".into()),
    };
    match verdict {
        Ok(false) => Ok(()),
        Ok(true) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "{}/{} is ambient and the zdivert agent ({socket}) cannot be reached",
                pod.namespace, pod.name
            ),
            "the pod would start with its traffic around ztunnel",
        )),
        Err(why) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the zdivert agent ({socket}) cannot be reached and {}/{} may be ambient",
                pod.namespace, pod.name
            ),
            why,
        )),
    }
}

#[cfg(test)]
#[path = "plugin_tests.rs"]
mod tests;
