//! The real ztunnel (Istio's node proxy) on a simulated node: node-level ("shared") mode, fake
//! CA, and a local XDS file generated from the topology, so two nodes' ztunnels speak real HBONE
//! mTLS to each other and enforce real authorization policy. Its access log is what tests
//! assert on: which workload and identity ztunnel saw, in which direction, and what it decided.
mod access;
mod mesh;

pub use access::Access;
pub use mesh::{LaterPod, MeshConfig, Policy, Service, identity, service_account, workload_uid};

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::topology::{Node, Topology};

/// The last release with the node-level proxy that zdivert's node mode feeds.
pub const NODE_LEVEL_RELEASE: &str = "ztunnel-1.22.8";

/// The in-pod build (node-level mode was removed in 1.23) that zdivert's ZDS server feeds.
pub const IN_POD_RELEASE: &str = "ztunnel-1.31-dev";

/// The binary: `ZTUNNEL_BIN`, else `../shared/ztunnel/ztunnel-1.22.8` beside the repository,
/// else the one `cargo xtask setup --ztunnel-src DIR` built.
pub fn binary() -> Result<PathBuf> {
    binary_of(
        "ZTUNNEL_BIN",
        NODE_LEVEL_RELEASE,
        "build one from a ztunnel 1.22.8 checkout with `cargo xtask setup --ztunnel-src DIR`",
    )
}

/// The in-pod binary: `ZTUNNEL_INPOD_BIN`, else `../shared/ztunnel/ztunnel-1.31-dev`, else
/// `target/ztunnel/ztunnel-1.31-dev`.
pub fn in_pod_binary() -> Result<PathBuf> {
    binary_of(
        "ZTUNNEL_INPOD_BIN",
        IN_POD_RELEASE,
        "build one from ztunnel's master (62d8265 or later) with `cargo build --profile \
         quick-release --no-default-features --features tls-aws-lc,testing`",
    )
}

fn binary_of(variable: &str, release: &str, how: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(variable) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("{variable}={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/ztunnel")
        .join(release);
    if shared.is_file() {
        return Ok(shared);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ztunnel")
        .join(release);
    if built.is_file() {
        return Ok(built);
    }
    bail!(
        "no ztunnel binary: set {variable} to a ztunnel {release} built with the `testing` \
         feature, or {how} (looked for {} and {})",
        shared.display(),
        built.display()
    )
}

/// ztunnel running in a node's ztunnel netns; SIGKILLed on drop (it may ignore SIGTERM).
pub struct Ztunnel {
    pub node: String,
    ns: PathBuf,
    ip: IpAddr,
    log: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    bin: PathBuf,
    child: Option<Child>,
}

/// Readiness (`/healthz/ready`) is served on every address of ztunnel's netns.
const READINESS_PORT: u16 = 15021;

impl Ztunnel {
    /// Starts ztunnel on `node` with `mesh` and waits until it is ready.
    pub fn start(topo: &Topology, node: &Node, mesh: &MeshConfig) -> Result<Ztunnel> {
        Self::start_with(topo, node, mesh, &[])
    }

    /// With more environment (`ISTIO_META_DNS_CAPTURE=true`).
    pub fn start_with(
        topo: &Topology,
        node: &Node,
        mesh: &MeshConfig,
        env: &[(&str, &str)],
    ) -> Result<Ztunnel> {
        Self::start_in(topo, node, &node.ztunnel, mesh, env)
    }

    /// In another pod of `node` than its ztunnel pod: the new pod of a rolling update.
    pub fn start_in(
        topo: &Topology,
        node: &Node,
        pod: &crate::topology::Pod,
        mesh: &MeshConfig,
        env: &[(&str, &str)],
    ) -> Result<Ztunnel> {
        let mut z = Self::prepare(node, pod, &mesh.xds(topo), env, binary()?)?;
        z.spawn()?;
        z.wait_ready()?;
        Ok(z)
    }

    /// The in-pod ztunnel in `pod` (the node's ztunnel pod, or the new one of a rolling
    /// update), a client of the ZDS socket at `uds`. Not waited for: it is ready only once
    /// the agent has sent it the snapshot.
    pub fn start_in_pod(
        topo: &Topology,
        node: &Node,
        pod: &crate::topology::Pod,
        mesh: &MeshConfig,
        uds: &std::path::Path,
    ) -> Result<Ztunnel> {
        Self::start_in_pod_with(topo, node, pod, mesh, uds, &[])
    }

    /// With more environment.
    pub fn start_in_pod_with(
        topo: &Topology,
        node: &Node,
        pod: &crate::topology::Pod,
        mesh: &MeshConfig,
        uds: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Result<Ztunnel> {
        let uds = uds.to_str().context("socket path")?;
        let mut env = env.to_vec();
        env.push(("INPOD_UDS", uds));
        let xds = mesh.xds_in_pod(topo);
        let mut z = Self::prepare(node, pod, &xds, &env, in_pod_binary()?)?;
        z.spawn()?;
        Ok(z)
    }

    fn prepare(
        node: &Node,
        pod: &crate::topology::Pod,
        xds: &str,
        env: &[(&str, &str)],
        bin: PathBuf,
    ) -> Result<Ztunnel> {
        let dir = std::env::temp_dir().join("zdivert-tests");
        std::fs::create_dir_all(&dir)?;
        let config = dir.join(format!("{}-{}.json", node.name, pod.name));
        std::fs::write(&config, xds)?;
        Ok(Ztunnel {
            node: node.name.clone(),
            ns: pod.ns.path(),
            ip: pod.ip.into(),
            log: dir.join(format!("{}-{}.log", node.name, pod.name)),
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            bin,
            child: None,
        })
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = &self.bin;
        let log = std::fs::File::create(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.display()))
            .arg(bin)
            .args(["proxy", "ztunnel"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("CA_ADDRESS", "")
            .env("LOCAL_XDS_PATH", &self.config)
            .env("NODE_NAME", &self.node)
            .env("POD_NAME", format!("ztunnel-{}", self.node))
            .env("POD_NAMESPACE", "istio-system")
            .env("INSTANCE_IP", self.ip.to_string())
            .env("CLUSTER_ID", "cluster1")
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls `/healthz/ready` until it answers 200; fails naming the node, with ztunnel's log
    /// tail, if ztunnel exits or is not ready within `SET_UP_WITHIN`. In-pod ztunnel is ready
    /// only once the agent's ZDS socket gave it a snapshot, and it retries that socket with a
    /// backoff that grows to 15 s: its readiness follows the agent's, as slow as that is.
    pub fn wait_ready(&mut self) -> Result<()> {
        let within = crate::SET_UP_WITHIN;
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "ztunnel on {} exited ({status}):\n{}",
                    self.node,
                    self.log_tail(30)
                );
            }
            if self.ready() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "ztunnel on {} not ready within {within:?}:\n{}",
            self.node,
            self.log_tail(30)
        )
    }

    fn ready(&self) -> bool {
        let ns = crate::ns::Netns::attach(&self.ns);
        let Ok(ns) = ns else { return false };
        let addr = SocketAddr::new(self.ip, READINESS_PORT);
        ns.exec(move || -> Result<bool> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: z\r\nConnection: close\r\n\r\n")?;
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            Ok(answer.starts_with("HTTP/1.1 200"))
        })
        .unwrap_or(false)
    }

    /// SIGKILL, then wait: the listeners are gone when this returns.
    pub fn kill(&mut self) {
        crate::ns::kill_and_reap(&mut self.child);
    }

    /// SIGTERM, as the kubelet stops a pod, and the wait for ztunnel's own drain (it closes its
    /// listeners and tells HBONE peers to go away). Whether it exited within `within`; if not,
    /// it is killed.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        // SAFETY: a signal to our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        false
    }

    /// Kills ztunnel and starts it again with the same configuration; waits until ready.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready()
    }

    /// ztunnel's pid (nsenter execs it, so it is the child's).
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every `connection complete` line of the access log so far.
    pub fn access_log(&self) -> Vec<Access> {
        self.log().lines().filter_map(Access::parse).collect()
    }

    /// Waits until the access log has at least `n` entries matching `pred`, returns them: an
    /// entry is written when the connection closes, a moment after the client saw the end.
    pub fn wait_access(&self, n: usize, pred: impl Fn(&Access) -> bool) -> Result<Vec<Access>> {
        let mut found = vec![];
        crate::eventually(
            &format!("{n} matching access log entries on {}", self.node),
            Duration::from_secs(5),
            || {
                found = self.access_log().into_iter().filter(|a| pred(a)).collect();
                Ok(found.len() >= n)
            },
        )
        .with_context(|| format!("access log:\n{}", self.access_summary()))?;
        Ok(found)
    }

    /// One line per access log entry, for assertion messages.
    pub fn access_summary(&self) -> String {
        self.access_log()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.kill();
    }
}
