//! The developer workflow. Every command sets up what it needs first (idempotent, quick when
//! already done), so on a fresh machine `cargo xtask test` and `cargo xtask demo` just work.
mod setup;
mod vmtest;

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install prerequisites: rust-src for nightly, bpf-linker, Debian packages, bpffs.
    Setup {
        /// Also build the real ztunnel (1.22.8) from this checkout, for the lab.
        #[arg(long)]
        ztunnel_src: Option<PathBuf>,
    },
    /// Build the eBPF object (always optimised: the verifier rejects debug builds).
    BuildEbpf {
        /// Also build the agent in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run every test: unit, BPF_PROG_TEST_RUN, privileged netns integration.
    Test {
        /// Only integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Run the privileged suites on Debian's 5.10, 6.1 and 6.12 kernels, booted under QEMU
    /// with virtme-ng (images fetched and unpacked under target/vmtest, never installed).
    Vmtest {
        /// 5.10, 6.1, 6.12, or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only the core subset CI runs (node-level eBPF through ztunnel, odd packets,
        /// program verdicts, geneve).
        #[arg(long)]
        core: bool,
        /// Only tests whose name contains one of these (libtest filters).
        filters: Vec<String>,
    },
    /// Measure what each redirection path costs (release build); writes bench/results.{json,md}.
    Bench {
        /// Tiny sizes: checks that every part runs, measures nothing worth publishing.
        #[arg(long)]
        quick: bool,
        /// Repetitions of each comparison, interleaved.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Rebuild the article's node in network namespaces and show traffic passing through ztunnel.
    Demo {
        /// Dataplane: ebpf, or iptables (then the rules are shown as the article lists them).
        #[arg(long, default_value = "ebpf", value_parser = ["ebpf", "iptables"])]
        mode: String,
    },
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command from the workspace root, failing with its description.
pub fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn build_ebpf() -> Result<()> {
    // Through rustup, as aya-build does; the outer cargo's compiler settings must not leak in.
    let mut c = Command::new("rustup");
    c.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--quiet",
        "-p",
        "zdivert-ebpf",
        "--release",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    for v in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
        c.env_remove(v);
    }
    run(&mut c)
}

fn build_agent(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--quiet", "-p", "zdivert", "-p", "zdivert-tests"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup { ztunnel_src } => {
            setup::all()?;
            ztunnel_src.map_or(Ok(()), |src| setup::ztunnel(&src))
        }
        Cmd::BuildEbpf { release } => {
            setup::toolchain()?;
            build_ebpf()?;
            build_agent(release)
        }
        Cmd::Test { filter } => {
            setup::all()?;
            build_ebpf()?;
            build_agent(false)?;
            setup::remove_leftovers()?;
            // Unit tests and BPF_PROG_TEST_RUN tests of every crate but the netns suite...
            run(cargo().args([
                "test",
                "-p",
                "zdivert-common",
                "-p",
                "zdivert",
                "-p",
                "xtask",
            ]))?;
            // ...then the privileged suite, serially: its tests share the kernel.
            let mut c = cargo();
            // Every suite runs even when one fails: a failure must not hide another.
            c.args([
                "test",
                "--no-fail-fast",
                "-p",
                "zdivert-tests",
                "--",
                "--test-threads=1",
            ]);
            if let Some(f) = filter {
                c.arg(f);
            }
            c.env("ZDIVERT_BIN", root().join("target/debug/zdivert"));
            run(&mut c)
        }
        Cmd::Vmtest {
            kernel,
            core,
            mut filters,
        } => {
            let kernels = vmtest::kernels(&kernel)?;
            setup::all()?;
            vmtest::tools()?;
            build_ebpf()?;
            build_agent(false)?;
            setup::remove_leftovers()?;
            if core {
                filters.extend(vmtest::CORE.iter().map(|f| f.to_string()));
            }
            let (binaries, zdivert) = vmtest::snapshot(&vmtest::test_binaries()?)?;
            let plan = vmtest::Plan {
                binaries: &binaries,
                filters: &filters,
                zdivert,
            };
            let mut failed = Vec::new();
            let mut summary = Vec::new();
            for k in kernels {
                let o = vmtest::run_on(k, &plan)?;
                summary.push(format!(
                    "{}: {} in {:.0} s (log: {})",
                    k.name,
                    if o.passed { "passed" } else { "FAILED" },
                    o.elapsed.as_secs_f64(),
                    o.log.display()
                ));
                if !o.passed {
                    failed.push(k.name);
                }
            }
            eprintln!("vmtest:\n  {}", summary.join("\n  "));
            if !failed.is_empty() {
                bail!("vmtest failed on {}", failed.join(", "));
            }
            Ok(())
        }
        Cmd::Bench { quick, rounds } => {
            setup::all()?;
            build_ebpf()?;
            build_agent(true)?;
            setup::remove_leftovers()?;
            let mut c = cargo();
            c.args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "zdivert-tests",
                "--bin",
                "bench",
                "--",
            ])
            .args(["--rounds", &rounds.to_string()])
            .env("ZDIVERT_BIN", root().join("target/release/zdivert"));
            if quick {
                c.arg("--quick");
            }
            run(&mut c)
        }
        Cmd::Demo { mode } => {
            setup::all()?;
            build_ebpf()?;
            build_agent(false)?;
            setup::remove_leftovers()?;
            run(cargo()
                .args([
                    "run",
                    "--quiet",
                    "-p",
                    "zdivert-tests",
                    "--bin",
                    "demo",
                    "--",
                ])
                .args(["--mode", &mode])
                .env("ZDIVERT_BIN", root().join("target/debug/zdivert")))
        }
    }
}
