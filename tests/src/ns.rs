//! Network namespaces made by the tests, and a worker thread living in each, so that sockets
//! can be created inside a namespace (a socket stays in the netns it was created in) while the
//! test drives them from anywhere.
use std::{
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
    process::Command,
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// Runs a command; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n <ns> -batch -` of several commands at once.
pub fn ip_batch(ns: &str, commands: &[String]) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.join("\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} -batch: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

type Job = Box<dyn FnOnce() + Send>;

/// A named network namespace (`/run/netns/<name>`), deleted on drop, with a worker thread in it.
pub struct Netns {
    pub name: String,
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<thread::JoinHandle<()>>,
    /// Made by us (deleted on drop), or only attached to.
    owned: bool,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self::enter(name, true)?;
        run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Another handle (own worker thread) on an existing `/run/netns` namespace; not deleted on drop.
    pub fn attach(path: &std::path::Path) -> Result<Self> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("netns path")?;
        Self::enter(name, false)
    }

    fn enter(name: &str, owned: bool) -> Result<Self> {
        let mut ns = Netns {
            name: name.into(),
            jobs: None,
            worker: None,
            owned,
        };
        let file = std::fs::File::open(ns.path())?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        ns.worker = Some(thread::spawn(move || {
            // SAFETY: setns on an fd we own, for this worker thread only.
            let ok = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
            let _ = ready_tx.send(ok);
            if ok {
                for job in rx {
                    job();
                }
            }
        }));
        ns.jobs = Some(tx);
        if !ready_rx.recv().unwrap_or(false) {
            bail!("could not enter netns {name}");
        }
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` inside the namespace and returns its result.
    pub fn exec<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .expect("worker alive")
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("worker alive");
        rx.recv().expect("netns worker answered")
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &str) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend(args.split_whitespace());
        run("ip", &a)
    }

    /// `iptables <rule>` inside the namespace, the rule as one line of words (kube-proxy's
    /// rules in tests: Service DNAT, NodePorts).
    pub fn iptables(&self, rule: &str) -> Result<String> {
        self.cmd("iptables", &rule.split_whitespace().collect::<Vec<_>>())
    }

    /// A command run inside the namespace (nsenter keeps the mount namespace: bpffs stays visible).
    pub fn cmd(&self, program: &str, args: &[&str]) -> Result<String> {
        let net = format!("--net={}", self.path().display());
        let mut a = vec![net.as_str(), program];
        a.extend_from_slice(args);
        run("nsenter", &a)
    }

    /// A counter of the netns's stack from `/proc/net/<file>` (`snmp`, `netstat`), where each
    /// `group:` (`Icmp`, `TcpExt`) is a line of names followed by a line of values.
    pub fn net_counter(&self, file: &str, group: &str, name: &str) -> Result<u64> {
        let path = format!("/proc/thread-self/net/{file}");
        let text = self.exec(move || std::fs::read_to_string(&path))?;
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .with_context(|| format!("no {group}: {name} in /proc/net/{file}"))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.exec(move || std::fs::write(&path, value).with_context(|| path.clone()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        if !self.owned {
            return;
        }
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A short prefix unique to this process and call, for netns and node names.
pub fn unique_prefix(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "zdt{}{}{}",
        std::process::id() % 100000,
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A process that does nothing inside a netns, as a pod's pause container does: on a node, this
/// is what lets the agent find a pod's namespace under `/proc` (pod namespaces have no names).
/// SIGKILLs a process this test started and reaps it, if it is still ours to stop.
pub fn kill_and_reap(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

pub struct Pause(std::process::Child);

impl Pause {
    pub fn start(ns: &Netns) -> Result<Pause> {
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["sleep", "infinity"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting a pause process")?;
        Ok(Pause(child))
    }

    /// Waits until the process is inside `ns` (nsenter enters it a moment after it starts).
    pub fn wait_in(&self, ns: &Netns) -> Result<()> {
        let want = std::fs::metadata(ns.path())?.ino();
        let at = format!("/proc/{}/ns/net", self.0.id());
        crate::eventually(
            "the pause process in its netns",
            Duration::from_secs(5),
            || Ok(std::fs::metadata(&at).map(|m| m.ino()).ok() == Some(want)),
        )
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
