//! The verdicts the programs return, each counted once, and meaning what it says: `TCX_NEXT`
//! for traffic zdivert leaves to the next program (the cluster CNI's), `TC_ACT_SHOT` for what
//! must not pass, `TC_ACT_OK` only after a socket was assigned or the mark routed a segment to
//! the local sockets. The redirect helpers return their own verdict (`TC_ACT_REDIRECT`).
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use zdivert_common::{Counter, TCX_NEXT};

use crate::maps::count;

#[inline(always)]
pub fn pass(counter: Counter) -> i32 {
    count(counter);
    TCX_NEXT
}

#[inline(always)]
pub fn drop(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_SHOT as i32
}

/// A captured segment the mark routes to this netns's local table: the stack's own lookup
/// delivers it to its socket here, and no program after this one may send it elsewhere.
#[inline(always)]
pub fn local(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_OK as i32
}

/// After `bpf_sk_assign` took the segment: the stack delivers it to that socket.
#[inline(always)]
pub fn assigned(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_OK as i32
}
