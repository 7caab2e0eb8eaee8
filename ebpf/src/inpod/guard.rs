//! In-pod capture, the node's side: TC ingress of an ambient pod's host veth, in the node's
//! netns.
//!
//! `egress.rs` sees every frame the pod's stack sends, but a packet socket with
//! PACKET_QDISC_BYPASS (CAP_NET_RAW, a default capability) hands its frames to the driver past
//! the egress hook. What crossed the hook carries `TC_INDEX_POD_EGRESS_SEEN`, which a process in
//! the pod cannot set; the pod's TCP without it went around capture and goes no further. The
//! index is reset, so nothing past this point sees it.
use aya_ebpf::{macros::classifier, programs::TcContext};
use zdivert_common::{TC_INDEX_POD_EGRESS_SEEN, pod_counter::*};

use crate::{
    packet::{Frame, IPPROTO_TCP, parse, set_tc_index, tc_index},
    verdict::{drop, pass},
};

#[classifier]
pub fn zd_pod_guard(ctx: TcContext) -> i32 {
    if tc_index(&ctx) == TC_INDEX_POD_EGRESS_SEEN {
        set_tc_index(&ctx, 0);
        return pass(GUARD_PASSED);
    }
    match parse(&ctx) {
        Frame::NotIp => pass(GUARD_PASSED),
        Frame::Ip(ip) if ip.proto != IPPROTO_TCP => pass(GUARD_PASSED),
        // TCP past the egress hook, or what cannot be read as IP (which the egress program
        // drops): around capture.
        _ => drop(GUARD_DROP_UNSEEN),
    }
}
