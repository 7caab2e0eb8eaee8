//! The agent's socket for the CNI plugin. It decides whether a pod is ambient with the same
//! selection as the source (reading the pod and its namespace from the API server, where the
//! watch may not have brought them yet), and hands an ambient pod to the reconcile loop, which
//! answers once the pod is captured. One connection, one request, one answer.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use super::{AgentReply, AgentRequest};
use crate::{
    agent::{Input, cni},
    state::{PodId, PodSpec},
};

/// Whether a pod belongs in the mesh, as the source decides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Membership {
    Ambient {
        /// The pod's uid as the source knows it (used where the runtime gave none).
        uid: Option<String>,
        service_account: String,
    },
    Outside(String),
}

pub trait Classify: Send + Sync {
    /// `uid` is the runtime's (`K8S_POD_UID`), empty if it gave none.
    fn classify(&self, pod: &PodId, uid: &str) -> Result<Membership, String>;
}

/// The node description file (`--pods-file`), read afresh for each question: a pod it lists
/// among `pods` is ambient.
pub struct FromFile(pub PathBuf);

impl Classify for FromFile {
    fn classify(&self, pod: &PodId, _uid: &str) -> Result<Membership, String> {
        let state = crate::source::file::read(&self.0).map_err(|e| e.chain().to_string())?;
        Ok(match state.pods.get(pod) {
            Some(spec) => Membership::Ambient {
                uid: Some(spec.uid.clone()).filter(|u| !u.is_empty()),
                service_account: spec.service_account.clone(),
            },
            None => Membership::Outside(format!("not an ambient pod of {}", self.0.display())),
        })
    }
}

/// The API server: the pod and its namespace, read when asked (the watch may lag the runtime
/// by seconds), judged by `select::member`.
pub struct FromApi {
    pub client: kube::Client,
    pub config: crate::source::kube::select::SelectConfig,
    pub runtime: tokio::runtime::Handle,
}

impl Classify for FromApi {
    fn classify(&self, pod: &PodId, uid: &str) -> Result<Membership, String> {
        use k8s_openapi::api::core::v1::{Namespace, Pod};
        let (p, ns) = self.runtime.block_on(async {
            let p = kube::Api::<Pod>::namespaced(self.client.clone(), &pod.namespace)
                .get(&pod.name)
                .await;
            let ns = kube::Api::<Namespace>::all(self.client.clone())
                .get_opt(&pod.namespace)
                .await;
            (p, ns)
        });
        let p = p.map_err(|e| format!("reading pod {pod}: {e}"))?;
        let ns = ns.map_err(|e| format!("reading namespace {}: {e}", pod.namespace))?;
        let api_uid = p.metadata.uid.clone().unwrap_or_default();
        if !uid.is_empty() && api_uid != uid {
            // The API server still has the previous pod of that name (a StatefulSet's).
            return Err(format!(
                "pod {pod}: the API server has uid {api_uid}, the runtime {uid}: not yet known"
            ));
        }
        Ok(
            match crate::source::kube::select::member(&self.config, &p, ns.as_ref()) {
                Ok(service_account) => Membership::Ambient {
                    uid: Some(api_uid),
                    service_account,
                },
                Err(why) => Membership::Outside(why.to_string()),
            },
        )
    }
}

/// Serves `path` from a thread of its own until the process ends. Only root may connect (the
/// runtime runs plugins as root): the socket is 0600.
pub fn serve(
    path: &Path,
    classify: Arc<dyn Classify>,
    inputs: mpsc::Sender<Input>,
    timeout: Duration,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A previous agent's socket file: nobody listens on it any more.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    log::info!("cni: serving the plugin on {}", path.display());
    std::thread::Builder::new()
        .name("cni-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (classify, inputs) = (classify.clone(), inputs.clone());
                let _ = std::thread::Builder::new()
                    .name("cni-request".into())
                    .spawn(move || answer(conn, classify.as_ref(), &inputs, timeout));
            }
        })?;
    Ok(())
}

/// What the agent keeps of the plugin's wait to send its answer.
const ANSWER_MARGIN: Duration = Duration::from_millis(300);

/// The longest request taken: a request is a few hundred bytes.
const MAX_REQUEST: u64 = 64 * 1024;

fn answer(
    conn: UnixStream,
    classify: &dyn Classify,
    inputs: &mpsc::Sender<Input>,
    timeout: Duration,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = BufReader::new(std::io::Read::take(&conn, MAX_REQUEST)).read_line(&mut line);
    let reply = match read.map_err(|e| e.to_string()).and_then(|_| {
        serde_json::from_str::<AgentRequest>(&line).map_err(|e| format!("not a request: {e}"))
    }) {
        Ok(request) => decide(&request, classify, inputs, timeout),
        Err(error) => AgentReply::Failed { error },
    };
    let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
    bytes.push(b'\n');
    let _ = (&conn).write_all(&bytes);
}

fn decide(
    request: &AgentRequest,
    classify: &dyn Classify,
    inputs: &mpsc::Sender<Input>,
    timeout: Duration,
) -> AgentReply {
    let pod = PodId {
        namespace: request.namespace.clone(),
        name: request.name.clone(),
    };
    // Answered before the plugin gives up, with a moment to spare for the answer to travel.
    let timeout = request
        .timeout_ms
        .map(|ms| Duration::from_millis(ms).saturating_sub(ANSWER_MARGIN))
        .map_or(timeout, |t| t.min(timeout));
    let command = match request.command.as_str() {
        // DEL releases whatever the pod had, whether or not it is ambient now.
        "DEL" => cni::Command::Del,
        "ADD" | "CHECK" => match classify.classify(&pod, &request.uid) {
            Err(error) => {
                return AgentReply::Failed {
                    error: format!("deciding whether {pod} is ambient: {error}"),
                };
            }
            Ok(Membership::Outside(why)) => {
                if request.command == "ADD" && !request.netns.is_empty() {
                    // Whose netns it is, so that no other pod is given it by its address. No
                    // answer is awaited: there is nothing to apply.
                    let (reply, _) = mpsc::channel();
                    let _ = inputs.send(Input::Cni(cni::Request {
                        pod: pod.clone(),
                        command: cni::Command::Outside(PathBuf::from(&request.netns)),
                        deadline: Instant::now() + timeout,
                        reply,
                    }));
                }
                return AgentReply::Outside { why };
            }
            Ok(Membership::Ambient { .. }) if request.command == "CHECK" => cni::Command::Check,
            Ok(Membership::Ambient {
                uid,
                service_account,
            }) => match spec(request, uid, service_account) {
                Ok(spec) => cni::Command::Add(spec),
                Err(error) => return AgentReply::Failed { error },
            },
        },
        other => {
            return AgentReply::Failed {
                error: format!("unknown command `{other}`"),
            };
        }
    };
    let (reply, answered) = mpsc::channel();
    let sent = inputs.send(Input::Cni(cni::Request {
        pod: pod.clone(),
        command,
        deadline: Instant::now() + timeout,
        reply,
    }));
    if sent.is_err() {
        return AgentReply::Failed {
            error: "the agent is stopping".into(),
        };
    }
    match answered.recv_timeout(timeout) {
        Ok(Ok(())) => AgentReply::Done,
        Ok(Err(error)) => AgentReply::Failed { error },
        Err(_) => AgentReply::Failed {
            error: format!("{pod} not captured within {timeout:?}"),
        },
    }
}

/// The pod as the dataplane takes it: the runtime's netns and IPAM's addresses.
fn spec(
    request: &AgentRequest,
    source_uid: Option<String>,
    service_account: String,
) -> Result<PodSpec, String> {
    let netns = PathBuf::from(&request.netns);
    std::fs::metadata(&netns).map_err(|e| format!("netns {}: {e}", netns.display()))?;
    if request.ips.is_empty() {
        return Err("the primary plugin gave the pod no address (prevResult.ips)".into());
    }
    let uid = Some(request.uid.clone())
        .filter(|u| !u.is_empty())
        .or(source_uid)
        .ok_or("no pod uid (K8S_POD_UID in CNI_ARGS), and the source knows none")?;
    Ok(PodSpec {
        ips: request.ips.clone(),
        uid,
        service_account,
        netns: Some(netns),
    })
}
