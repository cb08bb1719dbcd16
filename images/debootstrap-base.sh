#!/bin/sh
# A stand-in for the official python image, for machines that cannot reach Docker Hub (or
# any container registry) but can reach a Debian mirror: a minimal Debian rootfs with the
# distribution's python3 and venv, made with debootstrap and committed with buildah as a
# local image. Bookworm's python3 is 3.11, the version images/Dockerfile's default base
# (python:3.11-slim-bookworm) carries. Use it as the base of the CPU image:
#
#   sudo images/debootstrap-base.sh            # makes localhost/debian-python:bookworm
#   make images-cpu BASE_IMAGE=localhost/debian-python:bookworm
#
# Needs root, debootstrap and buildah (apt-get install -y debootstrap buildah).
# SUITE, MIRROR and IMAGE override the release, the mirror and the image name.
set -eu

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
IMAGE=${IMAGE:-localhost/debian-python:$SUITE}

workdir=$(mktemp -d)
container=""
cleanup() {
	if [ -n "$container" ]; then buildah rm "$container" >/dev/null; fi
	rm -rf "$workdir"
}
trap cleanup EXIT

rootfs="$workdir/rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
	"$SUITE" "$rootfs" "$MIRROR"
# What the official slim images leave out too: package lists and caches, docs.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
	"$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
tar -C "$rootfs" --numeric-owner -cf "$workdir/rootfs.tar" .

container=$(buildah from scratch)
buildah add "$container" "$workdir/rootfs.tar" /
buildah config --env LANG=C.UTF-8 --cmd python3 \
	--label org.opencontainers.image.description="Debian $SUITE with python3 and venv (debootstrap stand-in)" \
	"$container"
buildah commit --rm "$container" "$IMAGE"
container=""
buildah images "$IMAGE"
