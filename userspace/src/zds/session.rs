//! One ztunnel's ZDS connection, from the agent's side: hello, the snapshot (one `add` or
//! `keep` per pod, each acked), `snapshot_sent`, then `add`/`del` one at a time, each waiting
//! for its ack.
use std::{
    os::fd::{AsFd, OwnedFd},
    time::Duration,
};

use prost::Message;

use super::{
    messages::{
        AddWorkload, DelWorkload, KeepWorkload, Request, Response, SnapshotSent, Version,
        WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
    },
    seqpacket::{MAX_MESSAGE, Peer, Received},
};

/// How long ztunnel may take to answer one message before the agent gives up on it.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a ztunnel's session ended or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{op} on the ZDS socket")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    #[error("the peer closed the connection")]
    Closed,
    #[error("a message longer than {MAX_MESSAGE} bytes")]
    Oversized,
    #[error("a message that is not a {what}")]
    Malformed {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("ZDS version {0} (this agent speaks V1)")]
    Version(i32),
    #[error("an answer without an ack")]
    NoAck,
    #[error("ztunnel refused {what} {uid}: {error}")]
    Refused {
        what: &'static str,
        uid: String,
        error: String,
    },
}

/// A pod as ZDS names it; `netns` is `None` when the agent cannot open it (sent as `keep`).
pub struct WorkloadNetns {
    pub uid: String,
    pub info: WorkloadInfo,
    pub netns: Option<OwnedFd>,
}

/// What the snapshot did: pods ztunnel refused (the session goes on; the caller retries them).
#[derive(Debug, Default)]
pub struct SnapshotReport {
    pub refused: Vec<SessionError>,
}

pub struct Session {
    peer: Peer,
    timeout: Duration,
}

impl Session {
    /// Waits for ztunnel's hello and sends it the snapshot; the session is live after.
    pub fn open(
        peer: Peer,
        timeout: Duration,
        snapshot: &[WorkloadNetns],
    ) -> Result<(Session, SnapshotReport), SessionError> {
        Self::open_with(peer, timeout, snapshot, |_| {})
    }

    /// `open`, with `before_sent` told what the snapshot achieved before `snapshot_sent` goes
    /// out: ztunnel is not ready until it has that message.
    pub fn open_with(
        peer: Peer,
        timeout: Duration,
        snapshot: &[WorkloadNetns],
        before_sent: impl FnOnce(&SnapshotReport),
    ) -> Result<(Session, SnapshotReport), SessionError> {
        peer.set_receive_timeout(timeout)
            .map_err(|source| SessionError::Io {
                op: "setting the receive timeout",
                source,
            })?;
        let mut s = Session { peer, timeout };
        let hello: ZdsHello = s.receive("ZdsHello")?;
        if hello.version != Version::V1 as i32 {
            return Err(SessionError::Version(hello.version));
        }
        let mut report = SnapshotReport::default();
        for w in snapshot {
            let result = match &w.netns {
                Some(_) => s.add(w),
                None => s.request(
                    Request::Keep(KeepWorkload { uid: w.uid.clone() }),
                    None,
                    ("keep", &w.uid),
                ),
            };
            match result {
                Err(e @ SessionError::Refused { .. }) => report.refused.push(e),
                other => other?,
            }
        }
        before_sent(&report);
        s.request(
            Request::SnapshotSent(SnapshotSent {}),
            None,
            ("snapshot_sent", ""),
        )?;
        Ok((s, report))
    }

    /// Hands the pod's netns to ztunnel.
    pub fn add(&mut self, w: &WorkloadNetns) -> Result<(), SessionError> {
        let add = Request::Add(AddWorkload {
            uid: w.uid.clone(),
            workload_info: Some(w.info.clone()),
        });
        self.request(add, w.netns.as_ref().map(AsFd::as_fd), ("add", &w.uid))
    }

    pub fn del(&mut self, uid: &str) -> Result<(), SessionError> {
        let del = Request::Del(DelWorkload { uid: uid.into() });
        self.request(del, None, ("del", uid))
    }

    fn request(
        &mut self,
        request: Request,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
        (what, uid): (&'static str, &str),
    ) -> Result<(), SessionError> {
        let bytes = WorkloadRequest {
            payload: Some(request),
        }
        .encode_to_vec();
        self.peer
            .send(&bytes, fd)
            .map_err(|source| SessionError::Io { op: "send", source })?;
        let response: WorkloadResponse = self.receive("WorkloadResponse")?;
        match response.payload {
            Some(Response::Ack(ack)) if ack.error.is_empty() => Ok(()),
            Some(Response::Ack(ack)) => Err(SessionError::Refused {
                what,
                uid: uid.into(),
                error: ack.error,
            }),
            None => Err(SessionError::NoAck),
        }
    }

    fn receive<M: Message + Default>(&mut self, what: &'static str) -> Result<M, SessionError> {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = match self.peer.recv(&mut buf) {
            Ok(Received::Message(n)) => n,
            Ok(Received::Closed) => return Err(SessionError::Closed),
            Ok(Received::Oversized) => return Err(SessionError::Oversized),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(SessionError::NoAnswer(self.timeout));
            }
            Err(source) => {
                return Err(SessionError::Io {
                    op: "receive",
                    source,
                });
            }
        };
        M::decode(&buf[..n]).map_err(|source| SessionError::Malformed { what, source })
    }

    /// Whether the peer is gone (or broke the protocol by speaking unasked); checked while
    /// idle, so a ztunnel that exited leaves the status before the next change.
    pub fn peer_gone(&self) -> bool {
        self.peer.hung_up_or_spoke()
    }
}
