//! `--mode auto`: whether the eBPF dataplane can run here, found by doing what it does on a
//! scratch interface: load every program (the verifier accepts `bpf_sk_assign` and the socket
//! lookups only where the kernel has them) and attach one, the way the agent will (TCX or tc
//! clsact), to a scratch veth. Leaves nothing behind.
use std::path::Path;

use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions},
};

use super::{
    OBJECT,
    attach::{AttachMode, Hook},
    ensure_bpffs,
};
use crate::nl::Netlink;

/// Ok, or the capability this kernel or node lacks for the eBPF dataplane. An agent built
/// without its eBPF object is a broken build, not a kernel without BPF: the caller refuses to
/// run before it gets here (`super::object`).
pub fn probe(bpffs: &Path, attach: AttachMode) -> Result<(), String> {
    ensure_bpffs(bpffs).map_err(|e| e.chain().to_string())?;
    let scratch = bpffs
        .join(zdivert_common::PIN_BASE)
        .join(format!("probe-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let result = load_and_attach(&scratch, attach);
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir(bpffs.join(zdivert_common::PIN_BASE));
    result
}

fn load_and_attach(pins: &Path, attach: AttachMode) -> Result<(), String> {
    let mut ebpf = super::loader(pins)
        .load(OBJECT)
        .map_err(|e| format!("loading the object: {e}"))?;
    for program in Hook::PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(program)
            .ok_or_else(|| format!("{program} missing from the object"))?
            .try_into()
            .map_err(|e| format!("{program}: {e}"))?;
        prog.load()
            .map_err(|e| format!("the verifier rejects {program}: {e}"))?;
    }
    super::lookup::program(&mut ebpf, super::lookup::Lookup::Ztunnel)
        .map_err(|e| e.to_string())?
        .load()
        .map_err(|e| format!("sk_lookup programs cannot load (Linux 5.9+): {e}"))?;
    let nl = Netlink::new().map_err(|e| e.to_string())?;
    let name = format!("zdprobe{}", std::process::id() % 100_000);
    nl.add_scratch_veth(&name).map_err(|e| e.to_string())?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(Hook::PodOutbound.program())
        .expect("loaded above")
        .try_into()
        .expect("checked above");
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
