//! Generated types for the `closedloop.v1` contracts: events exchanged over JetStream and the
//! gRPC services. Field numbers are forever; evolve the `.proto` files by adding.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("closedloop.v1");
}

/// The protobuf codec every generated service and client uses: prost's, except that a body
/// that does not decode is the caller's mistake (`INVALID_ARGUMENT`), not the server's
/// (`INTERNAL`, as tonic reports it).
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
    use tonic::{Code, Status};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    #[derive(Debug, Clone)]
    pub struct Codec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for Codec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> tonic::codec::Codec for Codec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = RequestDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::default().encoder()
        }

        fn decoder(&mut self) -> Self::Decoder {
            RequestDecoder(ProstCodec::<T, U>::default().decoder())
        }
    }

    /// prost's decoder, with a body that does not decode answered `INVALID_ARGUMENT`.
    #[derive(Debug, Clone)]
    pub struct RequestDecoder<U>(ProstDecoder<U>);

    impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0.decode(src).map_err(|status| {
                if status.code() == Code::Internal {
                    Status::invalid_argument(format!("the body is not a valid message: {}", status.message()))
                } else {
                    status
                }
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}

/// Encoded `FileDescriptorSet` of every closedloop proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/closedloop_descriptor.bin"));

impl v1::Intent {
    /// The name without the enum's `INTENT_` prefix, in lower case ("complaint"), as the
    /// labelled examples and reasons spell it.
    pub fn label(self) -> String {
        let name = self.as_str_name();
        name.strip_prefix("INTENT_").unwrap_or(name).to_ascii_lowercase()
    }
}

impl v1::Priority {
    /// The name without the enum's `PRIORITY_` prefix ("P1"), as staff alerts and metric
    /// labels show it.
    pub fn label(self) -> &'static str {
        let name = self.as_str_name();
        name.strip_prefix("PRIORITY_").unwrap_or(name)
    }

    /// One step more urgent; P1 stays P1 (and no priority counts as the least urgent).
    pub fn raised(self) -> Self {
        match self {
            v1::Priority::P4 => v1::Priority::P3,
            v1::Priority::P3 => v1::Priority::P2,
            v1::Priority::P2 | v1::Priority::P1 | v1::Priority::Unspecified => v1::Priority::P1,
        }
    }
}

impl v1::Channel {
    /// The configuration and metric-label name of a channel: `CHANNEL_WEIBO_POST` →
    /// `weibo_post`. Static, since every delivery looks up its gateway, rate limit and
    /// templates by it.
    pub fn key(self) -> &'static str {
        match self {
            v1::Channel::Unspecified => "unspecified",
            v1::Channel::WeiboPost => "weibo_post",
            v1::Channel::WeiboComment => "weibo_comment",
            v1::Channel::WeiboDirectMessage => "weibo_direct_message",
            v1::Channel::Wechat => "wechat",
            v1::Channel::Hotline => "hotline",
            v1::Channel::WebForm => "web_form",
            v1::Channel::App => "app",
            v1::Channel::ComplaintPlatform => "complaint_platform",
            v1::Channel::Email => "email",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::Priority;

    #[test]
    fn raising_a_priority_stops_at_p1() {
        assert_eq!(Priority::P4.raised(), Priority::P3);
        assert_eq!(Priority::P3.raised(), Priority::P2);
        assert_eq!(Priority::P2.raised(), Priority::P1);
        assert_eq!(Priority::P1.raised(), Priority::P1);
    }

    #[test]
    fn priority_labels_drop_the_enum_prefix() {
        assert_eq!(Priority::P1.label(), "P1");
        assert_eq!(Priority::Unspecified.label(), "UNSPECIFIED");
    }
}
