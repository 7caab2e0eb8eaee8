use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use clap::{Parser, Subcommand};
use zdivert::{
    agent::FileLoop,
    dataplane::ebpf::{self, EbpfDataplane},
    source::file,
    status,
};

/// Diverts Istio ambient pods' TCP into the node's ztunnel, and back.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Where bpffs is mounted.
    #[arg(long, global = true, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// This node's name (default: $NODE_NAME; for status/cleanup: every node pinned here).
    #[arg(long, global = true, env = "NODE_NAME")]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Keep the node's dataplane in sync with a node description file.
    Run {
        /// YAML node description: ztunnel (name, ips, netns) and ambient pods (name, ips).
        #[arg(long)]
        pods_file: PathBuf,
        /// Seconds between full resyncs (the file is also watched for changes).
        #[arg(long, default_value_t = 30)]
        resync_secs: u64,
    },
    /// Show the pinned maps, attachments and packet counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove every program, link, pin and rule zdivert created.
    Cleanup,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn pinned_nodes(bpffs: &Path, node: Option<String>) -> Vec<String> {
    if let Some(n) = node {
        return vec![n];
    }
    let dir = bpffs.join("zdivert").join(zdivert_common::PIN_VERSION);
    let mut nodes: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    nodes.sort();
    nodes
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
            resync_secs,
        } => {
            let initial = file::read(&pods_file)?;
            let node = match cli.node {
                Some(n) if n != initial.node => {
                    anyhow::bail!(
                        "--node {n} but {} describes node {}",
                        pods_file.display(),
                        initial.node
                    )
                }
                _ => initial.node.clone(),
            };
            // SAFETY: the handler only stores to an atomic.
            unsafe {
                libc::signal(
                    libc::SIGTERM,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                );
                libc::signal(
                    libc::SIGINT,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                );
            }
            let mut dp = EbpfDataplane::load(&cli.bpffs, &node)?;
            log::info!(
                "ebpf dataplane for node {node}, pins under {}",
                dp.dirs().root.display()
            );
            let lp = FileLoop {
                path: pods_file,
                resync: Duration::from_secs(resync_secs),
                poll: Duration::from_millis(200),
            };
            lp.run(&mut dp, &STOP);
            // Deliberately no cleanup: the pinned state keeps redirecting while no agent runs.
            log::info!("stopping; redirection stays in place (pinned)");
            Ok(())
        }
        Command::Status { json } => {
            for node in pinned_nodes(&cli.bpffs, cli.node) {
                let st = status::read(&cli.bpffs, &node)?;
                if json {
                    println!("{}", serde_json::to_string(&st)?);
                } else {
                    print!("{}", st.render());
                }
            }
            Ok(())
        }
        Command::Cleanup => {
            for node in pinned_nodes(&cli.bpffs, cli.node) {
                let c = ebpf::cleanup(&cli.bpffs, &node)?;
                println!(
                    "node {node}: removed {} links, {} maps, tproxy routing in {} ztunnel netns",
                    c.links,
                    c.maps,
                    c.ztunnel_netns.len()
                );
            }
            Ok(())
        }
    }
}
