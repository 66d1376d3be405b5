# Cairn image: one binary, cairn, plus the tools its node plugin runs
# (mkfs.ext4, mkfs.xfs, mount, losetup, blkid, fusermount3).

FROM golang:1.26-bookworm AS builder
WORKDIR /src
# Modules first, so this layer stays cached until go.mod or go.sum change.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -buildvcs=false \
        -ldflags "-s -w -X main.version=${VERSION}" \
        -o /out/cairn ./cmd/cairn

FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        e2fsprogs xfsprogs util-linux mount fuse3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/cairn /usr/local/bin/cairn
ENTRYPOINT ["/usr/local/bin/cairn"]
