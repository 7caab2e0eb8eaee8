//! deploy/base parsed into k8s-openapi types (as the API server would decode them), and checked for
//! what the agent needs on a node: host namespaces, privileges, bpffs, the node name, probes on
//! the agent's own endpoints, every taint tolerated, a one-at-a-time rollout, and just the RBAC
//! the Kubernetes source uses.
use std::{collections::BTreeSet, path::PathBuf};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;
use serde_json::Value;

/// The base every overlay builds on (`deploy/` itself renders it unchanged).
fn base() -> PathBuf {
    deploy().join("base")
}

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Default)]
struct Manifests {
    namespace: String,
    daemonsets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

/// Every document of every resource the kustomization lists, decoded by its kind.
fn load() -> Result<Manifests> {
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(base().join("kustomization.yaml"))?)?;
    let mut m = Manifests {
        namespace: kustomization["namespace"]
            .as_str()
            .context("kustomization sets a namespace")?
            .into(),
        ..Manifests::default()
    };
    let resources = kustomization["resources"].as_array().context("resources")?;
    for r in resources {
        let file = r.as_str().context("resource is a path")?;
        let text =
            std::fs::read_to_string(base().join(file)).with_context(|| format!("deploy/{file}"))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).with_context(|| format!("deploy/{file}: not YAML"))?;
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let decode = |what: &str| format!("deploy/{file}: {what} does not decode");
            match kind.as_str() {
                "DaemonSet" => m
                    .daemonsets
                    .push(serde_json::from_value(v).with_context(|| decode("DaemonSet"))?),
                "ServiceAccount" => m
                    .service_accounts
                    .push(serde_json::from_value(v).with_context(|| decode("ServiceAccount"))?),
                "ClusterRole" => m
                    .roles
                    .push(serde_json::from_value(v).with_context(|| decode("ClusterRole"))?),
                "ClusterRoleBinding" => m
                    .bindings
                    .push(serde_json::from_value(v).with_context(|| decode("ClusterRoleBinding"))?),
                other => bail!("deploy/{file}: unexpected kind {other:?}"),
            }
        }
    }
    // Every manifest in deploy/ is part of the kustomization.
    let listed: BTreeSet<&str> = resources.iter().filter_map(Value::as_str).collect();
    for entry in std::fs::read_dir(base())? {
        let name = entry?.file_name().into_string().unwrap_or_default();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                listed.contains(name.as_str()),
                "deploy/{name} is not in kustomization.yaml"
            );
        }
    }
    Ok(m)
}

fn agent(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.template.spec.as_ref().expect("pod spec");
    spec.containers
        .iter()
        .find(|c| c.name == "zdivert")
        .expect("a zdivert container")
}

#[test]
fn the_daemonset_has_what_the_agent_needs_on_a_node() -> Result<()> {
    let m = load()?;
    assert_eq!(m.daemonsets.len(), 1);
    let ds = &m.daemonsets[0];
    let spec = &ds.spec;
    let pod = spec.template.spec.as_ref().context("pod spec")?;

    assert_eq!(
        pod.host_network,
        Some(true),
        "hostNetwork: the veths are in the node's netns"
    );
    assert_eq!(
        pod.host_pid,
        Some(true),
        "hostPID: ztunnel's netns is found under /proc"
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("zdivert"));
    let tolerations = pod.tolerations.as_ref().context("tolerations")?;
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );

    let strategy = spec.update_strategy.as_ref().context("updateStrategy")?;
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let max = strategy
        .rolling_update
        .as_ref()
        .and_then(|r| r.max_unavailable.as_ref());
    assert_eq!(
        max,
        Some(&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let selector = spec.selector.match_labels.as_ref().context("matchLabels")?;
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .context("labels")?;
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the selector matches the template"
    );

    let c = agent(ds);
    let sc = c.security_context.as_ref().context("securityContext")?;
    let caps: BTreeSet<&str> = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.add.as_ref())
        .map(|a| a.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let privileged = sc.privileged == Some(true);
    assert!(
        privileged
            || ["BPF", "NET_ADMIN", "SYS_ADMIN"]
                .iter()
                .all(|cap| caps.contains(cap)),
        "privileged or BPF+NET_ADMIN+SYS_ADMIN: {sc:?}"
    );

    // bpffs: the host's /sys/fs/bpf, Bidirectional (which the API server only allows privileged).
    let volumes = pod.volumes.as_ref().context("volumes")?;
    let bpffs = volumes
        .iter()
        .find(|v| v.name == "bpffs")
        .context("a bpffs volume")?;
    assert_eq!(
        bpffs.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/bpf")
    );
    let mounts = c.volume_mounts.as_ref().context("volumeMounts")?;
    let m_bpffs = mounts
        .iter()
        .find(|m| m.name == "bpffs")
        .context("bpffs mounted")?;
    assert_eq!(m_bpffs.mount_path, "/sys/fs/bpf");
    assert_eq!(m_bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
    assert!(
        privileged,
        "Bidirectional propagation needs a privileged container"
    );
    for m in mounts {
        assert!(
            volumes.iter().any(|v| v.name == m.name),
            "mount {} has a volume",
            m.name
        );
    }
    // ...and mounted if the node booted without it.
    let init = pod.init_containers.as_ref().context("an init container")?;
    let mounter = init
        .iter()
        .find(|c| c.name == "mount-bpffs")
        .context("mount-bpffs")?;
    let script = mounter.command.as_ref().context("command")?.join(" ");
    assert!(script.contains("mount -t bpf bpf /sys/fs/bpf"), "{script}");
    assert!(
        mounter
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "bpffs" && m.mount_propagation.as_deref() == Some("Bidirectional"))
    );

    // NODE_NAME from the downward API.
    let env = c.env.as_ref().context("env")?;
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .context("NODE_NAME")?;
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .context("fieldRef")?;
    assert_eq!(field.field_path, "spec.nodeName");

    // Probes on the agent's own endpoints, on the port it listens on.
    let args = c.args.as_ref().context("args")?;
    let addr = args
        .windows(2)
        .find(|w| w[0] == "--health-addr")
        .map(|w| w[1].clone())
        .context("--health-addr")?;
    let port: i32 = addr.rsplit(':').next().context("port")?.parse()?;
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .with_context(|| format!("{path} probe"))?;
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
    }
    assert!(
        c.ports.iter().flatten().any(|p| p.container_port == port),
        "port {port} declared"
    );
    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "Kubernetes is the default source: no --pods-file"
    );
    assert!(!args.iter().any(|a| a == "--pods-file"));
    Ok(())
}

#[test]
fn rbac_grants_what_the_source_uses_and_no_more() -> Result<()> {
    let m = load()?;
    assert_eq!(m.service_accounts.len(), 1);
    let sa = m.service_accounts[0]
        .metadata
        .name
        .as_deref()
        .context("name")?;
    assert_eq!(m.roles.len(), 1);
    let role = &m.roles[0];
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let want: BTreeSet<(String, String, String)> = [
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "pods", "patch"),
        ("", "namespaces", "get"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        // install-cni, when it stops: is zdivert being uninstalled?
        ("apps", "daemonsets", "get"),
    ]
    .iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(granted, want);

    assert_eq!(m.bindings.len(), 1);
    let b = &m.bindings[0];
    assert_eq!(
        (b.role_ref.kind.as_str(), b.role_ref.name.as_str()),
        (
            "ClusterRole",
            role.metadata.name.as_deref().unwrap_or_default()
        )
    );
    let subject = b.subjects.iter().flatten().next().context("a subject")?;
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", sa)
    );
    assert_eq!(
        subject.namespace.as_deref(),
        Some(m.namespace.as_str()),
        "the subject lives where kustomize puts the account"
    );
    Ok(())
}

#[test]
fn the_image_recipe_builds_in_stages_and_ships_the_fallback_tools() -> Result<()> {
    let text = std::fs::read_to_string(deploy().join("Containerfile"))?;
    let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    assert!(
        text.contains("cargo xtask build-ebpf --release"),
        "the agent embeds the eBPF object"
    );
    let runtime = text.rsplit("\nFROM ").next().context("a runtime stage")?;
    for tool in ["iptables", "ipset", "util-linux"] {
        assert!(runtime.contains(tool), "the runtime stage installs {tool}");
    }
    assert!(runtime.contains("COPY --from=build"));
    let kustomization = std::fs::read_to_string(base().join("kustomization.yaml"))?;
    let ds = std::fs::read_to_string(base().join("daemonset.yaml"))?;
    assert!(
        ds.contains("image: zdivert") && kustomization.contains("- name: zdivert"),
        "kustomize sets the image"
    );
    Ok(())
}

/// `kubectl kustomize dir`. `cargo xtask setup` installs kubectl (Debian's package): without
/// it this fails.
fn kustomize(dir: &std::path::Path) -> Result<String> {
    let out = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(dir)
        .output()
        .context("running kubectl kustomize (apt-get install kubectl)")?;
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn kustomize_renders_the_namespace_and_image() -> Result<()> {
    let text = kustomize(&deploy())?;
    let mut kinds = vec![];
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc)?;
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        if kind != "ClusterRole" && kind != "ClusterRoleBinding" {
            assert_eq!(
                v["metadata"]["namespace"], "istio-system",
                "{kind} lands in istio-system"
            );
        }
        if kind == "DaemonSet" {
            let ds: DaemonSet = serde_json::from_value(v)?;
            assert_eq!(
                agent(&ds).image.as_deref(),
                Some("ghcr.io/zdivert/zdivert:0.1.0")
            );
        }
        kinds.push(kind);
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
    Ok(())
}

/// The DaemonSet kustomize renders from `deploy/<overlay>`.
fn rendered_daemonset(overlay: &str) -> Result<DaemonSet> {
    let text = kustomize(&deploy().join(overlay))?;
    serde_yaml::Deserializer::from_str(&text)
        .map(Value::deserialize)
        .filter_map(Result::ok)
        .find(|v| v["kind"] == "DaemonSet")
        .map(serde_json::from_value)
        .context("no DaemonSet rendered")?
        .map_err(Into::into)
}

/// The in-pod overlay: the agent in `--ztunnel-mode inpod --mode auto`, its ZDS socket inside
/// the host directory ztunnel's DaemonSet mounts too.
#[test]
fn the_in_pod_overlay_shares_the_zds_socket_directory() -> Result<()> {
    let ds = rendered_daemonset("inpod")?;
    let c = agent(&ds);
    let args = c.args.clone().unwrap_or_default();
    let after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    assert_eq!(
        after("--ztunnel-mode").as_deref(),
        Some("inpod"),
        "{args:?}"
    );
    // The programs where they load, istio-cni's rules elsewhere: decided per node.
    assert_eq!(after("--mode").as_deref(), Some("auto"), "{args:?}");
    let socket = after("--zds-socket").context("--zds-socket")?;
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| socket.starts_with(&format!("{}/", m.mount_path)))
        .with_context(|| format!("no mount holds {socket}"))?;
    let spec = ds.spec.template.spec.as_ref().context("pod spec")?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .context("the mount's volume")?;
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/var/run/ztunnel"),
        "ztunnel's DaemonSet mounts this host directory"
    );
    // The rest of the DaemonSet is the base's.
    assert_eq!(spec.host_pid, Some(true));
    Ok(())
}

/// What follows `flag` in `args`.
fn after(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The host path behind `path` in `c`, through its volume mounts and the pod's hostPath volumes.
fn host_path(ds: &DaemonSet, c: &Container, path: &str) -> Option<String> {
    let spec = ds.spec.template.spec.as_ref()?;
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.starts_with(&format!("{}/", m.mount_path)))?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?;
    let host = &volume.host_path.as_ref()?.path;
    Some(format!("{host}{}", &path[mount.mount_path.len()..]))
}

/// The CNI plugin, installed as istio-cni's install-cni installs it, in both ztunnel modes:
/// the binary and the chained entry go into the host's CNI directories, the plugin reaches the
/// agent's socket and the kubeconfig written for it at the paths the agent and install-cni use
/// on the host, and the image ships the plugin.
#[test]
fn the_cni_plugin_is_installed_where_the_runtime_and_the_agent_meet_it() -> Result<()> {
    for overlay in ["base", "inpod"] {
        let ds = rendered_daemonset(overlay)?;
        let spec = ds.spec.template.spec.as_ref().context("pod spec")?;
        let install = spec
            .containers
            .iter()
            .find(|c| c.name == "install-cni")
            .context("an install-cni container")?;
        let args = install.command.clone().unwrap_or_default();
        assert_eq!(
            args.get(1).map(String::as_str),
            Some("install-cni"),
            "{args:?}"
        );
        for (flag, host) in [
            ("--bin-dir", "/opt/cni/bin"),
            ("--conf-dir", "/etc/cni/net.d"),
        ] {
            let dir = after(&args, flag).with_context(|| format!("{overlay}: {flag}"))?;
            assert_eq!(
                host_path(&ds, install, &format!("{dir}/x")).as_deref(),
                Some(format!("{host}/x").as_str()),
                "{overlay}: {flag} {dir} is the host's {host}"
            );
        }
        // The plugin runs on the host: the paths in its entry are the host's.
        let socket = after(&args, "--agent-socket").context("--agent-socket")?;
        let agent_args = agent(&ds).args.clone().unwrap_or_default();
        let served = after(&agent_args, "--cni-socket").context("the agent's --cni-socket")?;
        assert_eq!(
            host_path(&ds, agent(&ds), &served).as_deref(),
            Some(socket.as_str()),
            "{overlay}: the agent serves the plugin where it asks"
        );
        // Its own DaemonSet, to tell an uninstall from an upgrade when it stops.
        let ds_name = ds.metadata.name.clone().context("DaemonSet name")?;
        assert_eq!(
            after(&args, "--uninstall-with-daemonset"),
            Some(format!("$(POD_NAMESPACE)/{ds_name}"))
        );
        let pod_namespace = install
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "POD_NAMESPACE")
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone());
        assert_eq!(pod_namespace.as_deref(), Some("metadata.namespace"));
        let kubeconfig = after(&args, "--kubeconfig").context("--kubeconfig")?;
        let written = after(&args, "--write-kubeconfig").context("--write-kubeconfig")?;
        assert_eq!(
            host_path(&ds, install, &written).as_deref(),
            Some(kubeconfig.as_str())
        );
    }
    let image = std::fs::read_to_string(deploy().join("Containerfile"))?;
    assert!(
        image.contains("/zdivert-cni") && image.contains("target/release/zdivert-cni"),
        "the image ships zdivert-cni beside the agent"
    );
    Ok(())
}
