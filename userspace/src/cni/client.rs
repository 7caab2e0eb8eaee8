//! How the plugin reaches the agent on its node, and the API server when the agent cannot be
//! reached: a trait, so that the plugin's decisions are tested without either.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::{AgentRequest, plugin::PodArgs};

/// How the plugin reaches the agent (a trait so that the decision logic is tested without one).
pub trait Agent {
    /// The agent's answer line. `Unreachable` when nothing listens on the socket; any other
    /// error (no answer in time, the connection cut) means an agent is there.
    fn ask(
        &self,
        socket: &Path,
        request: &AgentRequest,
        timeout: Duration,
    ) -> Result<String, Asked>;
    /// Whether the pod is ambient, asked of the API server (`None`: cannot tell).
    fn ambient_per_api(&self, kubeconfig: &Path, pod: &PodArgs) -> Result<bool, String>;
}

/// Why the agent gave no answer.
#[derive(Debug)]
pub enum Asked {
    /// Nothing listens on its socket (no agent running).
    Unreachable(std::io::Error),
    /// It took the request and did not answer in time, or cut the connection.
    NoAnswer(std::io::Error),
}

/// The unix socket, and kube-rs for the API server.
pub struct Node;

impl Agent for Node {
    fn ask(
        &self,
        socket: &Path,
        request: &AgentRequest,
        timeout: Duration,
    ) -> Result<String, Asked> {
        let conn = UnixStream::connect(socket).map_err(Asked::Unreachable)?;
        let exchange = || -> std::io::Result<String> {
            conn.set_read_timeout(Some(timeout))?;
            let mut line = serde_json::to_vec(request)?;
            line.push(b'\n');
            (&conn).write_all(&line)?;
            let mut answer = String::new();
            BufReader::new(std::io::Read::take(&conn, 64 * 1024)).read_line(&mut answer)?;
            Ok(answer)
        };
        exchange().map_err(Asked::NoAnswer)
    }

    fn ambient_per_api(&self, kubeconfig: &Path, pod: &PodArgs) -> Result<bool, String> {
        use k8s_openapi::api::core::v1::{Namespace, Pod};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let config = kube::config::Kubeconfig::read_from(kubeconfig)
                .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
            let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
                .await
                .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
            let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
            let p = kube::Api::<Pod>::namespaced(client.clone(), &pod.namespace)
                .get(&pod.name)
                .await
                .map_err(|e| format!("reading pod: {e}"))?;
            let ns = kube::Api::<Namespace>::all(client)
                .get_opt(&pod.namespace)
                .await
                .map_err(|e| format!("reading namespace: {e}"))?;
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            // The node and ztunnel settings do not change whether a pod is ambient.
            let cfg = crate::source::kube::select::SelectConfig::new(&node, "istio-system");
            Ok(crate::source::kube::select::member(&cfg, &p, ns.as_ref()).is_ok())
        })
    }
}
