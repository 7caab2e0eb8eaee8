use std::{cell::RefCell, path::Path};

use super::*;

/// An agent that answers `answer` (or cannot be reached), and an API server that says `api`.
struct FakeAgent {
    answer: Option<String>,
    api: Result<bool, String>,
    asked: RefCell<Vec<AgentRequest>>,
}

impl FakeAgent {
    fn answering(answer: &str) -> Self {
        FakeAgent {
            answer: Some(answer.into()),
            api: Err("no API server".into()),
            asked: RefCell::default(),
        }
    }

    fn down(api: Result<bool, String>) -> Self {
        FakeAgent {
            answer: None,
            api,
            asked: RefCell::default(),
        }
    }
}

impl Agent for FakeAgent {
    fn ask(&self, _: &Path, request: &AgentRequest, _: Duration) -> Result<String, Asked> {
        self.asked.borrow_mut().push(request.clone());
        self.answer.clone().ok_or_else(|| {
            Asked::Unreachable(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
        })
    }

    fn ambient_per_api(&self, _: &Path, _: &PodArgs) -> Result<bool, String> {
        self.api.clone()
    }
}

fn env(command: &str, namespace: &str) -> Env {
    Env {
        command: Some(command.into()),
        container_id: Some("c0ffee".into()),
        netns: Some("/proc/self/ns/net".into()),
        ifname: Some("eth0".into()),
        args: Some(format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-0;K8S_POD_UID=u-1"
        )),
    }
}

fn prev() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/proc/self/ns/net"}],
        "ips": [{"address": "10.244.1.5/24", "interface": 0}, {"address": "fd00::5/64"}],
    })
}

fn conf(extra: Value) -> Vec<u8> {
    let mut c = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "zdivert-cni", "prevResult": prev(), "kubeconfig": "/kc"});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn error_code(r: Result<Value, (CniError, String)>) -> u32 {
    r.expect_err("a CNI error").0.code
}

#[test]
fn version_lists_what_the_plugin_reads() {
    let out = run(&env("VERSION", "default"), b"", &FakeAgent::down(Ok(false))).unwrap();
    assert_eq!(out["supportedVersions"], json!(SUPPORTED_VERSIONS));
}

#[test]
fn add_returns_prev_result_untouched_once_the_agent_captured_the_pod() {
    let agent = FakeAgent::answering(r#"{"result":"done"}"#);
    let out = run(&env("ADD", "default"), &conf(json!({})), &agent).unwrap();
    assert_eq!(out, prev());
    let asked = agent.asked.borrow();
    assert_eq!(asked[0].command, "ADD");
    assert_eq!(
        (asked[0].name.as_str(), asked[0].uid.as_str()),
        ("web-0", "u-1")
    );
    assert_eq!(
        asked[0].ips,
        [
            "10.244.1.5".parse::<IpAddr>().unwrap(),
            "fd00::5".parse().unwrap()
        ]
    );
}

#[test]
fn add_fails_when_the_agent_could_not_capture_or_answers_garbage() {
    let failed = FakeAgent::answering(r#"{"result":"failed","error":"no ztunnel"}"#);
    let (e, _) = run(&env("ADD", "default"), &conf(json!({})), &failed).unwrap_err();
    assert_eq!(
        (e.code, e.details.as_str()),
        (code::NOT_CAPTURED, "no ztunnel")
    );
    let garbage = FakeAgent::answering("HTTP/1.1 200 OK\r\n");
    let (e, _) = run(&env("ADD", "default"), &conf(json!({})), &garbage).unwrap_err();
    assert!(e.msg.contains("garbage"), "{e:?}");
}

#[test]
fn with_the_agent_down_only_pods_outside_the_mesh_start() {
    let ambient = FakeAgent::down(Ok(true));
    assert_eq!(
        error_code(run(&env("ADD", "default"), &conf(json!({})), &ambient)),
        code::TRY_AGAIN_LATER
    );
    let outside = FakeAgent::down(Ok(false));
    assert_eq!(
        run(&env("ADD", "default"), &conf(json!({})), &outside).unwrap(),
        prev()
    );
    // The API server cannot be asked either: the pod may be ambient, so it waits.
    let unknown = FakeAgent::down(Err("connection refused".into()));
    assert_eq!(
        error_code(run(&env("ADD", "default"), &conf(json!({})), &unknown)),
        code::TRY_AGAIN_LATER
    );
}

#[test]
fn excluded_namespaces_and_non_kubernetes_containers_are_never_held_up() {
    let agent = FakeAgent::down(Ok(true));
    assert_eq!(
        run(&env("ADD", "kube-system"), &conf(json!({})), &agent).unwrap(),
        prev()
    );
    let mut bare = env("ADD", "default");
    bare.args = Some("IgnoreUnknown=1".into());
    assert_eq!(run(&bare, &conf(json!({})), &agent).unwrap(), prev());
    assert!(agent.asked.borrow().is_empty());
}

#[test]
fn del_succeeds_whatever_the_agent_says() {
    let down = FakeAgent::down(Ok(true));
    assert_eq!(
        run(
            &env("DEL", "default"),
            &conf(json!({"prevResult": null})),
            &down
        )
        .unwrap(),
        Value::Null
    );
    assert_eq!(down.asked.borrow()[0].command, "DEL");
}

#[test]
fn bad_input_gets_the_specifications_codes() {
    let agent = FakeAgent::answering(r#"{"result":"done"}"#);
    assert_eq!(
        error_code(run(&env("ADD", "default"), b"{not json", &agent)),
        code::DECODING_FAILURE
    );
    assert_eq!(
        error_code(run(
            &env("ADD", "default"),
            &conf(json!({"cniVersion": "9.9.9"})),
            &agent
        )),
        code::INCOMPATIBLE_VERSION
    );
    assert_eq!(
        error_code(run(
            &env("ADD", "default"),
            &conf(json!({"prevResult": null})),
            &agent
        )),
        code::INVALID_CONFIG
    );
    let mut no_netns = env("ADD", "default");
    no_netns.netns = Some("/proc/self/ns/no-such".into());
    assert_eq!(
        error_code(run(&no_netns, &conf(json!({})), &agent)),
        code::INVALID_ENVIRONMENT
    );
    let mut no_command = env("ADD", "default");
    no_command.command = None;
    assert_eq!(
        error_code(run(&no_command, &conf(json!({})), &agent)),
        code::INVALID_ENVIRONMENT
    );
    let mut bad_args = env("ADD", "default");
    bad_args.args = Some("K8S_POD_NAME".into());
    assert_eq!(
        error_code(run(&bad_args, &conf(json!({})), &agent)),
        code::INVALID_ENVIRONMENT
    );
    let bad_ips = conf(json!({"prevResult": {"ips": [{"address": "10.0.0.300/24"}]}}));
    assert_eq!(
        error_code(run(&env("ADD", "default"), &bad_ips, &agent)),
        code::DECODING_FAILURE
    );
    // None of these reached the agent: nothing was half-applied.
    assert!(agent.asked.borrow().is_empty());
}
