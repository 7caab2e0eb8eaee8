//! zdivert's TC programs: one module per packet path (docs/design.md).
//!
//! Every program returns a verdict that means what it says: `TCX_NEXT` for traffic zdivert does
//! not own (so the cluster CNI's programs still see it), `TC_ACT_REDIRECT` from the redirect
//! helpers, `TC_ACT_OK` only after a socket was assigned, `TC_ACT_SHOT` for what must not pass.
#![no_std]
#![no_main]

mod dns;
mod dns6;
mod lookup_ctx;
mod maps;
mod packet;
mod socket;
mod verdict;

mod hold;
mod inbound;
mod outbound;
mod ztunnel_lookup;
mod ztunnel_return;
mod ztunnel_tproxy;

mod inpod;

// The panic handler and the license.
use zdivert_ebpf as _;
