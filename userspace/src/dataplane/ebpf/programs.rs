//! Which programs of the object each ztunnel mode loads, and how a refusal reads.
use aya::{Ebpf, programs::SchedClassifier};

use super::lookup;
use crate::error::{Error, Result};

/// The programs one ztunnel mode loads into the kernel: a node-level agent never loads the
/// in-pod programs and the reverse, so a program one kernel refuses stops only the mode that
/// needs it (`docs/design.md`, "Kernels").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramSet {
    /// ztunnel in its own netns: the programs on the pods' and ztunnel's veths.
    NodeLevel,
    /// ztunnel in each pod's netns: the programs on the pods' eth0 and lo, and the guard on
    /// their host veths.
    InPod,
}

impl ProgramSet {
    pub fn classifiers(self) -> &'static [&'static str] {
        use zdivert_common::program::*;
        match self {
            ProgramSet::NodeLevel => &[OUTBOUND, INBOUND, ZTUNNEL_RETURN, ZTUNNEL_TPROXY, HOLD],
            ProgramSet::InPod => &[POD_EGRESS, POD_INGRESS, POD_GUARD],
        }
    }

    pub fn lookup(self) -> lookup::Lookup {
        match self {
            ProgramSet::NodeLevel => lookup::Lookup::Ztunnel,
            ProgramSet::InPod => lookup::Lookup::Pod,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ProgramSet::NodeLevel => "node-level",
            ProgramSet::InPod => "in-pod",
        }
    }

    /// Loads every program of the set into the kernel, each on its own: the first one the
    /// kernel refuses is named, with the verifier's last lines.
    pub fn load(self, ebpf: &mut Ebpf) -> Result<()> {
        self.load_packet_programs(ebpf)?;
        self.load_selectors(ebpf)
    }

    /// The TC programs and the sk_lookup one.
    pub fn load_packet_programs(self, ebpf: &mut Ebpf) -> Result<()> {
        for &program in self.classifiers() {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(program)
                .ok_or(Error::ProgramMissing { program })?
                .try_into()
                .map_err(|source| Error::Program { program, source })?;
            prog.load().map_err(|e| rejected(program, e))?;
        }
        lookup::load(ebpf, self.lookup())
    }

    /// The set's SO_REUSEPORT programs (in-pod: `zd_zt_newest`, which reads fields of its
    /// context that came with Linux 5.14). Loaded last, so that on a kernel where in-pod eBPF
    /// cannot run anyway the probe names the reason that matters (`probe.rs`).
    pub fn load_selectors(self, ebpf: &mut Ebpf) -> Result<()> {
        if self != ProgramSet::InPod {
            return Ok(());
        }
        let program = zdivert_common::program::ZTUNNEL_NEWEST;
        let prog: &mut aya::programs::SkReuseport = ebpf
            .program_mut(program)
            .ok_or(Error::ProgramMissing { program })?
            .try_into()
            .map_err(|source| Error::Program { program, source })?;
        prog.load().map_err(|e| rejected(program, e))
    }
}

/// A load error as the operator needs it: which program, and the verifier's reason.
pub(crate) fn rejected(program: &'static str, e: aya::programs::ProgramError) -> Error {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => Error::Rejected {
            program,
            errno: io_error,
            log: verifier_log.to_string(),
        },
        source => Error::Program { program, source },
    }
}
