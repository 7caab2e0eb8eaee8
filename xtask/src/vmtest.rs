//! `cargo xtask vmtest`: the privileged suites on the kernels users run, Debian's own images
//! booted under QEMU with virtme-ng (the guest sees this machine's filesystem, so the binaries
//! built here run there as they are). Set-up is idempotent:
//! - virtme-ng (pip), qemu-system-x86, kmod and busybox (Debian);
//! - each kernel image fetched with `apt-get download` from its Debian suite (added to apt's
//!   sources, pinned so that nothing is ever installed from it), unpacked with `dpkg -x` under
//!   `target/vmtest/`, never installed; its modules linked at `/lib/modules/<version>`, where
//!   the guest and virtme-ng's initramfs look for them.
//!
//! Nested KVM fails on these machines ("failed to set MSR 0x10a"), so QEMU emulates (TCG):
//! about 30 s to boot, and every test runs several times slower than on the host.
//!
//! Which suites run is decided by what the booted kernel can do, as the agent decides it:
//! `zdivert probe` runs first in the guest, and the tests of a redirection it calls unusable
//! there (TCX attachment, in-pod eBPF) are skipped by name and listed as such, never counted.
use std::{
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{root, run};

pub struct Kernel {
    /// How `--kernel` names it.
    pub name: &'static str,
    package: &'static str,
    /// The Debian suite that has the package.
    suite: &'static str,
    /// `uname -r` of the image.
    release: &'static str,
}

pub const KERNELS: [Kernel; 3] = [
    Kernel {
        name: "5.10",
        package: "linux-image-5.10.0-30-amd64-unsigned",
        suite: "bullseye",
        release: "5.10.0-30-amd64",
    },
    Kernel {
        name: "6.1",
        package: "linux-image-6.1.0-47-amd64-unsigned",
        suite: "bookworm",
        release: "6.1.0-47-amd64",
    },
    Kernel {
        name: "6.12",
        package: "linux-image-6.12.95+deb12-amd64-unsigned",
        suite: "bookworm-backports",
        release: "6.12.95+deb12-amd64",
    },
];

pub fn kernels(which: &str) -> Result<Vec<&'static Kernel>> {
    if which == "all" {
        return Ok(KERNELS.iter().collect());
    }
    KERNELS
        .iter()
        .find(|k| k.name == which)
        .map(|k| vec![k])
        .with_context(|| format!("--kernel 5.10|6.1|6.12|all, not {which}"))
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn apt_install(packages: &[&str], target_release: Option<&str>) -> Result<()> {
    let mut c = Command::new("apt-get");
    c.args(["install", "-y", "-qq", "--no-install-recommends"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    if let Some(t) = target_release {
        c.args(["-t", t]);
    }
    run(c.args(packages))
}

const SOURCES: &str = "/etc/apt/sources.list.d/zdivert-vmtest.sources";
const PIN: &str = "/etc/apt/preferences.d/zdivert-vmtest";

/// The suites the kernel images come from, in apt's sources, pinned at priority 1: apt
/// downloads from them on request and never installs or upgrades from them by itself.
fn apt_sources() -> Result<()> {
    if Path::new(SOURCES).exists() && Path::new(PIN).exists() {
        return Ok(());
    }
    eprintln!(
        "vmtest: adding bullseye and bookworm-backports to apt's sources (pinned: download only)"
    );
    std::fs::write(
        PIN,
        "# zdivert vmtest: kernel images are downloaded from these suites, nothing is installed.\n\
         Package: *\nPin: release n=bullseye\nPin-Priority: 1\n\n\
         Package: *\nPin: release n=bookworm-backports\nPin-Priority: 1\n",
    )?;
    std::fs::write(
        SOURCES,
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bullseye bookworm-backports\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )?;
    run(Command::new("apt-get").args(["update", "-qq"]))
}

/// virtme-ng, QEMU and what they need; each only if missing.
pub fn tools() -> Result<()> {
    apt_sources()?;
    let missing: Vec<&str> = [("depmod", "kmod"), ("busybox", "busybox-static")]
        .into_iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| pkg)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing, None)?;
    }
    if !have("qemu-system-x86_64") {
        // The image may carry qemu-utils from bookworm-backports, which breaks bookworm's
        // qemu-system: then take qemu-system from there too.
        if apt_install(&["qemu-system-x86"], None).is_err() {
            apt_install(&["qemu-system-x86"], Some("bookworm-backports"))?;
        }
    }
    if vng().is_none() {
        eprintln!("vmtest: installing virtme-ng");
        run(Command::new("python3").args(["-m", "pip", "install", "-q", "virtme-ng"]))?;
    }
    vng()
        .map(|_| ())
        .context("virtme-ng installed, but no `vng` on PATH or beside python3")
}

/// virtme-ng's `vng`: on PATH, else where python3 puts the scripts of what pip installs.
fn vng() -> Option<PathBuf> {
    if have("vng") {
        return Some(PathBuf::from("vng"));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    let path = Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("vng");
    path.exists().then_some(path)
}

fn dir() -> PathBuf {
    root().join("target/vmtest")
}

/// The unpacked image of `k` (downloaded once), its modules where the guest finds them.
pub fn image(k: &Kernel) -> Result<PathBuf> {
    let tree = dir().join(k.release);
    let vmlinuz = tree.join(format!("boot/vmlinuz-{}", k.release));
    if !vmlinuz.exists() {
        let debs = dir().join("debs");
        std::fs::create_dir_all(&debs)?;
        eprintln!("vmtest: downloading {} from {}", k.package, k.suite);
        // Not through `run`, which runs everything from the workspace root.
        let status = Command::new("apt-get")
            .args(["download", "-q", &format!("{}/{}", k.package, k.suite)])
            .current_dir(&debs)
            .status()
            .context("apt-get download")?;
        if !status.success() {
            bail!("apt-get download {} failed ({status})", k.package);
        }
        let deb = std::fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{}_", k.package)))
            })
            .with_context(|| {
                format!(
                    "apt-get download left no {} in {}",
                    k.package,
                    debs.display()
                )
            })?;
        let partial = dir().join(format!("{}.partial", k.release));
        let _ = std::fs::remove_dir_all(&partial);
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
        std::fs::rename(&partial, &tree)?;
        std::fs::remove_file(&deb)?;
    }
    let modules = tree.join("lib/modules").join(k.release);
    let link = Path::new("/lib/modules").join(k.release);
    if std::fs::read_link(&link).ok().as_deref() != Some(modules.as_path()) {
        std::fs::create_dir_all("/lib/modules")?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&modules, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    if !modules.join("modules.dep").exists() {
        run(Command::new("depmod").arg(k.release))?;
    }
    Ok(vmlinuz)
}

/// The integration test executables cargo built (`cargo test --no-run`).
pub fn test_binaries() -> Result<Vec<PathBuf>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "test",
            "--no-run",
            "-p",
            "zdivert-tests",
            "--message-format=json",
        ])
        .current_dir(root())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "cargo test --no-run failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // One JSON object a line; the artifacts of test targets carry `"executable"`.
        // Integration test targets only: bins built in test mode (the bench, the demo) are not.
        if !line.contains("\"reason\":\"compiler-artifact\"")
            || !line.contains("\"kind\":[\"test\"]")
        {
            continue;
        }
        if let Some(exe) = json_string(line, "executable") {
            bins.push(PathBuf::from(exe));
        }
    }
    bins.sort();
    Ok(bins)
}

/// Copies of the binaries a guest runs, so that building on the host while a guest runs (hours
/// for `--kernel all`) changes nothing under it.
pub fn snapshot(test_binaries: &[PathBuf]) -> Result<(Vec<PathBuf>, PathBuf)> {
    let bin = dir().join("bin");
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin)?;
    let copy = |from: &Path| -> Result<PathBuf> {
        let to = bin.join(from.file_name().context("a binary without a name")?);
        std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        Ok(to)
    };
    let tests = test_binaries
        .iter()
        .map(|b| copy(b))
        .collect::<Result<_>>()?;
    // The CNI plugin goes beside the agent, where the tests look for it.
    copy(&root().join("target/debug/zdivert-cni"))?;
    Ok((tests, copy(&root().join("target/debug/zdivert"))?))
}

/// The string value of `"key":"…"` in one line of cargo's JSON (paths here hold no quotes).
fn json_string<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// The core subset `.ci/run` runs on 6.1: `zdivert probe`'s verdicts, the node-level programs
/// through the real ztunnel 1.22.8 attached as kernels without TCX attach them, the odd
/// packets, the verdicts of each program under BPF_PROG_TEST_RUN, and the fallback with
/// geneve (which this machine's kernel lacks).
pub const CORE: &[&str] = &[
    "probe_finds_node_level_ebpf_usable",
    "programs_give_the_right_verdicts",
    "ebpf_clsact::same_node_ambient_to_ambient_is_hbone_through_ztunnel",
    "ebpf_clsact::cross_node_ambient_to_ambient_is_hbone_between_ztunnels",
    "ebpf_clsact::deny_policy_holds_on_every_way_in",
    "ebpf_clsact::connection_churn_with_normal_closes_never_waits_for_a_retransmission",
    "ebpf_clsact::dns_capture_answers_from_ztunnel_and_only_when_enabled",
    "ebpf_mode_delivers_odd_packets_to_ztunnel_or_nowhere",
    GENEVE_TEST,
];

/// The fallback's geneve test, ignored where the kernel has no geneve (this machine's), and run
/// in a guest whose kernel has it: the one ignored test vmtest runs.
const GENEVE_TEST: &str = "geneve_tunnels_where_the_kernel_has_geneve";

/// What one guest run is asked to do.
pub struct Plan<'a> {
    pub binaries: &'a [PathBuf],
    /// libtest arguments: filters and `--skip`s.
    pub filters: &'a [String],
    pub zdivert: PathBuf,
}

/// The suites' outcome on one kernel.
pub struct Outcome {
    pub passed: bool,
    pub elapsed: Duration,
    pub log: PathBuf,
}

/// Whether BPF_PROG_TEST_RUN takes the device a frame arrived on (`ingress_ifindex` in the
/// `__sk_buff` it is given), which the program-verdict suite needs: 5.10 refuses it (EINVAL).
/// Asked of the kernel itself, with a two-instruction classifier, before the suites run.
const TEST_RUN_CTX_PROBE: &str = r#"import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(321, cmd, buf, 128)  # __NR_bpf on x86_64
    return r, ctypes.get_errno()
insns = ctypes.create_string_buffer(bytes([0xb7] + [0] * 7 + [0x95] + [0] * 7), 16)  # r0 = 0; exit
lic = ctypes.create_string_buffer(b"GPL")
fd, err = bpf(5, struct.pack("IIQQ", 3, 2, ctypes.addressof(insns), ctypes.addressof(lic)))
if fd < 0:
    sys.exit("BPF_PROG_LOAD: " + os.strerror(err))
frame = ctypes.create_string_buffer(64)
ctx = (ctypes.c_uint32 * 48)()
ctx[9] = ctx[10] = 1  # ingress_ifindex, ifindex: lo
r, err = bpf(10, struct.pack("IIIIQQIIIIQQ", fd, 0, 64, 0, ctypes.addressof(frame), 0, 1, 0,
                               ctypes.sizeof(ctx), 0, ctypes.addressof(ctx), 0))
if r != 0:
    sys.exit("BPF_PROG_TEST_RUN with ingress_ifindex: " + os.strerror(err))
"#;

/// The guest's script: bpffs, the probe (whose verdict decides the skips), then each test
/// binary serially, as `cargo xtask test` runs them; its output streams to `log`.
fn script(plan: &Plan, out: &Path) -> String {
    let bins: Vec<String> = plan
        .binaries
        .iter()
        .map(|b| format!("'{}'", b.display()))
        .collect();
    let filters: Vec<String> = plan.filters.iter().map(|f| format!("'{f}'")).collect();
    format!(
        r#"#!/bin/sh
exec >> '{log}' 2>&1
echo "== kernel $(uname -r)"
mount -t bpf bpf /sys/fs/bpf
export ZDIVERT_BIN='{zdivert}' RUST_BACKTRACE=1 ZDIVERT_TEST_LOG='{test_log}'
'{zdivert}' probe | tee '{out}/probe.txt'
'{zdivert}' probe --attach tcx | grep -q '^node-level eBPF: usable' && echo tcx > '{out}/tcx'
skip=""
[ -e '{out}/tcx' ] || skip="$skip --skip tcx"
# The bench measures in-pod eBPF too: its smoke run needs it.
grep -q '^in-pod eBPF: usable' '{out}/probe.txt' ||
  skip="$skip --skip inpod_ebpf --skip the_bench_runs_every_part"
python3 '{out}/test_run_ctx.py' || {{
  echo "== BPF_PROG_TEST_RUN cannot place a frame on a device here: the program-verdict suite is skipped"
  skip="$skip --skip programs_give_the_right_verdicts"
}}
# Of the ignored tests only the one that wants geneve runs, where the kernel has it (this
# machine's lacks it); the others are ignored for what they would show on any kernel.
geneve=
modprobe geneve && geneve='{geneve}'
echo "== libtest options from the probe's verdict:${{skip:- none}}${{geneve:+; the ignored $geneve runs where selected}}"
echo "$skip" > '{out}/skipped'
cd '{tests}'
rc=0
for t in {bins}; do
  # Only binaries with a test left to run: no empty "0 passed" lines (`--list` lists ignored
  # tests too).
  listed=$("$t" --list --format terse {filters} $skip 2>/dev/null | grep -c ': test$')
  ignored=$("$t" --list --format terse --ignored {filters} $skip 2>/dev/null)
  if [ "$listed" -gt "$(printf '%s\n' "$ignored" | grep -c ': test$')" ]; then
    echo "== $(basename "$t")"
    "$t" --test-threads=1 {filters} $skip || rc=1
  fi
  if [ -n "$geneve" ] && printf '%s\n' "$ignored" | grep -qx "$geneve: test"; then
    echo "== $(basename "$t") --ignored $geneve"
    "$t" --test-threads=1 --ignored --exact "$geneve" || rc=1
  fi
done
echo $rc > '{out}/rc'
"#,
        log = out.join("log").display(),
        out = out.display(),
        zdivert = plan.zdivert.display(),
        // The agents' log level in the tests (tests/src/agent.rs), as on the host.
        test_log = std::env::var("ZDIVERT_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        tests = root().join("tests").display(),
        geneve = GENEVE_TEST,
        bins = bins.join(" "),
        filters = filters.join(" "),
    )
}

/// Boots `k` and runs `plan` in it, streaming the guest's output.
pub fn run_on(k: &Kernel, plan: &Plan) -> Result<Outcome> {
    let vmlinuz = image(k)?;
    let out = dir().join("out").join(k.name);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let log = out.join("log");
    std::fs::write(&log, "")?;
    std::fs::write(out.join("test_run_ctx.py"), TEST_RUN_CTX_PROBE)?;
    let script_path = out.join("run.sh");
    std::fs::write(&script_path, script(plan, &out))?;
    eprintln!(
        "vmtest: booting {} ({}) under QEMU without KVM (nested KVM fails here: TCG, slow)",
        k.name, k.release
    );
    let started = Instant::now();
    let mut vm = Command::new(vng().context("no vng (cargo xtask vmtest installs it)")?)
        .arg("-r")
        .arg(&vmlinuz)
        .args([
            "--user",
            "root",
            "--disable-kvm",
            "--memory",
            "4G",
            "--cpus",
            "2",
        ])
        .arg("--rwdir")
        .arg(&out)
        .args(["--", "sh"])
        .arg(&script_path)
        .current_dir(root())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(out.join("vng.stderr"))?)
        .spawn()
        .context("starting vng (virtme-ng)")?;
    let mut reader = std::fs::File::open(&log)?;
    let mut shown = 0u64;
    let mut buf = Vec::new();
    let status = loop {
        let done = vm.try_wait()?;
        reader.seek(std::io::SeekFrom::Start(shown))?;
        buf.clear();
        reader.read_to_end(&mut buf)?;
        shown += buf.len() as u64;
        std::io::stdout().write_all(&buf)?;
        if let Some(status) = done {
            break status;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let rc = std::fs::read_to_string(out.join("rc")).unwrap_or_default();
    if rc.trim().is_empty() {
        bail!(
            "the {} guest ended ({status}) before its tests did; vng's output: {}",
            k.name,
            out.join("vng.stderr").display()
        );
    }
    Ok(Outcome {
        passed: rc.trim() == "0",
        elapsed: started.elapsed(),
        log,
    })
}
