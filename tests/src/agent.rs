//! The real `zdivert` binary, run in a simulated node's netns as the DaemonSet would run it on a
//! node, and always cleaned up (killed, then `zdivert cleanup`), even when a test fails.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{ns::run, topology::Node};

/// A dataplane as the tests run it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// eBPF, attached through TCX.
    Ebpf,
    /// eBPF attached through tc clsact filters, as on kernels without TCX.
    EbpfClsact,
    /// The iptables fallback.
    Iptables,
    /// In-pod ztunnel (`--ztunnel-mode inpod`), eBPF programs in each pod's netns.
    InPodEbpf,
    /// In-pod ztunnel, istio-cni's rules in each pod's netns.
    InPodIptables,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::EbpfClsact => "ebpf-clsact",
            Mode::Iptables => "iptables",
            Mode::InPodEbpf => "inpod-ebpf",
            Mode::InPodIptables => "inpod-iptables",
        }
    }

    /// The node-level eBPF dataplane (its programs, counters and pins).
    pub fn is_ebpf(self) -> bool {
        matches!(self, Mode::Ebpf | Mode::EbpfClsact)
    }

    /// In-pod ztunnel, with either redirection.
    pub fn is_in_pod(self) -> bool {
        matches!(self, Mode::InPodEbpf | Mode::InPodIptables)
    }

    pub const ALL: [Mode; 5] = [
        Mode::Ebpf,
        Mode::EbpfClsact,
        Mode::Iptables,
        Mode::InPodEbpf,
        Mode::InPodIptables,
    ];

    /// The agent's options that choose it (in-pod: with the node's ZDS socket, `zds_socket`).
    fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Ebpf => &["--mode", "ebpf"],
            Mode::EbpfClsact => &["--mode", "ebpf", "--attach", "netlink"],
            Mode::Iptables => &["--mode", "iptables"],
            Mode::InPodEbpf => &["--mode", "ebpf", "--ztunnel-mode", "inpod"],
            Mode::InPodIptables => &["--mode", "iptables", "--ztunnel-mode", "inpod"],
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Mode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .with_context(|| {
                format!("mode ebpf|ebpf-clsact|iptables|inpod-ebpf|inpod-iptables, not {s}")
            })
    }
}

pub fn zdivert_bin() -> PathBuf {
    std::env::var_os("ZDIVERT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/zdivert")
        })
}

/// Where the agent of `node` serves ZDS in in-pod mode, and its in-pod ztunnel connects.
pub fn zds_socket(node: &str) -> PathBuf {
    std::env::temp_dir()
        .join("zdivert-tests")
        .join(format!("{node}.zds.sock"))
}

/// Where the agent of `node` serves the CNI plugin.
pub fn cni_socket(node: &str) -> PathBuf {
    std::env::temp_dir()
        .join("zdivert-tests")
        .join(format!("{node}.cni.sock"))
}

pub struct Agent {
    pub node: String,
    node_ns: PathBuf,
    pub pods_file: PathBuf,
    /// Set: the agent watches the (fake) Kubernetes API this kubeconfig names, not the file.
    pub kubeconfig: Option<PathBuf>,
    pub mode: Mode,
    /// More `run` options (`--tunnel geneve`).
    pub extra: Vec<String>,
    child: Option<Child>,
}

/// Runs `zdivert <args>` in the node's netns, as the DaemonSet (hostNetwork) would.
fn zdivert_in(node_ns: &std::path::Path, args: &[&str]) -> Result<String> {
    let net = format!("--net={}", node_ns.display());
    let bin = zdivert_bin();
    let mut all = vec![net.as_str(), bin.to_str().unwrap()];
    all.extend_from_slice(args);
    run("nsenter", &all)
}

impl Agent {
    /// Writes the node description and starts the agent on it, in eBPF mode.
    pub fn start(node: &Node, description: &str) -> Result<Agent> {
        Self::start_mode(node, description, Mode::Ebpf)
    }

    pub fn start_mode(node: &Node, description: &str, mode: Mode) -> Result<Agent> {
        Self::start_with(node, description, mode, &[])
    }

    pub fn start_with(node: &Node, description: &str, mode: Mode, extra: &[&str]) -> Result<Agent> {
        let dir = std::env::temp_dir().join("zdivert-tests");
        std::fs::create_dir_all(&dir)?;
        let pods_file = dir.join(format!("{}.yaml", node.name));
        std::fs::write(&pods_file, description)?;
        let mut a = Agent {
            node: node.name.clone(),
            node_ns: node.ns.path(),
            pods_file,
            kubeconfig: None,
            mode,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        a.spawn()?;
        Ok(a)
    }

    /// Starts the agent on `node` with the Kubernetes source, as the DaemonSet runs it.
    pub fn start_kube(
        node: &Node,
        kubeconfig: &std::path::Path,
        mode: Mode,
        extra: &[&str],
    ) -> Result<Agent> {
        let mut a = Agent {
            node: node.name.clone(),
            node_ns: node.ns.path(),
            pods_file: PathBuf::new(),
            kubeconfig: Some(kubeconfig.into()),
            mode,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<()> {
        self.assert_named_for_vmtest();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node_ns.display()))
            .arg(zdivert_bin())
            .args(["--node", &self.node, "run"])
            .args(self.mode.args());
        if self.mode.is_in_pod() {
            cmd.arg("--zds-socket").arg(zds_socket(&self.node));
        }
        cmd.arg("--cni-socket").arg(cni_socket(&self.node));
        match &self.kubeconfig {
            Some(k) => cmd.env("KUBECONFIG", k),
            None => cmd.arg("--pods-file").arg(&self.pods_file),
        };
        let child = cmd
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("ZDIVERT_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .context("starting zdivert")?;
        self.child = Some(child);
        Ok(())
    }

    /// `cargo xtask vmtest` skips by name what a kernel cannot run (`--skip inpod_ebpf`,
    /// `--skip tcx`: xtask/src/vmtest.rs), so a test that needs in-pod eBPF or a TCX link must
    /// say so in its name, or it fails on older kernels instead of being listed as skipped.
    /// Checked here, where every suite runs. (libtest names each test's thread after the test;
    /// the bench, and threads a test spawns, are not tests.)
    fn assert_named_for_vmtest(&self) {
        let thread = std::thread::current();
        let Some(test) = thread.name().filter(|n| *n != "main") else {
            return;
        };
        if self.mode == Mode::InPodEbpf {
            assert!(
                test.contains("inpod_ebpf"),
                "{test} needs in-pod eBPF: its name must contain `inpod_ebpf`"
            );
        }
        if self
            .extra
            .windows(2)
            .any(|w| w[0] == "--attach" && w[1] == "tcx")
        {
            assert!(
                test.contains("tcx"),
                "{test} needs TCX links: its name must contain `tcx`"
            );
        }
    }

    /// Rewrites the node description; the agent picks it up.
    pub fn describe(&self, description: &str) -> Result<()> {
        let tmp = self.pods_file.with_extension("tmp");
        std::fs::write(&tmp, description)?;
        std::fs::rename(&tmp, &self.pods_file)?;
        Ok(())
    }

    /// The agent's process id (nsenter execs it in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        crate::ns::kill_and_reap(&mut self.child);
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Restarts the agent in another mode: it must remove the other mode's state first.
    pub fn restart_in(&mut self, mode: Mode) -> Result<()> {
        self.kill();
        self.mode = mode;
        self.spawn()
    }

    pub fn status(&self) -> Result<serde_json::Value> {
        let out = zdivert_in(
            &self.node_ns,
            &["--node", &self.node, "status", "--output", "json"],
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// `zdivert status` as an operator reads it.
    pub fn status_text(&self) -> Result<String> {
        zdivert_in(&self.node_ns, &["--node", &self.node, "status"])
    }

    /// `zdivert cleanup` for this node, with the agent stopped.
    pub fn cleanup(&mut self) -> Result<String> {
        self.kill();
        zdivert_in(&self.node_ns, &["--node", &self.node, "cleanup"])
    }

    /// `GET path` on the agent's health listener (the default 0.0.0.0:9805 in the node's netns):
    /// the status code and body.
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let addr = "127.0.0.1:9805".parse()?;
        let mut conn = zdivert::netns::run_in(&self.node_ns, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })??;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(conn, "GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        Ok((code, body))
    }

    /// The value of a sample on /metrics (`name` with its labels, as printed).
    pub fn metric(&self, sample: &str) -> Result<f64> {
        let (_, body) = self.http_get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .with_context(|| format!("no sample {sample} in /metrics"))?
            .trim()
            .parse()
            .context("not a number")
    }

    /// Waits until the agent has applied the desired state `n` times since it started.
    pub fn wait_reconciles(&self, n: u64) -> Result<()> {
        crate::eventually(
            &format!("agent for {} reconciled {n} times", self.node),
            crate::SET_UP_WITHIN,
            || Ok(self.metric("zdivert_reconciles_total")? >= n as f64),
        )
    }

    /// Packets counted for `path`/`outcome`.
    pub fn counter(&self, path: &str, outcome: &str) -> Result<u64> {
        let st = self.status()?;
        st["counters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["path"] == path && c["outcome"] == outcome)
            .and_then(|c| c["packets"].as_u64())
            .context("no such counter")
    }

    /// Starts the agent on `node` (all its pods, ztunnel included) and waits until it has set
    /// the node up.
    pub fn start_ready(node: &Node, mode: Mode, extra: &[&str]) -> Result<Agent> {
        let agent = Self::start_with(node, &node.pods_file(true), mode, extra)?;
        agent.wait_set_up(node, true)?;
        Ok(agent)
    }

    /// Waits until the agent has set `node` up in its mode, with or without a ztunnel.
    pub fn wait_set_up(&self, node: &Node, with_ztunnel: bool) -> Result<()> {
        let pods = node.pods.values().filter(|p| p.ambient).count();
        match self.mode {
            Mode::Iptables => crate::fallback::wait_layout(node, pods, with_ztunnel),
            Mode::InPodEbpf | Mode::InPodIptables => crate::inpod::wait_redirected(node, self.mode),
            Mode::Ebpf | Mode::EbpfClsact => {
                let links = pods * 2 + if with_ztunnel { 2 } else { 0 };
                self.wait_ready(pods * 2, links).map(|_| ())
            }
        }
    }

    /// Waits until the pinned state shows `addresses` pod addresses and `links` attachments.
    pub fn wait_ready(&self, addresses: usize, links: usize) -> Result<serde_json::Value> {
        let deadline = Instant::now() + crate::SET_UP_WITHIN;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(st) = self.status() {
                let pods = st["pods"].as_array().map_or(0, |a| a.len());
                let l = st["links"].as_array().map_or(0, |a| a.len());
                if pods == addresses && l == links {
                    return Ok(st);
                }
                last = format!("{pods} addresses, {l} links");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "agent for {} not ready: want {addresses} addresses and {links} links, have {last}",
            self.node
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("cleanup of {}: {e}", self.node);
        }
        if self.kubeconfig.is_none() {
            let _ = std::fs::remove_file(&self.pods_file);
        }
    }
}
