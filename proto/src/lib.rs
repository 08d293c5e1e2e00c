//! Generated types for the `closedloop.v1` contracts: events exchanged over JetStream and the
//! gRPC services. Field numbers are forever; evolve the `.proto` files by adding.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("closedloop.v1");
}

/// Encoded `FileDescriptorSet` of every closedloop proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/closedloop_descriptor.bin"));
