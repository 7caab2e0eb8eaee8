//! Another owner's program, as a cluster CNI attaches one, through TCX or as a tc clsact filter:
//! it returns a final verdict, so whatever runs after it on the hook never sees the packet.
//! Loaded from two raw instructions through the bpf syscall, so the tests depend on nothing of
//! ours.
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{Result, bail};

use crate::ns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_F_BEFORE: u32 = 1 << 3;
const BPF_F_AFTER: u32 = 1 << 4;

/// `r0 = 0 (TCX_PASS); exit`.
const PASS: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> Result<RawFd> {
    // SAFETY: `attr` is a zero-initialised bpf_attr of the size passed, filled for `cmd`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    Ok(fd as RawFd)
}

/// Loads the two-instruction program that returns 0: `TCX_PASS`, or `TC_ACT_OK` for a
/// direct-action tc filter; either ends the hook's chain.
fn load_pass() -> Result<OwnedFd> {
    zdivert::dataplane::ebpf::lift_memlock_limit();
    let license = c"GPL";
    let name = c"foreign_cni";
    let mut load = [0u8; 128];
    load[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    load[4..8].copy_from_slice(&2u32.to_ne_bytes());
    load[8..16].copy_from_slice(&(PASS.as_ptr() as u64).to_ne_bytes());
    load[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    load[48..48 + name.to_bytes().len()].copy_from_slice(name.to_bytes());
    // SAFETY: a fresh fd the kernel handed us.
    Ok(unsafe { OwnedFd::from_raw_fd(bpf(BPF_PROG_LOAD, &mut load)?) })
}

/// Another owner's tc filter at priority 1 on a clsact hook, as `tc` adds one: a direct-action
/// bpf filter returning `TC_ACT_OK`. Added after ours, cls_bpf runs it first. Deleted when
/// dropped.
pub struct ForeignClsact {
    ns: std::path::PathBuf,
    ifname: String,
    dir: &'static str,
}

const FOREIGN_HANDLE: &str = "0x1";

impl ForeignClsact {
    pub fn attach(ns: &Netns, ifname: &str, ingress: bool) -> Result<ForeignClsact> {
        let prog = load_pass()?;
        // tc takes a program from bpffs: pinned for the command, unpinned after (the filter
        // keeps it).
        let pin = format!(
            "{}/zdivert-test-foreign-{}",
            zdivert_common::BPFFS,
            std::process::id()
        );
        let path = std::ffi::CString::new(pin.clone())?;
        let mut attr = [0u8; 16];
        attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
        let fd = std::os::fd::AsRawFd::as_raw_fd(&prog) as u32;
        attr[8..12].copy_from_slice(&fd.to_ne_bytes());
        bpf(BPF_OBJ_PIN, &mut attr)?;
        let dir = if ingress { "ingress" } else { "egress" };
        let added = ns.cmd(
            "tc",
            &[
                "filter",
                "add",
                "dev",
                ifname,
                dir,
                "prio",
                "1",
                "handle",
                FOREIGN_HANDLE,
                "bpf",
                "da",
                "object-pinned",
                &pin,
            ],
        );
        let _ = std::fs::remove_file(&pin);
        added?;
        Ok(ForeignClsact {
            ns: ns.path(),
            ifname: ifname.into(),
            dir,
        })
    }
}

impl Drop for ForeignClsact {
    fn drop(&mut self) {
        if let Ok(ns) = Netns::attach(&self.ns) {
            let _ = ns.cmd(
                "tc",
                &[
                    "filter",
                    "del",
                    "dev",
                    &self.ifname,
                    self.dir,
                    "prio",
                    "1",
                    "handle",
                    FOREIGN_HANDLE,
                    "bpf",
                ],
            );
        }
    }
}

/// A foreign program attached to one hook; detached when dropped (its link fd closes).
pub struct ForeignTcx {
    _prog: OwnedFd,
    _link: OwnedFd,
}

#[derive(Clone, Copy, Debug)]
pub enum Place {
    /// In front of every program on the hook.
    First,
    /// Behind every program on the hook.
    Last,
}

impl ForeignTcx {
    /// Attaches a `TCX_PASS` program to `ifname` in `ns`, ingress or egress, at `place`.
    pub fn attach(ns: &Netns, ifname: &str, ingress: bool, place: Place) -> Result<ForeignTcx> {
        let prog = load_pass()?;
        let ifname = std::ffi::CString::new(ifname)?;
        let prog_fd = std::os::fd::AsRawFd::as_raw_fd(&prog);
        let link = ns.exec(move || -> Result<OwnedFd> {
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {ifname:?}");
            }
            let mut attr = [0u8; 64];
            attr[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
            attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
            let kind = if ingress {
                BPF_TCX_INGRESS
            } else {
                BPF_TCX_EGRESS
            };
            attr[8..12].copy_from_slice(&kind.to_ne_bytes());
            let flags = match place {
                Place::First => BPF_F_BEFORE,
                Place::Last => BPF_F_AFTER,
            };
            attr[12..16].copy_from_slice(&flags.to_ne_bytes());
            // SAFETY: a fresh fd the kernel handed us.
            Ok(unsafe { OwnedFd::from_raw_fd(bpf(BPF_LINK_CREATE, &mut attr)?) })
        })?;
        Ok(ForeignTcx {
            _prog: prog,
            _link: link,
        })
    }
}
