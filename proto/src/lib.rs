//! Generated types for the `closedloop.v1` contracts: events exchanged over JetStream and the
//! gRPC services. Field numbers are forever; evolve the `.proto` files by adding.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("closedloop.v1");
}

/// Encoded `FileDescriptorSet` of every closedloop proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/closedloop_descriptor.bin"));

impl v1::Priority {
    /// The name without the enum's `PRIORITY_` prefix ("P1"), as staff alerts and metric
    /// labels show it.
    pub fn label(self) -> &'static str {
        let name = self.as_str_name();
        name.strip_prefix("PRIORITY_").unwrap_or(name)
    }
}

#[cfg(test)]
mod tests {
    use super::v1::Priority;

    #[test]
    fn priority_labels_drop_the_enum_prefix() {
        assert_eq!(Priority::P1.label(), "P1");
        assert_eq!(Priority::Unspecified.label(), "UNSPECIFIED");
    }
}
