use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::{Parser, Subcommand};
use zdivert::{
    agent::{
        self, Reconciler,
        health::{self, Health},
    },
    dataplane::{
        self,
        choose::{self, Mode},
        ebpf::attach::AttachMode,
        iptables::TunnelChoice,
        status,
    },
    source::{self, file, kube::select::SelectConfig},
};

/// Diverts Istio ambient pods' TCP into the node's ztunnel, and back.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Where bpffs is mounted.
    #[arg(long, global = true, default_value = zdivert_common::BPFFS)]
    bpffs: PathBuf,
    /// Where the iptables fallback keeps what it must restore (original sysctls, its choices).
    #[arg(long, global = true, default_value = "/run/zdivert")]
    state_dir: PathBuf,
    /// This node's name (default: $NODE_NAME; for status/cleanup: every node pinned here).
    #[arg(long, global = true, env = "NODE_NAME")]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ZtunnelMode {
    Node,
    Inpod,
}

#[derive(Subcommand)]
enum Command {
    /// Keep the node's dataplane in sync with the Kubernetes API (or a node description file).
    Run {
        /// Take the desired state from this YAML node description instead of the Kubernetes API:
        /// ztunnel (name, ips, netns) and ambient pods (name, ips).
        #[arg(long)]
        pods_file: Option<PathBuf>,
        /// Namespace of the ztunnel DaemonSet (its pods are labelled app=ztunnel).
        #[arg(long, env = "ZTUNNEL_NAMESPACE", default_value = "istio-system")]
        ztunnel_namespace: String,
        /// Do not patch `ambient.istio.io/redirection: enabled` onto captured pods.
        #[arg(long)]
        no_annotate: bool,
        /// Listener for /healthz, /readyz and /metrics (`off`: none).
        #[arg(long, default_value = "0.0.0.0:9805")]
        health_addr: String,
        /// Quiet time after a change before it is applied (a burst of events is one apply).
        #[arg(long, default_value_t = 100)]
        debounce_ms: u64,
        /// Seconds between full resyncs (the file is also watched for changes).
        #[arg(long, default_value_t = 30)]
        resync_secs: u64,
        /// Dataplane: eBPF programs, the iptables/tunnel fallback, or eBPF where it works.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// Tunnel kind for the iptables fallback.
        #[arg(long, value_enum, default_value_t = TunnelChoice::Auto)]
        tunnel: TunnelChoice,
        /// How the eBPF dataplane attaches its programs (default: TCX where the kernel has it,
        /// 6.6+, else tc clsact through netlink; in-pod mode: tc clsact, which attaches faster).
        #[arg(long, value_enum)]
        attach: Option<AttachMode>,
        /// Send ambient pods' DNS (UDP and TCP port 53) to ztunnel's DNS proxy (:15053), as
        /// istio-cni does with ztunnel's `ISTIO_META_DNS_CAPTURE=true`.
        #[arg(long)]
        dns_capture: bool,
        /// Do not hold new veths: a new pod's TCP then goes uncaptured until its pod is known
        /// (the start window). Only for nodes whose veths are not all pods'.
        #[arg(long)]
        no_hold_new_veths: bool,
        /// Which ztunnel the node runs: the node-level proxy (1.22 and before) or in-pod
        /// ztunnel, served over ZDS (redirection with istio-cni's rules; eBPF not yet).
        #[arg(long, value_enum, default_value_t = ZtunnelMode::Node)]
        ztunnel_mode: ZtunnelMode,
        /// The ZDS socket in-pod ztunnel connects to (its `INPOD_UDS`).
        #[arg(long, default_value = zdivert::zds::DEFAULT_SOCKET)]
        zds_socket: PathBuf,
        /// The socket the CNI plugin (`zdivert-cni`) asks (`off`: none).
        #[arg(long, default_value = zdivert::cni::DEFAULT_SOCKET)]
        cni_socket: String,
        /// How long an ADD may take before the plugin is told it failed (the runtime retries).
        #[arg(long, default_value_t = 10)]
        cni_timeout_secs: u64,
    },
    /// Install the CNI plugin as istio-cni's install-cni does: copy `zdivert-cni` into the CNI
    /// bin directory and chain it into the primary configuration; then keep it chained (the
    /// primary CNI may rewrite its file) until stopped. `--uninstall` takes it out instead.
    InstallCni {
        /// The plugin binary to copy (default: `zdivert-cni` beside this binary).
        #[arg(long)]
        plugin: Option<PathBuf>,
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The agent's socket, as the plugin will reach it.
        #[arg(long, default_value = zdivert::cni::DEFAULT_SOCKET)]
        agent_socket: PathBuf,
        /// Namespaces whose pods the plugin never holds up.
        #[arg(long, value_delimiter = ',', default_value = "kube-system")]
        exclude_namespaces: Vec<String>,
        /// A kubeconfig for the plugin, to tell ambient pods while the agent is down (its
        /// path on the node, as the plugin reads it).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Write that kubeconfig here (the same file, as this container mounts it), from this
        /// pod's service account, and keep it current as the token rotates.
        #[arg(long)]
        write_kubeconfig: Option<PathBuf>,
        /// Chain once and exit, instead of keeping it chained.
        #[arg(long)]
        once: bool,
        /// Take the plugin out of the configuration (the binary stays: a runtime may be
        /// running it).
        #[arg(long)]
        uninstall: bool,
        /// When stopped, take the plugin out if this DaemonSet (`namespace/name`) is gone or
        /// being deleted: zdivert is being uninstalled, not upgraded.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        uninstall_with_daemonset: Option<String>,
    },
    /// Show the pinned maps, attachments and packet counters.
    /// Show what is in the kernel for the node, in its mode: eBPF (maps, attachments,
    /// counters) or the fallback (why, tunnels, sets, every rule with its packets).
    Status {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove every program, link, pin and rule zdivert created.
    Cleanup,
    /// Say whether this kernel runs each eBPF redirection, as `--mode auto` decides it: every
    /// program of the mode loaded and one attached, and for in-pod mode a SYN assigned to a
    /// SO_REUSEPORT listener in a scratch netns. Leaves nothing behind.
    Probe {
        /// How programs would be attached (default: TCX where the kernel has it, else tc clsact).
        #[arg(long, value_enum)]
        attach: Option<AttachMode>,
        /// Write the whole verifier log of each refused program to DIR/<program>.log.
        #[arg(long, value_name = "DIR")]
        verifier_logs: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Installs the SIGTERM and SIGINT handlers, and a task that sets `STOP` on either.
async fn stop_on_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        log::info!("signalled to stop");
        STOP.store(true, Ordering::Relaxed);
    });
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zdivert: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            pods_file,
            ztunnel_namespace,
            no_annotate,
            health_addr,
            debounce_ms,
            resync_secs,
            mode,
            tunnel,
            attach,
            dns_capture,
            no_hold_new_veths,
            ztunnel_mode,
            zds_socket,
            cni_socket,
            cni_timeout_secs,
        } => {
            let node = match (&pods_file, cli.node) {
                (Some(path), node) => {
                    let described = file::read(path)?.node;
                    if let Some(n) = node.filter(|n| *n != described) {
                        anyhow::bail!(
                            "--node {n} but {} describes node {described}",
                            path.display()
                        );
                    }
                    described
                }
                (None, Some(node)) => node,
                (None, None) => anyhow::bail!(
                    "no node name: set NODE_NAME (the DaemonSet takes it from spec.nodeName) or --node"
                ),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            // Registered before anything else happens: a SIGTERM from now on stops the loop (the
            // kernel state stays), it never kills the agent halfway through an apply.
            rt.block_on(stop_on_signal())?;
            // In the pods' netns, where nothing else attaches, tc clsact filters: a TCX link
            // waits for an RCU grace period as it is created, which made the apply of one new
            // pod several times slower (bench: in-pod apply of one new pod).
            let attach = match ztunnel_mode {
                ZtunnelMode::Node => attach.unwrap_or_else(AttachMode::for_kernel),
                ZtunnelMode::Inpod => attach.unwrap_or(AttachMode::Netlink),
            };
            let options = choose::Options {
                bpffs: &cli.bpffs,
                state_dir: &cli.state_dir,
                node: &node,
                tunnel,
                attach,
                dns_capture,
            };
            let mut dp: Box<dyn zdivert::dataplane::Dataplane> = match ztunnel_mode {
                ZtunnelMode::Node => choose::build(mode, &options)?,
                ZtunnelMode::Inpod => Box::new(zdivert::dataplane::inpod::InPod::new(
                    &zds_socket,
                    &cli.state_dir,
                    &node,
                    choose::in_pod_redirection(mode, &options)?,
                )?),
            };
            let no_hold_new_veths = no_hold_new_veths || ztunnel_mode == ZtunnelMode::Inpod;
            let health = Arc::new(Health::new(&node, dp.name()).with_dataplane(dp.as_ref()));
            if health_addr != "off" {
                let addr: SocketAddr = health_addr
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--health-addr {health_addr}: {e}"))?;
                let listener = rt
                    .block_on(tokio::net::TcpListener::bind(addr))
                    .map_err(|e| anyhow::anyhow!("--health-addr {addr}: {e}"))?;
                log::info!("health and metrics on http://{addr}");
                rt.spawn(health::serve(listener, health.clone()));
            }
            let (states, desired) = std::sync::mpsc::channel();
            if !no_hold_new_veths {
                agent::links::watch(states.clone())?;
            }
            let mut reconciler = Reconciler {
                resync: Duration::from_secs(resync_secs),
                debounce: Duration::from_millis(debounce_ms),
                health: health.clone(),
                on_applied: None,
                last_ztunnel: Default::default(),
                cni_pods_file: (cni_socket != "off")
                    .then(|| agent::cni::Overlay::file_for(&cli.state_dir, &node)),
            };
            if cni_socket != "off" {
                let classify: Arc<dyn zdivert::cni::server::Classify> = match &pods_file {
                    Some(path) => Arc::new(zdivert::cni::server::FromFile(path.clone())),
                    None => Arc::new(zdivert::cni::server::FromApi {
                        client: rt.block_on(kube::Client::try_default()).map_err(|e| {
                            anyhow::anyhow!("no Kubernetes client for the CNI socket: {e}")
                        })?,
                        config: SelectConfig::new(&node, &ztunnel_namespace),
                        runtime: rt.handle().clone(),
                    }),
                };
                zdivert::cni::server::serve(
                    std::path::Path::new(&cni_socket),
                    classify,
                    states.clone(),
                    Duration::from_secs(cni_timeout_secs),
                )
                .map_err(|e| anyhow::anyhow!("--cni-socket {cni_socket}: {e}"))?;
            }
            match pods_file {
                Some(path) => {
                    let health = health.clone();
                    std::thread::spawn(move || {
                        agent::file::watch(path, Duration::from_millis(200), states, &health, &STOP)
                    });
                }
                None => {
                    let client = rt.block_on(kube::Client::try_default()).map_err(|e| {
                        anyhow::anyhow!(
                            "no Kubernetes client (in-cluster config or KUBECONFIG): {e}"
                        )
                    })?;
                    let captured = (!no_annotate).then(|| {
                        let (tx, rx) = tokio::sync::watch::channel(None);
                        reconciler.on_applied = Some(Box::new(move |pods| {
                            tx.send_replace(Some(pods));
                        }));
                        rx
                    });
                    let cfg = SelectConfig::new(&node, &ztunnel_namespace);
                    log::info!("watching the Kubernetes API for node {node}'s pods");
                    rt.spawn(source::kube::run(client, cfg, states, health, captured));
                }
            }
            reconciler.run(dp.as_mut(), desired, &STOP);
            rt.shutdown_background();
            // Deliberately no cleanup: the kernel state keeps redirecting while no agent runs.
            log::info!("stopping; redirection stays in place");
            Ok(())
        }
        Command::InstallCni {
            plugin,
            bin_dir,
            conf_dir,
            agent_socket,
            exclude_namespaces,
            kubeconfig,
            write_kubeconfig,
            once,
            uninstall,
            uninstall_with_daemonset,
        } => {
            use zdivert::cni::{conflist, install};
            if uninstall {
                for file in conflist::remove(&conf_dir)? {
                    println!("{}: zdivert-cni taken out", file.display());
                }
                return Ok(());
            }
            let plugin = match plugin {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name(conflist::PLUGIN_TYPE),
            };
            let entry = conflist::entry(&agent_socket, &exclude_namespaces, kubeconfig.as_deref());
            // From here on, SIGTERM ends the loop below instead of the process halfway.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(stop_on_signal())?;
            install::copy_plugin(&plugin, &bin_dir)?;
            let written = write_kubeconfig.map(|path| install::PluginKubeconfig {
                path,
                account: install::SERVICE_ACCOUNT.into(),
            });
            install::keep_chained(&conf_dir, &entry, written.as_ref(), once, &STOP)?;
            let Some(ds) = uninstall_with_daemonset.filter(|_| !once) else {
                return Ok(());
            };
            let (namespace, name) = ds.split_once('/').ok_or_else(|| {
                anyhow::anyhow!("--uninstall-with-daemonset {ds}: not namespace/name")
            })?;
            let asked = rt.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .map_err(|e| e.to_string())?;
                install::uninstalling(client, namespace, name).await
            });
            match asked {
                Ok(true) => {
                    for file in conflist::remove(&conf_dir)? {
                        log::info!(
                            "install-cni: {ds} is gone: zdivert-cni taken out of {}",
                            file.display()
                        );
                    }
                }
                Ok(false) => {
                    log::info!("install-cni: {ds} stays (an upgrade): zdivert-cni stays chained")
                }
                Err(e) => log::warn!(
                    "install-cni: cannot tell whether {ds} is gone ({e}): zdivert-cni stays chained"
                ),
            }
            Ok(())
        }
        Command::Status { output } => {
            for node in status::nodes(&cli.bpffs, &cli.state_dir, cli.node) {
                let zds = zdivert::zds::read_status(&cli.state_dir, &node);
                let in_pod = zdivert::dataplane::inpod::read_choice(&cli.state_dir, &node);
                let pods = zdivert::dataplane::inpod::pods::read(&cli.state_dir, &node);
                // In-pod with istio-cni's rules, the node has no dataplane state of its own.
                let st = match status::read(&cli.bpffs, &cli.state_dir, &node) {
                    Ok(st) => Some(st),
                    Err(_) if zds.is_some() => None,
                    Err(e) => return Err(e.into()),
                };
                match output {
                    Output::Json => {
                        let mut v = match &st {
                            Some(st) => serde_json::to_value(st)?,
                            None => serde_json::json!({ "node": node }),
                        };
                        if let Some(z) = &zds {
                            v["zds"] = z.clone();
                        }
                        if let Some(c) = &in_pod {
                            v["inpod_redirection"] = c.as_str().into();
                        }
                        if let Some(p) = &pods {
                            v["inpod_pods"] = serde_json::to_value(p)?;
                        }
                        println!("{v}");
                    }
                    // In-pod mode leads with what serves the pods: the ZDS peers, then each
                    // pod's redirection; the node-level view is not the one in use.
                    Output::Text => match &in_pod {
                        Some(c) => {
                            println!("node {node}: in-pod redirection: {c}");
                            if let Some(z) = &zds {
                                print!("{}", zdivert::zds::render_status(z));
                            }
                            if let Some(p) = &pods {
                                print!("{}", zdivert::dataplane::inpod::pods::render(p));
                            }
                            match &st {
                                Some(status::Status::Ebpf(e)) => print!("{}", e.render_in_pod()),
                                Some(other) => print!("{}", other.render()),
                                None => {}
                            }
                        }
                        None => {
                            if let Some(st) = &st {
                                print!("{}", st.render());
                            }
                            if let Some(z) = &zds {
                                print!("{}", zdivert::zds::render_status(z));
                            }
                        }
                    },
                }
            }
            Ok(())
        }
        Command::Probe {
            attach,
            verifier_logs,
        } => {
            use zdivert::dataplane::ebpf::{self, ProgramSet};
            choose::check_object(choose::Mode::Ebpf, ebpf::object())?;
            let attach = attach.unwrap_or_else(AttachMode::for_kernel);
            for set in [ProgramSet::NodeLevel, ProgramSet::InPod] {
                match ebpf::probe_logging(&cli.bpffs, attach, set, verifier_logs.as_deref()) {
                    Ok(()) => println!("{} eBPF: usable (attached through {attach})", set.name()),
                    Err(why) => println!("{} eBPF: not usable: {why}", set.name()),
                }
            }
            Ok(())
        }
        Command::Cleanup => {
            for node in status::nodes(&cli.bpffs, &cli.state_dir, cli.node) {
                for line in dataplane::cleanup(&cli.bpffs, &cli.state_dir, &node)? {
                    println!("node {node}: {line}");
                }
            }
            Ok(())
        }
    }
}
