//! The real ztunnel (Istio's node proxy) on a simulated node: node-level ("shared") mode, fake
//! CA, and a local XDS file generated from the topology, so two nodes' ztunnels speak real HBONE
//! mTLS to each other and enforce real authorization policy. Its access log is what tests
//! assert on: which workload and identity ztunnel saw, in which direction, and what it decided.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::topology::{Node, Pod, Topology};

/// The last release with the node-level proxy that zdivert's node mode feeds.
pub const NODE_LEVEL_RELEASE: &str = "ztunnel-1.22.8";

/// The binary: `ZTUNNEL_BIN`, else `../shared/ztunnel/ztunnel-1.22.8` beside the repository,
/// else the one `cargo xtask setup --ztunnel-src DIR` built.
pub fn binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ZTUNNEL_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("ZTUNNEL_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/ztunnel")
        .join(NODE_LEVEL_RELEASE);
    if shared.is_file() {
        return Ok(shared);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ztunnel")
        .join(NODE_LEVEL_RELEASE);
    if built.is_file() {
        return Ok(built);
    }
    bail!(
        "no ztunnel binary: set ZTUNNEL_BIN to a ztunnel {NODE_LEVEL_RELEASE} built with the \
         `testing` feature, or build one from a ztunnel 1.22.8 checkout with \
         `cargo xtask setup --ztunnel-src DIR` (looked for {} and {})",
        shared.display(),
        built.display()
    )
}

/// An AuthorizationPolicy in ztunnel's own terms: deny (or allow) connections to these
/// destination addresses and ports, for the workloads of `namespace`.
#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub deny: bool,
    pub destination_ips: Vec<IpAddr>,
    pub destination_ports: Vec<u16>,
}

impl Policy {
    /// Denies every connection to `pod`'s `port`, on both of its addresses.
    pub fn deny_port(pod: &Pod, port: u16) -> Policy {
        Policy {
            name: format!("deny-{}-{port}", pod.name),
            namespace: pod.namespace.clone(),
            deny: true,
            destination_ips: vec![pod.ip.into(), pod.ip6.into()],
            destination_ports: vec![port],
        }
    }

    fn xds(&self) -> Value {
        let nets: Vec<String> = self
            .destination_ips
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(_) => format!("{ip}/32"),
                IpAddr::V6(_) => format!("{ip}/128"),
            })
            .collect();
        json!({
            "name": self.name,
            "namespace": self.namespace,
            "scope": "Namespace",
            "action": if self.deny { "Deny" } else { "Allow" },
            "rules": [[[{ "destinationIps": nets, "destinationPorts": self.destination_ports }]]],
        })
    }
}

/// A Service: its VIP and port, and the pods behind it (by name).
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vip: IpAddr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<String>,
}

impl Service {
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// What every ztunnel of the lab is told: workloads, services and policies.
#[derive(Clone, Debug, Default)]
pub struct MeshConfig {
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    /// Workloads with their IPv4 address only. ztunnel 1.22.8 sends a Service's connection to
    /// one of the endpoint's addresses picked at random, either family
    /// (`pick_workload_destination_or_resolve`), so a dual-stack endpoint fails half of the
    /// IPv4 clients' connections.
    pub ipv4_only: bool,
}

/// A pod's service account, as bookinfo names them: `reviews-v1` runs as `reviews`.
pub fn service_account(pod: &Pod) -> String {
    match pod.name.rsplit_once("-v") {
        Some((app, v)) if v.chars().all(|c| c.is_ascii_digit()) => app.to_string(),
        _ => pod.name.clone(),
    }
}

/// The SPIFFE identity ztunnel gives `pod`.
pub fn identity(pod: &Pod) -> String {
    format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        pod.namespace,
        service_account(pod)
    )
}

impl MeshConfig {
    /// ztunnel's local XDS file (JSON, which ztunnel reads as the YAML it is) for `topo`:
    /// every pod of every node, HBONE for ambient pods and TCP for the rest.
    pub fn xds(&self, topo: &Topology) -> String {
        let mut workloads = vec![];
        for node in &topo.nodes {
            for pod in node.pods.values() {
                let mut services = serde_json::Map::new();
                for s in self
                    .services
                    .iter()
                    .filter(|s| s.endpoints.contains(&pod.name))
                {
                    services.insert(
                        format!("{}/{}", s.namespace, s.hostname()),
                        json!({ s.port.to_string(): s.target_port }),
                    );
                }
                workloads.push(json!({
                    "uid": format!("cluster1//v1/Pod/{}/{}", pod.namespace, pod.name),
                    "name": pod.name,
                    "namespace": pod.namespace,
                    "serviceAccount": service_account(pod),
                    "trustDomain": "cluster.local",
                    "workloadIps": if self.ipv4_only {
                        vec![pod.ip.to_string()]
                    } else {
                        vec![pod.ip.to_string(), pod.ip6.to_string()]
                    },
                    "protocol": if pod.ambient { "HBONE" } else { "TCP" },
                    "node": node.name,
                    "network": "",
                    "services": services,
                }));
            }
        }
        let services: Vec<Value> = self
            .services
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "namespace": s.namespace,
                    "hostname": s.hostname(),
                    "vips": [format!("/{}", s.vip)],
                    "ports": { s.port.to_string(): s.target_port },
                })
            })
            .collect();
        let policies: Vec<Value> = self.policies.iter().map(Policy::xds).collect();
        let json = json!({ "workloads": workloads, "services": services, "policies": policies });
        unquote_numeric_keys(&json.to_string())
    }
}

/// JSON object keys are strings, but ztunnel reads port maps as `u16 → u16`: YAML's flow
/// style takes `{9080: 9080}`, so numeric keys lose their quotes. (The values written here
/// hold no escaped quotes.)
fn unquote_numeric_keys(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(at) = rest.find('"') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let end = after.find('"').map_or(after.len(), |e| e);
        let (word, tail) = (&after[..end], after.get(end + 1..).unwrap_or(""));
        if let Some(value) = tail.strip_prefix(':')
            && !word.is_empty()
            && word.bytes().all(|b| b.is_ascii_digit())
        {
            // `{9080:9080}` would be one scalar: a flow mapping needs the space.
            out.push_str(word);
            out.push_str(": ");
            rest = value;
            continue;
        } else {
            out.push('"');
            out.push_str(word);
            out.push('"');
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// ztunnel running in a node's ztunnel netns; SIGKILLed on drop (it may ignore SIGTERM).
pub struct Ztunnel {
    pub node: String,
    ns: PathBuf,
    ip: IpAddr,
    log: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
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
        let dir = std::env::temp_dir().join("zdivert-tests");
        std::fs::create_dir_all(&dir)?;
        let config = dir.join(format!("{}-ztunnel.json", node.name));
        std::fs::write(&config, mesh.xds(topo))?;
        let mut z = Ztunnel {
            node: node.name.clone(),
            ns: node.ztunnel.ns.path(),
            ip: node.ztunnel.ip.into(),
            log: dir.join(format!("{}-ztunnel.log", node.name)),
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        z.spawn()?;
        z.wait_ready(Duration::from_secs(20))?;
        Ok(z)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = binary()?;
        let log = std::fs::File::create(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.display()))
            .arg(&bin)
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

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Polls `/healthz/ready` until it answers 200; fails naming the node, with ztunnel's log
    /// tail, if ztunnel exits or is not ready in time.
    pub fn wait_ready(&mut self, within: Duration) -> Result<()> {
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills ztunnel and starts it again with the same configuration; waits until ready.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready(Duration::from_secs(20))
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

/// One access log entry (`connection complete`): ztunnel's record of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub fields: BTreeMap<String, String>,
}

impl Access {
    fn parse(line: &str) -> Option<Access> {
        let at = line.find("connection complete")?;
        let mut fields = BTreeMap::new();
        let mut rest = &line[at + "connection complete".len()..];
        loop {
            rest = rest.trim_start();
            let Some(eq) = rest.find('=') else { break };
            let key = rest[..eq].trim().to_string();
            rest = &rest[eq + 1..];
            let value;
            if let Some(quoted) = rest.strip_prefix('"') {
                let end = quoted.find('"').unwrap_or(quoted.len());
                value = quoted[..end].to_string();
                rest = quoted.get(end + 1..).unwrap_or("");
            } else {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                value = rest[..end].to_string();
                rest = &rest[end..];
            }
            fields.insert(key, value);
        }
        Some(Access { fields })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    pub fn direction(&self) -> &str {
        self.get("direction").unwrap_or_default()
    }
    pub fn src_workload(&self) -> &str {
        self.get("src.workload").unwrap_or_default()
    }
    pub fn dst_workload(&self) -> &str {
        self.get("dst.workload").unwrap_or_default()
    }
    pub fn src_identity(&self) -> &str {
        self.get("src.identity").unwrap_or_default()
    }
    pub fn error(&self) -> Option<&str> {
        self.get("error")
    }
    /// The source address ztunnel saw.
    pub fn src_ip(&self) -> Option<IpAddr> {
        self.get("src.addr")?
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip())
    }
    /// The destination: for HBONE, the address inside the tunnel (`dst.hbone_addr`).
    pub fn dst(&self) -> Option<SocketAddr> {
        self.get("dst.hbone_addr")
            .or(self.get("dst.addr"))?
            .parse()
            .ok()
    }
    /// Denied by authorization policy.
    pub fn denied(&self) -> bool {
        self.error().is_some_and(|e| e.contains("policy"))
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({}) → {} {:?}{}",
            self.direction(),
            self.src_workload(),
            self.get("src.addr").unwrap_or("?"),
            self.dst_workload(),
            self.dst(),
            self.error()
                .map(|e| format!(" error={e}"))
                .unwrap_or_default()
        )
    }
}
