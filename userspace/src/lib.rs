//! zdivert: diverts Istio ambient pods' TCP into the node's ztunnel and back.
//!
//! ```text
//! pod source ──► NodeState ──► Dataplane::apply (ebpf | iptables) ──► kernel
//! ```
pub mod agent;
pub mod cni;
pub mod dataplane;
pub mod error;
pub mod facts;
pub mod netns;
pub mod nl;
pub mod source;
pub mod state;
pub mod zds;
pub mod ztunnel;

pub use error::{Error, Result};
