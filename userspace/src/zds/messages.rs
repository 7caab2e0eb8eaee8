//! ZDS messages, written from the protocol's description (istio's `pkg/zdsapi`, package
//! `istio.workload.zds`): one raw protobuf message per SOCK_SEQPACKET packet.

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    NotUsed = 0,
    V1 = 1,
}

/// ztunnel's first message on a new connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// Sent with the pod's netns fd in SCM_RIGHTS.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// In a snapshot, for a pod whose netns the agent cannot hand over: ztunnel keeps what it has.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "1")]
    Add(AddWorkload),
    #[prost(message, tag = "5")]
    Keep(KeepWorkload),
    #[prost(message, tag = "2")]
    Del(DelWorkload),
    #[prost(message, tag = "3")]
    SnapshotSent(SnapshotSent),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "Request", tags = "1, 5, 2, 3")]
    pub payload: Option<Request>,
}

/// An empty `error` is success.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "1")]
    Ack(Ack),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "Response", tags = "1")]
    pub payload: Option<Response>,
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Bytes spelled by hand from the protobuf encoding, so a wrong tag cannot cancel out
    /// between our encoder and our decoder.
    #[test]
    fn the_wire_tags_are_the_protocols() {
        let keep = WorkloadRequest {
            payload: Some(Request::Keep(KeepWorkload { uid: "u".into() })),
        };
        // field 5, length-delimited (0x2a), len 3: field 1 "u" (0x0a 0x01 'u').
        assert_eq!(keep.encode_to_vec(), [0x2a, 3, 0x0a, 1, b'u']);
        let del = WorkloadRequest {
            payload: Some(Request::Del(DelWorkload { uid: "u".into() })),
        };
        // field 2 (0x12), len 3: field 2 "u" (0x12 0x01 'u').
        assert_eq!(del.encode_to_vec(), [0x12, 3, 0x12, 1, b'u']);
        let sent = WorkloadRequest {
            payload: Some(Request::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(sent.encode_to_vec(), [0x1a, 0]);
        let hello = ZdsHello::decode(&[0x08, 1][..]).unwrap();
        assert_eq!(hello.version(), Version::V1);
        let nack = WorkloadResponse::decode(&[0x0a, 3, 0x0a, 1, b'x'][..]).unwrap();
        assert_eq!(nack.payload, Some(Response::Ack(Ack { error: "x".into() })));
    }
}
