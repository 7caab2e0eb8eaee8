//! `--mode auto` and `zdivert probe`: whether one mode's eBPF redirection can run here, found
//! by doing what it does, never by reading a version number:
//! - load each of the mode's programs (the verifier refuses a helper, or a shape of code, that
//!   its kernel does not know), and attach one the way the agent will (TCX or tc clsact) to a
//!   scratch veth;
//! - in-pod mode also needs `bpf_sk_assign` to accept a listener bound with SO_REUSEPORT, as
//!   in-pod ztunnel binds its own (`INPOD_PORT_REUSE`, default true): kernels before 6.5 refuse
//!   that assignment. A SYN is sent through `zd_pod_ingress` in a scratch netns to such a
//!   listener, and must be accepted there.
//!
//! Leaves nothing behind: the scratch pins, veth and netns go with the probe.
use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    time::Duration,
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, TcAttachOptions},
    },
};
use socket2::{Domain, Protocol, Socket, Type};
use zdivert_common::{MARK_INPOD_CONN, PORT_OUTBOUND, program};

use super::{OBJECT, ProgramSet, attach::AttachMode, ensure_bpffs};
use crate::nl::Netlink;

/// Ok, or what this kernel or node lacks for `set`'s eBPF redirection. An agent built without
/// its eBPF object is a broken build, not a kernel without BPF: the caller refuses to run
/// before it gets here (`super::object`).
pub fn probe(bpffs: &Path, attach: AttachMode, set: ProgramSet) -> Result<(), String> {
    probe_logging(bpffs, attach, set, None)
}

/// As `probe`; the whole verifier log of a refused program is written to
/// `<log_dir>/<program>.log`.
pub fn probe_logging(
    bpffs: &Path,
    attach: AttachMode,
    set: ProgramSet,
    log_dir: Option<&Path>,
) -> Result<(), String> {
    ensure_bpffs(bpffs).map_err(|e| e.chain().to_string())?;
    sweep_stale(bpffs);
    let scratch = bpffs
        .join(zdivert_common::PIN_BASE)
        .join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let result = try_set(&scratch, attach, set, log_dir);
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir(bpffs.join(zdivert_common::PIN_BASE));
    result
}

/// A probe's scratch pins and veth are named by its pid.
const SCRATCH_PREFIX: &str = "probe-";
const SCRATCH_VETH: &str = "zdprobe";

fn alive(pid: &str) -> bool {
    Path::new("/proc").join(pid).exists()
}

/// Removes what a probe killed halfway (SIGKILL, OOM) left: its scratch pins, and its scratch
/// veth in this netns. Each is named by the probe's pid; a live probe's are left alone.
pub fn sweep_stale(bpffs: &Path) {
    let base = bpffs.join(zdivert_common::PIN_BASE);
    for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix(SCRATCH_PREFIX)
            .is_some_and(|pid| !alive(pid))
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let Ok(nl) = Netlink::new() else { return };
    for link in nl.links().unwrap_or_default() {
        let pid = link.name.strip_prefix(SCRATCH_VETH);
        if pid.is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()) && !alive(p)) {
            let _ = nl.delete_link(&link.name);
        }
    }
}

fn try_set(
    pins: &Path,
    attach: AttachMode,
    set: ProgramSet,
    log_dir: Option<&Path>,
) -> Result<(), String> {
    let mut ebpf = super::loader(pins)
        .load(OBJECT)
        .map_err(|e| format!("loading the object: {e}"))?;
    let logged = |e: crate::error::Error| {
        if let (crate::error::Error::Rejected { program, log, .. }, Some(dir)) = (&e, log_dir) {
            let path = dir.join(format!("{program}.log"));
            if let Err(io) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, log))
            {
                log::warn!("{}: {io}", path.display());
            }
        }
        e.chain().to_string()
    };
    set.load_packet_programs(&mut ebpf).map_err(logged)?;
    let first = set.classifiers()[0];
    attach_to_scratch_veth(&mut ebpf, first, attach)?;
    if set == ProgramSet::InPod {
        assign_to_reuseport_listener(&mut ebpf)?;
    }
    set.load_selectors(&mut ebpf).map_err(logged)
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .expect("loaded by ProgramSet::load")
        .try_into()
        .expect("checked by ProgramSet::load")
}

fn attach_to_scratch_veth(
    ebpf: &mut Ebpf,
    program: &str,
    attach: AttachMode,
) -> Result<(), String> {
    let nl = Netlink::new().map_err(|e| e.to_string())?;
    // 7 + at most 7 digits (pid_max is 2^22), and the peer's "p": within IFNAMSIZ.
    let name = format!("{SCRATCH_VETH}{}", std::process::id());
    nl.add_scratch_veth(&name).map_err(|e| e.to_string())?;
    let prog = classifier(ebpf, program);
    let attached = match attach {
        AttachMode::Tcx => prog
            .attach_with_options(
                &name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| format!("TCX attach failed (kernel < 6.6? try --attach netlink): {e}")),
        AttachMode::Netlink => tc::qdisc_add_clsact(&name)
            .map_err(ProgramError::from)
            .and_then(|()| {
                let options = TcAttachOptions::Netlink(NlOptions::default());
                prog.attach_with_options(&name, TcAttachType::Ingress, options)
            })
            .map_err(|e| format!("tc clsact attach failed: {e}")),
    }
    .map(|id| {
        let _ = prog.detach(id);
    });
    let _ = nl.delete_link(&name);
    attached
}

/// The address the probe's connection is sent to: not the scratch netns's loopback (which
/// `zd_pod_ingress` leaves alone), so the SYN is captured as a pod's outbound SYN would be.
const PROBE_DESTINATION: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PROBE_PORT: u16 = 9;

/// In a netns of its own: a listener on :15001 bound as in-pod ztunnel binds it (SO_REUSEPORT,
/// IP_TRANSPARENT), `zd_pod_ingress` on lo, and a connection marked as `zd_pod_egress` marks
/// what it turns back. The listener accepts it only if the kernel let the program assign the
/// SYN to a reuseport socket.
fn assign_to_reuseport_listener(ebpf: &mut Ebpf) -> Result<(), String> {
    let prog = classifier(ebpf, program::POD_INGRESS);
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a new netns for this scoped thread alone; it ends with the thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "a scratch netns for the in-pod probe: {}",
                    std::io::Error::last_os_error()
                ));
            }
            in_scratch_netns(prog)
        })
        .join()
        .unwrap_or_else(|_| Err("the in-pod probe's thread panicked".into()))
    })
}

fn in_scratch_netns(prog: &mut SchedClassifier) -> Result<(), String> {
    let nl = Netlink::new().map_err(|e| e.to_string())?;
    nl.loopback_up_with(PROBE_DESTINATION.into())
        .map_err(|e| e.chain().to_string())?;
    tc::qdisc_add_clsact("lo").map_err(|e| format!("tc clsact on lo: {e}"))?;
    let options = TcAttachOptions::Netlink(NlOptions::default());
    let id = prog
        .attach_with_options("lo", TcAttachType::Ingress, options)
        .map_err(|e| format!("attaching {} to lo: {e}", program::POD_INGRESS))?;
    // First a listener without SO_REUSEPORT: if that one is not reached either, the program
    // itself does not work here, whatever the reason, and the probe says so.
    let result = accepts(false)
        .map_err(|e| {
            format!(
                "{} assigned a SYN to a listener, and the listener did not accept it ({e})",
                program::POD_INGRESS
            )
        })
        .and_then(|()| {
            accepts(true).map_err(|e| format!(
            "bpf_sk_assign does not take a SO_REUSEPORT listener, as in-pod ztunnel binds its \
             own (Linux 6.5+): a SYN assigned to one was not accepted ({e}), while one without \
             SO_REUSEPORT accepted it"
        ))
        });
    let _ = prog.detach(id);
    result
}

/// Whether a SYN `zd_pod_ingress` assigns to a listener on :15001 bound as in-pod ztunnel
/// binds it (IP_TRANSPARENT, ztunnel's mark 0x539 that the program requires, and SO_REUSEPORT
/// if `reuse_port`) is accepted there.
fn accepts(reuse_port: bool) -> Result<(), String> {
    let listener =
        listener(reuse_port).map_err(|e| format!("a listener on :{PORT_OUTBOUND}: {e}"))?;
    connect_marked().map_err(|e| e.to_string())?;
    listener
        .set_nonblocking(true)
        .and_then(|()| listener.accept())
        .map(|_| ())
        .map_err(|e| format!("the probe's connection reached another listener: {e}"))
}

fn listener(reuse_port: bool) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_port(reuse_port)?;
    s.set_ip_transparent(true)?;
    s.set_mark(zdivert_common::MARK_INPOD_ZTUNNEL)?;
    s.bind(&SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT_OUTBOUND)).into())?;
    s.listen(8)?;
    Ok(s)
}

/// Connects to `PROBE_DESTINATION:PROBE_PORT` with the mark of a turned-back segment; where
/// nothing assigns the SYN, nothing listens there and the connection is refused or times out.
fn connect_marked() -> std::io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_mark(MARK_INPOD_CONN)?;
    let to = SocketAddr::from(SocketAddrV4::new(PROBE_DESTINATION, PROBE_PORT));
    s.connect_timeout(&to.into(), Duration::from_millis(1500))?;
    // Accepted: the peer is the probe's listener, which says nothing and closes with us.
    let mut stream: TcpStream = s.into();
    let _ = stream.set_read_timeout(Some(Duration::from_millis(1)));
    let _ = stream.read(&mut [0u8; 1]);
    Ok(())
}
