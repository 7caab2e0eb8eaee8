//! Idempotent prerequisites (TOOLCHAIN.md): each step checks first and does nothing when done.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::run;

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn all() -> Result<()> {
    toolchain()?;
    packages()?;
    bpffs()
}

/// The nightly the eBPF object is built with. Dated toolchains cannot be installed on these
/// machines, so the image build pins it by checking: another nightly emits other bytecode, and
/// an image built with it is not the one that was tested.
pub const EBPF_NIGHTLY: &str = "rustc 1.97.0-nightly (";
pub const EBPF_NIGHTLY_DATE: &str = "2026-05-19";

pub fn toolchain() -> Result<()> {
    nightly_is_pinned()?;
    rust_src()?;
    bpf_linker()
}

fn nightly_is_pinned() -> Result<()> {
    let version = output(Command::new("rustc").args(["+nightly", "--version"]))
        .context("no nightly toolchain (rustup toolchain install nightly)")?;
    if version.starts_with(EBPF_NIGHTLY)
        && version
            .trim_end()
            .ends_with(&format!("{EBPF_NIGHTLY_DATE})"))
    {
        return Ok(());
    }
    if std::env::var_os("ZDIVERT_ANY_NIGHTLY").is_some() {
        eprintln!(
            "setup: building eBPF with {} (ZDIVERT_ANY_NIGHTLY set)",
            version.trim()
        );
        return Ok(());
    }
    bail!(
        "the eBPF object is built with {EBPF_NIGHTLY}… {EBPF_NIGHTLY_DATE}), this machine's nightly is {}; \
         install that one, or set ZDIVERT_ANY_NIGHTLY=1 to build with this one anyway",
        version.trim()
    )
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker linked against the nightly's own libLLVM (there is no system LLVM of that major).
fn bpf_linker() -> Result<()> {
    if output(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let file = llvm.file_name().unwrap().to_str().unwrap().to_string();
    // libLLVM.so.22.1-rust-1.97.0-nightly → 22
    let major = file
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
        bail!("cannot tell LLVM's major version from {file}");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME")?;
    // The binary finds libLLVM through this prefix (RUNPATH) at run time: it must stay here.
    let prefix = home.join(".cache/zdivert/llvm-prefix");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in ["libLLVM.so", file.as_str()] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
    }
    eprintln!(
        "setup: building bpf-linker against {} (about a minute)",
        llvm.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN"))
}

/// Debian packages the tests and the agent use.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("iptables", "iptables"),
    ("ipset", "ipset"),
    ("bpftool", "bpftool"),
    ("ping", "iputils-ping"),
    ("kubectl", "kubectl"),
    // The CNI reference plugins (ptp, bridge, host-local) the CNI plugin's tests chain behind.
    ("/usr/lib/cni/ptp", "containernetworking-plugins"),
    ("hping3", "hping3"),
];

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(bin, _)| {
            output(Command::new("sh").args(["-c", &format!("command -v {bin}")])).is_none()
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn bpffs() -> Result<()> {
    use zdivert_common::BPFFS;
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.starts_with("bpf "))
    {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at {BPFFS}");
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// Namespaces and pins an interrupted test run may have left (ours only: the `zdt` prefix).
pub fn remove_leftovers() -> Result<()> {
    for ns in output(Command::new("ip").args(["netns", "list"]))
        .unwrap_or_default()
        .lines()
    {
        let name = ns.split_whitespace().next().unwrap_or_default();
        if name.starts_with("zdt") {
            eprintln!("removing leftover netns {name}");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    let pins = Path::new(zdivert_common::PIN_ROOT);
    for node in std::fs::read_dir(pins).into_iter().flatten().flatten() {
        let name = node.file_name().to_string_lossy().into_owned();
        if name.starts_with("zdt") {
            eprintln!("removing leftover pins of {name}");
            let _ = Command::new(crate::root().join("target/debug/zdivert"))
                .args(["--node", &name, "cleanup"])
                .status();
        }
    }
    // The fallback's state files of test nodes (their netns, and the state in them, are gone).
    for node in std::fs::read_dir("/run/zdivert")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = node.file_name().to_string_lossy().into_owned();
        if name.starts_with("zdt") {
            eprintln!("removing leftover fallback state of {name}");
            let _ = std::fs::remove_dir_all(node.path());
        }
    }
    Ok(())
}

/// Where `cargo xtask setup --ztunnel-src DIR` puts the ztunnel it builds; the tests look here
/// after `ZTUNNEL_BIN` and `../shared/ztunnel/` (tests/src/ztunnel/mod.rs).
pub const BUILT_ZTUNNEL: &str = "target/ztunnel/ztunnel-1.22.8";

/// Builds ztunnel from a checkout of its 1.22.8 tag (node-level mode, fake CA for the lab):
/// protobuf-compiler, then the `quick-release` profile with the `testing` feature. The checkout
/// must build from crates.io alone (1.22.8 names one git dependency: patch its Cargo.toml to a
/// local copy of it). The debug profile is not usable: 1.22.8 asserts on future sizes that
/// rustc 1.95 does not meet.
pub fn ztunnel(src: &Path) -> Result<()> {
    if output(Command::new("sh").args(["-c", "command -v protoc"])).is_none() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "protobuf-compiler",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let manifest = src.join("Cargo.toml");
    anyhow::ensure!(
        manifest.is_file(),
        "--ztunnel-src {}: no Cargo.toml there (a checkout of github.com/istio/ztunnel at 1.22.8)",
        src.display()
    );
    let target = src.join("target");
    run(Command::new("cargo")
        .args([
            "build",
            "--profile",
            "quick-release",
            "--features",
            "testing",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target))?;
    let built = target.join("quick-release/ztunnel");
    let dest = crate::root().join(BUILT_ZTUNNEL);
    std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
    std::fs::copy(&built, &dest)
        .map_err(|e| anyhow::anyhow!("copying {}: {e}", built.display()))?;
    eprintln!("setup: ztunnel built at {}", dest.display());
    Ok(())
}
