//! In-pod mode: the programs in each ambient pod's own netns, where in-pod ztunnel listens
//! (`dataplane/inpod/` in the agent). `egress.rs` turns the pod's TCP back through `lo`,
//! `ingress.rs` hands each captured segment to ztunnel's socket, `lookup.rs` answers the
//! listener lookup of a SYN that retires one of ztunnel's TIME_WAIT sockets. `guard.rs`, on the
//! pod's host veth, stops the pod's TCP that got past the egress hook. `newest.rs`, on
//! ztunnel's listener groups, gives new connections to the newest ztunnel during a rollout.
mod egress;
mod guard;
mod ingress;
mod lookup;
mod newest;
